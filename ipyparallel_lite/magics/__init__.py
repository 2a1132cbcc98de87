"""IPython magics for parallel work: ``%px``, ``%%px``, ``%autopx``, ``%pxresult``, ``%pxconfig``.

Register them with ``%load_ext ipyparallel_lite`` and bind them to engines with
``rc.activate()`` (all engines, blocking) or ``view.activate(suffix)``.
"""

from ipyparallel_lite.magics.px import (
    ParallelMagics,
    activate_view,
    get_magics,
    load_ipython_extension,
)

__all__ = ["ParallelMagics", "activate_view", "get_magics", "load_ipython_extension"]
