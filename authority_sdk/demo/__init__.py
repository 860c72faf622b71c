"""``authority demo``: the whole story on loopback, with a scripted model and no API key.

``runner.run_demo`` starts the children (``processes``) on the demo's copy of
the policy (``config``), walks through the steps (``steps``) and prints them
(``output``). ``model`` is the scripted model the demo and the examples talk to.
"""
