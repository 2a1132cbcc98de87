"""pytest-jupyter's server fixtures (``jp_fetch``, ``jp_serverapp``...), for this folder only:
its autouse fixtures manage an event loop per test, which the rest of the suite must not get."""

from pytest_jupyter.jupyter_server import *  # noqa: F403
