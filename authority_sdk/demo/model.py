"""The demo's model: the scripted model of :mod:`authority_sdk.scripted`.

    python -m authority_sdk.demo.model --port 8799
"""

from __future__ import annotations

from ..scripted import build_app, main, summarise_tool_results

__all__ = ["build_app", "main", "summarise_tool_results"]

if __name__ == "__main__":
    main()
