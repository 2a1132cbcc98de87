"""ipyparallel's module-level API on a real cluster: names, ``ipp.error``, ``@interactive``,
``Reference``, ``@remote``/``@parallel``, ``@require``, ``datapub``, joblib and
``bind_kernel``. Each test states what IPython parallel documents and checks it."""

from __future__ import annotations

import builtins
import concurrent.futures
import importlib
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import wait_until

import ipyparallel_lite as ipp

pytestmark = pytest.mark.timeout(120)


# ---- names ------------------------------------------------------------------------------------


def test_module_level_names_are_ipyparallels():
    from ipyparallel_lite.client.remotefunction import ParallelFunction, RemoteFunction
    from ipyparallel_lite.dependency import Dependency, depend, dependent, require
    from ipyparallel_lite.serialization import Reference, interactive

    assert (ipp.interactive, ipp.Reference) == (interactive, Reference)
    assert (ipp.require, ipp.depend, ipp.dependent, ipp.Dependency) == (require, depend, dependent, Dependency)
    assert (ipp.RemoteFunction, ipp.ParallelFunction) == (RemoteFunction, ParallelFunction)
    assert callable(ipp.remote) and callable(ipp.parallel) and callable(ipp.bind_kernel)
    assert callable(ipp.register_joblib_backend)
    assert ipp.ALL_COMPLETED == concurrent.futures.ALL_COMPLETED
    assert ipp.FIRST_COMPLETED == concurrent.futures.FIRST_COMPLETED
    assert ipp.FIRST_EXCEPTION == concurrent.futures.FIRST_EXCEPTION
    for name in ipp.__all__:
        assert getattr(ipp, name) is not None, name
    assert set(ipp.__all__) <= set(dir(ipp))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        ipp.no_such_name  # noqa: B018


def test_error_module_has_ipyparallels_classes_and_hierarchy():
    assert ipp.error is importlib.import_module("ipyparallel_lite.error")
    err = ipp.error
    hierarchy = {
        "KernelError": "IPythonError",
        "EngineError": "KernelError",
        "NoEnginesRegistered": "KernelError",
        "TaskAborted": "KernelError",
        "TaskTimeout": "KernelError",
        "TaskRejectError": "KernelError",
        "UnmetDependency": "KernelError",
        "ImpossibleDependency": "UnmetDependency",
        "DependencyTimeout": "ImpossibleDependency",
        "InvalidDependency": "ImpossibleDependency",
        "RemoteError": "KernelError",
        "CompositeError": "RemoteError",
        "AlreadyDisplayedError": "RemoteError",
    }
    for name, base in hierarchy.items():
        assert issubclass(getattr(err, name), getattr(err, base)), (name, base)
        assert getattr(ipp, name) is getattr(err, name)
    assert issubclass(err.IPythonError, Exception)
    assert err.TimeoutError is builtins.TimeoutError is ipp.TimeoutError
    for helper in ("collect_exceptions", "wrap_exception", "unwrap_exception"):
        assert callable(getattr(err, helper))


def test_error_classes_catch_what_engines_raise(rc, dv):
    with pytest.raises(ipp.error.CompositeError) as info:
        dv.apply_sync(lambda: 1 / 0)
    assert isinstance(info.value, ipp.error.RemoteError)
    assert {e[0] for e in info.value.elist} == {"ZeroDivisionError"}
    with pytest.raises(ipp.error.RemoteError, match=r"\[0:apply\]: ZeroDivisionError"):
        rc[0].apply_sync(lambda: 1 / 0)


# ---- @interactive in any module -------------------------------------------------------------------


HELPER_MODULE = '''
import ipyparallel_lite as ipp

scale = "module"

def helper():
    return "module helper"

def plain():
    return scale

@ipp.interactive
def interactive_read():
    return scale, helper()

@ipp.interactive
def interactive_write(value):
    global written_by_interactive
    written_by_interactive = value
'''


@pytest.fixture(scope="module")
def helper_module(tmp_path_factory, rc):
    """A real module, importable here and on the engines (like a package of the user's)."""
    folder = tmp_path_factory.mktemp("usermod")
    (folder / "ipp_lite_usermod.py").write_text(HELPER_MODULE)
    sys.path.insert(0, str(folder))
    rc[:].execute(f"import sys; sys.path.insert(0, {str(folder)!r})", block=True)
    try:
        yield importlib.import_module("ipp_lite_usermod")
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("ipp_lite_usermod", None)


def test_interactive_functions_of_a_module_use_the_engine_namespace(dv, helper_module):
    dv.push({"scale": "engine"})
    # without @interactive: sent by reference, the module's globals
    assert dv.apply_sync(helper_module.plain) == ["module", "module"]
    # with it: the engine's namespace; names the engine lacks come from the module
    assert dv.apply_sync(helper_module.interactive_read) == [("engine", "module helper")] * 2
    dv.apply_sync(helper_module.interactive_write, 7)
    assert dv.pull("written_by_interactive") == [7, 7]
    # and it still runs here, with its module's globals
    assert helper_module.interactive_read() == ("module", "module helper")


