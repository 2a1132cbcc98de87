"""IPython magics for parallel work: ``%px``, ``%%px``, ``%autopx``, ``%pxresult``, ``%pxconfig``.

The first :class:`~ipyparallel_lite.Client` created inside IPython binds them to all
its engines (:func:`activate_first_client`, as IPython parallel does); ``rc.activate()``
(all engines, blocking) or ``view.activate(suffix)`` bind them explicitly, and
``%load_ext ipyparallel_lite`` registers them before any client exists.

The magics themselves live in :mod:`ipyparallel_lite.magics.px`, imported on first use:
a client outside IPython never imports them.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

__all__ = ["ParallelMagics", "activate_first_client", "activate_view", "get_magics",
           "load_ipython_extension"]


def activate_first_client(client: Any) -> None:
    """Bind ``%px`` and friends to all engines of ``client`` if it is the first one here.

    Called at the end of ``Client.__init__``. Outside IPython it does nothing (and
    imports nothing). A client does not take the magics from an earlier one that is
    still open; ``rc.activate()`` does, explicitly.
    """
    if "IPython" not in sys.modules:  # no IPython imported: no shell can be running
        return
    from IPython import get_ipython

    shell = get_ipython()
    if shell is not None:
        from ipyparallel_lite.magics.px import activate_if_unbound

        activate_if_unbound(shell, client)


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("ipyparallel_lite.magics.px"), name)
    raise AttributeError(f"module 'ipyparallel_lite.magics' has no attribute {name!r}")
