"""Task dependencies, as users write them.

- :class:`Dependency`: a set of msg_ids plus how they must finish, for the ``after``
  (run once they are done) and ``follow`` (run where they ran) flags of a
  load-balanced view.
- :func:`depend` and :func:`require`: decorators whose condition is checked on the
  engine, right before the function runs. When it does not hold, the engine raises
  :class:`~ipyparallel_lite.error.UnmetDependency` and the scheduler tries another
  engine (never the same one again for that task).

The wrapped functions are plain objects (no closures), so cloudpickle ships them to
engines like any function.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

from ipyparallel_lite.error import UnmetDependency

__all__ = ["Dependency", "depend", "dependent", "require", "required"]


class Dependency(set):
    """A set of msg_ids that a task depends on, and how they must finish.

    Parameters
    ----------
    dependencies:
        msg_ids (strings), objects with an ``msg_ids`` list (such as ``AsyncResult``),
        a mix of both, or the dict returned by :meth:`as_dict`.
    all:
        ``True`` (default): met when *all* of them finished in a way that counts;
        ``False``: when *any* of them did.
    success:
        Whether a dependency that succeeded counts (default ``True``).
    failure:
        Whether a dependency that failed counts (default ``False``).

    With the defaults, a task whose dependency fails can never run: the scheduler
    fails it with ``ImpossibleDependency`` (and, in turn, the tasks depending on it).
    """

    def __init__(
        self,
        dependencies: Any = (),
        all: bool = True,  # shadows the builtin: it is the name IPython parallel users know
        success: bool = True,
        failure: bool = False,
    ) -> None:
        if isinstance(dependencies, dict):
            all = dependencies.get("all", True)
            success = dependencies.get("success", success)
            failure = dependencies.get("failure", failure)
            dependencies = dependencies.get("dependencies", ())
        if not (success or failure):
            raise ValueError("A dependency must count successes, failures or both; "
                             "success=False and failure=False can never be met.")
        super().__init__(_msg_ids(dependencies))
        self.all = bool(all)
        self.success = bool(success)
        self.failure = bool(failure)

    def _counting(self, completed: Iterable[str], failed: Iterable[str] | None, counted: bool) -> set:
        """msg_ids whose outcome counts (``counted=True``) or does not count."""
        against: set = set()
        if self.success is counted:
            against.update(completed)
        if failed is not None and self.failure is counted:
            against.update(failed)
        return against

    def check(self, completed: Iterable[str], failed: Iterable[str] | None = None) -> bool:
        """Whether the dependency is met, given succeeded and failed msg_ids."""
        if not self:
            return True
        against = self._counting(completed, failed, True)
        return self.issubset(against) if self.all else not self.isdisjoint(against)

    def unreachable(self, completed: Iterable[str], failed: Iterable[str] | None = None) -> bool:
        """Whether the dependency can never be met, given succeeded and failed msg_ids."""
        if not self:
            return False
        against = self._counting(completed, failed, False)
        return not self.isdisjoint(against) if self.all else self.issubset(against)

    def as_dict(self) -> dict:
        """The JSON-able form sent in request metadata."""
        return {
            "dependencies": sorted(self),
            "all": self.all,
            "success": self.success,
            "failure": self.failure,
        }

    def __repr__(self) -> str:
        return (f"Dependency({sorted(self)!r}, all={self.all}, success={self.success}, "
                f"failure={self.failure})")


def _msg_ids(dependencies: Any) -> list[str]:
    if isinstance(dependencies, str) or hasattr(dependencies, "msg_ids"):
        dependencies = [dependencies]
    ids: list[str] = []
    for dep in dependencies:
        if isinstance(dep, str):
            ids.append(dep)
        elif hasattr(dep, "msg_ids"):  # AsyncResult and friends
            ids.extend(dep.msg_ids)
        else:
            raise TypeError(f"A dependency must be a msg_id string or an AsyncResult, not {type(dep).__name__}")
    return ids


# ---------------------------------------------------------------------------- decorators


class dependent:
    """``f`` guarded by a condition: ``df(*dargs, **dkwargs)`` must be truthy when it is
    called (on the engine), else :class:`UnmetDependency` is raised before ``f`` runs.

    A class rather than a closure so that it pickles; built by :class:`depend`.
    """

    def __init__(self, _wrapped_f: Callable, _wrapped_df: Callable | None, *dargs: Any, **dkwargs: Any) -> None:
        self.f = _wrapped_f
        self.df = _wrapped_df
        self.dargs = dargs
        self.dkwargs = dkwargs
        functools.update_wrapper(self, _wrapped_f, updated=())

    def check_dependency(self) -> None:
        """Raise :class:`UnmetDependency` unless the condition holds here."""
        if not self.df(*self.dargs, **self.dkwargs):
            name = getattr(self.df, "__name__", repr(self.df))
            raise UnmetDependency(f"condition {name}() is not met on this engine")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.check_dependency()
        return self.f(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {getattr(self.f, '__name__', self.f)!r}>"


class depend:
    """Decorator: run the function only on engines where ``f(*args, **kwargs)`` is truthy.

    Example::

        def has_gpu():
            import torch
            return torch.cuda.is_available()

        @depend(has_gpu)
        def train(data): ...

        view.apply(train, data)   # engines without a GPU pass the task on
    """

    def __init__(self, _wrapped_f: Callable, *args: Any, **kwargs: Any) -> None:
        self.f = _wrapped_f
        self.args = args
        self.kwargs = kwargs

    def __call__(self, f: Callable) -> dependent:
        return dependent(f, self.f, *self.args, **self.kwargs)


class required(dependent):
    """``f`` that needs modules and objects on the engine; built by :func:`require`.

    When called, it imports each module (raising :class:`UnmetDependency` if one cannot
    be imported) and binds the modules and objects as globals of ``f``, so its body can
    use them by name.
    """

    def __init__(self, _wrapped_f: Callable, modules: Iterable[str], mapping: dict[str, Any]) -> None:
        super().__init__(_wrapped_f, None)
        self.modules = tuple(modules)
        self.mapping = dict(mapping)

    def check_dependency(self) -> None:
        namespace = _globals_of(self.f)
        for name in self.modules:
            _import_into(namespace, name.partition(".")[0], name, bind_top=True)
        for key, obj in self.mapping.items():
            if isinstance(obj, _ModuleRef):
                _import_into(namespace, key, obj.name, bind_top=False)
            else:
                namespace[key] = obj


class _ModuleRef:
    """A module named in ``require(alias=module)``: imported by name on the engine."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __getstate__(self) -> str:
        return self.name

    def __setstate__(self, state: str) -> None:
        self.name = state