def test_interactive_functions_on_a_load_balanced_view(lview, dv, helper_module):
    dv.push({"scale": "engine"})
    assert lview.apply_sync(helper_module.interactive_read) == ("engine", "module helper")


# ---- Reference ----------------------------------------------------------------------------------


def echo(*args, **kwargs):
    return args, kwargs


def test_reference_resolves_anywhere_in_the_arguments(rc, dv, lview):
    dv.push({"ra": 1, "rb": "two"})
    args, kwargs = rc[0].apply_sync(
        echo, [ipp.Reference("ra"), {"deep": (ipp.Reference("rb"), [ipp.Reference("ra")])}],
        ipp.Reference("rb"), key=ipp.Reference("ra"), nested={"x": [ipp.Reference("rb")]})
    assert args == ([1, {"deep": ("two", [1])}], "two")
    assert kwargs == {"key": 1, "nested": {"x": ["two"]}}
    assert lview.apply_sync(echo, (ipp.Reference("ra"),)) == (((1,),), {})
    # each engine resolves its own value
    for eid in rc.ids:
        rc[eid]["mine"] = eid * 10
    assert dv.apply_sync(echo, ipp.Reference("mine")) == [((0,), {}), ((10,), {})]


def test_reference_as_the_function(dv, lview):
    dv.execute("def engine_side(x):\n    return ('engine', x)", block=True)
    assert dv.apply_sync(ipp.Reference("engine_side"), 3) == [("engine", 3)] * 2
    assert lview.apply_sync(ipp.Reference("engine_side"), 4) == ("engine", 4)
    dv.execute("def engine_side(x):\n    return ('redefined', x)", block=True)
    assert lview.apply_sync(ipp.Reference("engine_side"), 5) == ("redefined", 5)


def test_reference_to_a_missing_name_is_one_readable_error(rc, dv):
    with pytest.raises(ipp.RemoteError) as info:
        rc[1].apply_sync(echo, 1, [ipp.Reference("no_such_engine_name")])
    err = info.value
    assert err.ename == "NameError"
    assert "'no_such_engine_name' is not defined on this engine" in str(err)
    assert str(err).startswith("[1:apply]")  # names the engine
    assert err.engine_info["engine_id"] == 1
    assert "ipyparallel_lite/" not in (err.traceback or "")  # no frames of ours to wade through
    with pytest.raises(ipp.CompositeError, match=r"2 engines raised NameError.*no_such_fn"):
        dv.apply_sync(ipp.Reference("no_such_fn"))
    # the engines keep serving
    assert dv.apply_sync(echo, 1) == [((1,), {})] * 2


def test_reference_needs_a_name():
    with pytest.raises(TypeError, match="variable name"):
        ipp.Reference(42)


# ---- @remote / @parallel, @require --------------------------------------------------------------


def test_module_level_remote_and_parallel(dv, lview):
    @ipp.remote(dv)
    def where():
        import os

        return os.getpid()

    pids = where()
    assert len(set(pids)) == 2 and os.getpid() not in pids

    @ipp.remote(lview, block=False)
    def add(a, b):
        return a + b

    assert add(1, 2).get(10) == 3

    @ipp.parallel(dv)
    def double(x):
        return 2 * x

    assert double(range(6)) == [0, 2, 4, 6, 8, 10]
    assert double.map(range(3)) == [0, 2, 4]

    @ipp.parallel(lview, ordered=False, block=True)
    def triple(x):
        return 3 * x

    assert sorted(triple(range(8))) == [3 * x for x in range(8)]


def test_require_a_missing_module_is_a_clear_error(rc, lview):
    @ipp.require("no_such_module_ipp_lite")
    def needs_it():
        return 1

    with pytest.raises(ipp.RemoteError) as info:
        rc[0].apply_sync(needs_it)
    assert info.value.ename == "UnmetDependency"
    assert "no_such_module_ipp_lite" in str(info.value) and "cannot be imported" in str(info.value)
    # load-balanced: tried on every engine, then failed as impossible
    with pytest.raises(ipp.error.ImpossibleDependency):
        lview.apply_sync(needs_it)


# ---- datapub ------------------------------------------------------------------------------------


def publishes(steps):
    import time

    from ipyparallel_lite.datapub import publish_data

    for i in range(steps):
        publish_data({"step": i, "done": False})
        time.sleep(0.05)
    publish_data({"done": True})
    return steps


def test_publish_data_feeds_asyncresult_data(rc, dv, lview):
    ar = lview.apply_async(publishes, 4)
    seen = []
    while not ar.ready():
        if ar.data:
            seen.append(dict(ar.data))
        time.sleep(0.01)
    assert ar.get() == 4
    wait_until(lambda: ar.data.get("done"), what="the last published data")
    assert ar.data == {"step": 3, "done": True}
    assert seen and all(not d.get("done") for d in seen[:1])  # seen while it ran
    ar = dv.apply_async(publishes, 2)
    ar.get(30)
    wait_until(lambda: all(d.get("done") for d in ar.data), what="data of both engines")
    assert ar.data == [{"step": 1, "done": True}] * 2


