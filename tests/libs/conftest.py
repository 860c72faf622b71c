"""The two doors every library test runs through (fixtures live in libs_env)."""

from libs_env import door_fixture, libs_proxy_fixture, sdk_gateway_fixture

__all__ = ["door_fixture", "libs_proxy_fixture", "sdk_gateway_fixture"]
