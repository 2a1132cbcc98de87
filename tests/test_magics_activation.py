"""The first Client created inside IPython activates %px on all its engines, as in IPython
parallel; ``%load_ext`` before or after is harmless; later clients don't take the magics.

A real InteractiveShell (conftest's ``shell``, fresh for this module) and real clusters.
"""

from __future__ import annotations

import pytest
from IPython.utils.capture import capture_output

from ipyparallel_lite.magics import ParallelMagics, get_magics

pytestmark = pytest.mark.timeout(120)


def run(shell, code: str) -> str:
    """Run a cell; its printed output. Fails if the cell raised."""
    with capture_output() as captured:
        result = shell.run_cell(code)
    assert result.success, (code, result.error_in_exec or result.error_before_exec, captured.stdout)
    return captured.stdout


def bound_client(shell):
    magics = shell.magics_manager.magics["cell"]["px"].__self__
    assert isinstance(magics, ParallelMagics)
    return magics.view.client if magics.view is not None else None


def test_first_client_activates_px_and_later_ones_do_not_steal_it(shell, own_cluster):
    run(shell, "%load_ext ipyparallel_lite")  # before any client: harmless
    assert bound_client(shell) is None
    cluster, first = own_cluster(2)  # start_and_connect: the first client in this shell
    assert bound_client(shell) is first
    shell.user_ns["cluster"] = cluster
    out = run(shell, "%%px\nimport os\nprint('engine says', 6 * 7)")
    assert "[stdout:0] engine says 42" in out and "[stdout:1] engine says 42" in out
    assert "[stdout:0]" in run(shell, "%px print('line magic')")
    run(shell, "%pxconfig --no-verbose")
    run(shell, "%%px --noblock -o later\nx = 5")
    run(shell, "%pxresult")
    # a second client does not take %px from the first, still open
    run(shell, "second = cluster.connect_client_sync()")
    second = shell.user_ns["second"]
    assert bound_client(shell) is first
    run(shell, "%load_ext ipyparallel_lite")  # after: harmless too
    assert bound_client(shell) is first and get_magics(shell).view.block is True
    # ... unless activated explicitly
    second.activate()
    assert bound_client(shell) is second
    second.close()
    # a client whose predecessor was closed takes over (ipyparallel would keep the dead one)
    run(shell, "third = cluster.connect_client_sync()")
    assert bound_client(shell) is shell.user_ns["third"]
    assert "[stdout:1] again" in run(shell, "%px print('again')")
    shell.user_ns["third"].close()


def test_start_and_connect_then_px_just_works(shell, own_cluster):
    # %autopx too: every cell goes to the engines until %autopx again
    run(shell, "import ipyparallel_lite as ipp\n"
               "c2 = ipp.Cluster(n=2)\nrc2 = c2.start_and_connect_sync()")
    try:
        assert bound_client(shell) is shell.user_ns["rc2"]
        run(shell, "%autopx")
        out = run(shell, "print('auto', 1 + 1)")
        run(shell, "%autopx")
        assert "[stdout:0] auto 2" in out and "[stdout:1] auto 2" in out
    finally:
        run(shell, "c2.stop_cluster_sync()")
