"""Functions that run on engines on behalf of the views (push, pull, map chunks...).

They live in an importable module so they pickle by reference: a few bytes each.
"""

from __future__ import annotations

from typing import Any


def user_namespace() -> dict:
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None:
        raise RuntimeError("not running inside an ipyparallel_lite engine")
    return shell.user_ns


def push(namespace: dict) -> None:
    user_namespace().update(namespace)


def pull(names: Any) -> Any:
    ns = user_namespace()

    def one(name: str) -> Any:
        try:
            return eval(name, ns)
        except NameError:
            raise NameError(f"name {name!r} is not defined on this engine") from None

    if isinstance(names, str):
        return one(names)
    return [one(n) for n in names]


def execute_code(code: str) -> None:
    exec(compile(code, "<execute>", "exec"), user_namespace())


def require_module(name: str) -> None:
    """Import ``name`` here, or raise an ImportError saying which engine lacks it."""
    import importlib

    try:
        importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"{name} is not installed on this engine ({e}); install it where the "
                          "engines run") from None
