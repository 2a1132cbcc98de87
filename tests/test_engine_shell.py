"""The engine's shell: IPython's input transformations remembered per cell, exactly.

``CachingTransformerManager`` leans on IPython's ``TransformerManager`` (its
``transform_cell`` and the three transform lists): the unit tests compare it with
IPython's own on cells of every kind of IPython syntax, and fail if those lists go.
"""

from __future__ import annotations

import re

import pytest
from ipykernel.compiler import XCachingCompiler
from IPython.core.inputtransformer2 import TransformerManager

import ipyparallel_lite as ipp
from ipyparallel_lite.engine.kernel import CachingTransformerManager, EngineCompiler

CELLS = [
    "a = 1",
    "a = 1\n",
    "%time x = 1",
    "%%timeit\nx = 1\n",
    "!ls -l",
    "files = !ls",
    "x?",
    "x??",
    "%config?",
    ">>> a = 1\n>>> b = 2\n",
    "In [1]: a = 1\n",
    "    indented = 1\n",
    "\n\n\nleading_blank = 1\n",
    "def f():\n    return 'a % b'\n",
    "s = '''\n%notmagic\n'''\n",
    "/print 1 2",
    ",print a b",
    "x = %env HOME",
    "await something()",
]


@pytest.mark.parametrize("cell", CELLS)
def test_same_transformation_as_ipython_first_and_again(cell):
    stock, caching = TransformerManager(), CachingTransformerManager()
    expected = stock.transform_cell(cell)
    assert caching.transform_cell(cell) == expected
    assert caching.transform_cell(cell) == expected  # remembered


def test_the_transform_lists_relied_on_exist():
    manager = TransformerManager()
    for name in ("cleanup_transforms", "line_transforms", "token_transformers"):
        assert isinstance(getattr(manager, name), list) and getattr(manager, name)


def test_a_transform_added_or_removed_is_applied_to_remembered_cells():
    manager = CachingTransformerManager()
    assert manager.transform_cell("a = 1") == "a = 1\n"

    def shout(lines: list[str]) -> list[str]:
        return [line.upper() for line in lines]

    manager.cleanup_transforms.append(shout)
    assert manager.transform_cell("a = 1") == "A = 1\n"
    manager.line_transforms.insert(0, shout)
    manager.cleanup_transforms.remove(shout)
    assert manager.transform_cell("a = 1") == "A = 1\n"
    manager.line_transforms.remove(shout)
    assert manager.transform_cell("a = 1") == "a = 1\n"


def test_the_oldest_cells_are_forgotten_and_long_ones_never_kept(monkeypatch):
    monkeypatch.setattr(CachingTransformerManager, "MAX_CELLS", 3)
    manager = CachingTransformerManager()
    for i in range(5):
        manager.transform_cell(f"a = {i}")
    assert list(manager._cache) == ["a = 2", "a = 3", "a = 4"]
    manager.transform_cell("b = 1  # " + "x" * manager.MAX_LENGTH)
    assert len(manager._cache) == 3


def test_engines_apply_a_transform_added_after_a_cell_ran(dv):
    dv.execute("seen = 'plain'", block=True)
    assert dv["seen"] == ["plain", "plain"]
    dv.execute("get_ipython().input_transformers_cleanup.append("
               "lambda lines: [line.replace('plain', 'changed') for line in lines])", block=True)
    try:
        dv.execute("seen = 'plain'", block=True)
        assert dv["seen"] == ["changed", "changed"]
    finally:
        dv.execute("get_ipython().input_transformers_cleanup.pop()", block=True)
    dv.execute("seen = 'plain'", block=True)
    assert dv["seen"] == ["plain", "plain"]


@pytest.mark.parametrize("cell", CELLS)
def test_code_names_are_ipykernels(cell, monkeypatch):
    stock, remembering = XCachingCompiler(), EngineCompiler()
    assert remembering.get_code_name(cell, cell, 1) == stock.get_code_name(cell, cell, 1)
    assert remembering.get_code_name(cell, cell, 2) == stock.get_code_name(cell, cell, 2)
    monkeypatch.setenv("IPYKERNEL_CELL_NAME", "named-cell")
    assert remembering.get_code_name(cell, cell, 3) == stock.get_code_name(cell, cell, 3) == "named-cell"


def test_engines_compile_with_the_remembering_compiler(rc):
    view = rc[0]
    assert view.apply_sync(lambda: type(get_ipython().compile).__name__) == "EngineCompiler"  # noqa: F821
    view.execute("def f():\n    return 1 / 0\n", block=True)
    for _ in range(2):  # named once, then remembered: tracebacks still show the cell's code
        with pytest.raises(ipp.RemoteError) as info:
            view.execute("f()", block=True)
        text = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(info.value.render_traceback()))
        assert "return 1 / 0" in text