def test_publish_data_from_an_execute_and_bad_input(dv):
    ar = dv.execute("from ipyparallel_lite.datapub import publish_data\npublish_data({'x': 1})",
                    block=False)
    ar.get(30)
    assert ar.data == [{"x": 1}, {"x": 1}]  # execute results wait for their iopub output
    with pytest.raises(RuntimeError, match="only works inside a task running on"):
        ipp.datapub.publish_data({"x": 1})
    with pytest.raises(TypeError, match="takes a dict"):
        ipp.datapub.publish_data([1])


# ---- joblib -------------------------------------------------------------------------------------


def pid_and_square(x):
    import os

    return os.getpid(), x * x


def fails_on_three(x):
    if x == 3:
        raise ValueError("three")
    return x


def test_joblib_backend_of_a_view_runs_on_the_engines(rc, lview):
    import joblib

    engine_pids = set(rc[:].apply_sync(os.getpid))
    lview.register_joblib_backend()
    with joblib.parallel_config(backend="ipyparallel_lite"):
        out = joblib.Parallel(n_jobs=-1)(joblib.delayed(pid_and_square)(i) for i in range(40))
    assert [sq for _, sq in out] == [i * i for i in range(40)]
    assert {pid for pid, _ in out} <= engine_pids
    # a DirectView registers too (its engines are load-balanced over), under the name given
    rc[:].register_joblib_backend(name="ipp_lite_direct")
    with joblib.parallel_config(backend="ipp_lite_direct"):
        assert joblib.Parallel()(joblib.delayed(pid_and_square)(i) for i in range(5))[4][1] == 16
        with pytest.raises(ipp.RemoteError, match="ValueError: three"):
            joblib.Parallel()(joblib.delayed(fails_on_three)(i) for i in range(6))


def test_joblib_backend_without_a_view_connects_to_the_default_cluster(own_cluster):
    import joblib

    _, rc = own_cluster(2, cluster_id="")  # the default profile's unnamed cluster
    engine_pids = set(rc[:].apply_sync(os.getpid))
    ipp.register_joblib_backend(name="ipp_lite_default")
    with joblib.parallel_config(backend="ipp_lite_default"):
        out = joblib.Parallel()(joblib.delayed(pid_and_square)(i) for i in range(10))
        again = joblib.Parallel()(joblib.delayed(pid_and_square)(i) for i in range(3))
    assert [sq for _, sq in out] == [i * i for i in range(10)] and len(again) == 3
    assert {pid for pid, _ in out} <= engine_pids


def test_register_joblib_backend_without_joblib_says_how_to_get_it():
    code = textwrap.dedent("""
        import sys
        sys.modules["joblib"] = None  # as if joblib were not installed
        import ipyparallel_lite as ipp
        try:
            ipp.register_joblib_backend()
        except ImportError as e:
            print("ImportError:", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert "ImportError: register_joblib_backend needs joblib" in out.stdout, out.stderr
    assert "pip install joblib" in out.stdout


# ---- bind_kernel --------------------------------------------------------------------------------


def test_bind_kernel_outside_an_engine_is_a_clear_error():
    with pytest.raises(RuntimeError, match="only works on an engine"):
        ipp.bind_kernel()


def test_bind_kernel_makes_an_engine_a_jupyter_kernel(own_cluster, tmp_path, monkeypatch):
    from jupyter_client import BlockingKernelClient

    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    cluster, rc = own_cluster(2)
    path = rc[0].apply_sync(ipp.bind_kernel)
    assert rc[0].apply_sync(ipp.bind_kernel) == path  # once per engine
    assert os.path.dirname(path) == str(tmp_path)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    info = json.load(open(path))
    assert info["ip"] == "127.0.0.1" and info["signature_scheme"] == "hmac-sha256"

    kc = BlockingKernelClient()
    kc.load_connection_file(path)
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=30)
        assert kc.is_alive()
        outputs = []
        reply = kc.execute_interactive("shared = 6 * 7\nprint('from the console', shared)",
                                       timeout=30, output_hook=outputs.append)
        assert reply["content"]["status"] == "ok"
        streams = "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream")
        assert "from the console 42" in streams
        assert any(m["msg_type"] == "status" for m in outputs)  # busy/idle, as consoles expect
        # one namespace: the cluster sees what the console did, and the other way round
        assert rc[0]["shared"] == 42
        rc[0]["from_cluster"] = "hello"
        reply = kc.execute_interactive("print(from_cluster)", timeout=30, output_hook=outputs.append)
        assert "hello" in "".join(m["content"].get("text", "") for m in outputs)
        complete = kc.complete("from_clu", 8, reply=True, timeout=30)
        assert "from_cluster" in complete["content"]["matches"]
    finally:
        kc.stop_channels()
    # the engine still serves the cluster, and the console's work did not disturb it
    assert rc[:].apply_sync(lambda: 1) == [1, 1]
    cluster.stop_cluster_sync()
    wait_until(lambda: not os.path.exists(path), what="the connection file removed at exit")