def _import_into(namespace: dict, key: str, name: str, bind_top: bool) -> None:
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise UnmetDependency(f"module {name!r} cannot be imported on this engine: {e}") from e
    # like `import a.b` (binds a) or `import a.b as key` (binds the submodule)
    namespace[key] = sys.modules[name.partition(".")[0]] if bind_top else module


def _globals_of(f: Any) -> dict:
    """The global namespace the innermost wrapped function resolves names in."""
    while isinstance(f, dependent):
        f = f.f
    f = getattr(f, "__func__", f)  # bound methods
    namespace = getattr(f, "__globals__", None)
    if isinstance(namespace, dict):
        return namespace
    return sys.modules["__main__"].__dict__


class _RequireDecorator:
    """The decorator returned by :func:`require` (a class, so it pickles too)."""

    def __init__(self, modules: list[str], mapping: dict[str, Any]) -> None:
        self.modules = modules
        self.mapping = mapping

    def __call__(self, f: Callable) -> required:
        return required(f, self.modules, self.mapping)


def require(*objects: Any, **mapping: Any) -> _RequireDecorator:
    """Decorator: the function needs these modules (and objects) on the engine.

    Positional arguments are module names (``"numpy"``, ``"os.path"``), modules, or
    functions/classes (sent along and bound under their ``__name__``). Keyword
    arguments bind objects under the given name; a module value is imported on the
    engine under that alias. On an engine where a module cannot be imported, the task
    raises :class:`UnmetDependency` and the scheduler tries another engine.

    Example::

        import scipy.sparse

        @require("numpy", helper, sp=scipy.sparse)   # a module by keyword: imported as `sp`
        def f(x):
            return numpy.linalg.norm(helper(sp.csr_matrix(x)))
    """
    modules: list[str] = []
    binds: dict[str, Any] = {}
    for obj in objects:
        if isinstance(obj, ModuleType):
            modules.append(obj.__name__)
        elif isinstance(obj, str):
            modules.append(obj)
        elif hasattr(obj, "__name__"):
            binds[obj.__name__] = obj
        else:
            raise TypeError("require() takes module names, modules, or named objects (functions, "
                            f"classes) positionally; pass other objects by keyword. Got {type(obj).__name__}.")
    for key, obj in mapping.items():
        binds[key] = _ModuleRef(obj.__name__) if isinstance(obj, ModuleType) else obj
    return _RequireDecorator(modules, binds)
