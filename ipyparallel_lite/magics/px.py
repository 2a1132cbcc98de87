"""The parallel magics: ``%px``, ``%%px``, ``%autopx``, ``%pxresult`` and ``%pxconfig``.

A :class:`ParallelMagics` instance binds the magics to one DirectView. The first
``Client`` created in IPython, ``rc.activate()`` or ``view.activate(suffix)`` create it;
``%load_ext ipyparallel_lite`` registers an instance with no view yet, whose magics say
how to connect one.

Output of a blocking ``%px`` is shown while the engines produce it: the client's I/O
thread only *notes* that an iopub message arrived (``AsyncResult._output_listener``),
and the user's thread, waiting in the magic, renders what is new in the result's
metadata. Rendering from the metadata (append-only text and lists) instead of from the
messages makes it exactly-once even for output that arrived before the listener was
set, and keeps printing on the thread IPython and ipykernel expect it on.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import queue
import re
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

from IPython.core import magic_arguments
from IPython.core.error import UsageError
from IPython.core.magic import Magics, magics_class, no_var_expand

from ipyparallel_lite import error
from ipyparallel_lite.client.display import OutputRenderer
from ipyparallel_lite.client.progress import Progress

NO_VIEW = (
    "No active view for the parallel magics. Connect to a cluster first, e.g.\n"
    "    rc = ipp.Client()  # or: rc = ipp.Cluster(n=4).start_and_connect_sync()\n"
    "    rc.activate()"
)
NO_LAST_RESULT = "%pxresult shows the last %px result, and there is none yet: run %px first."

#: seconds the magic keeps showing output after interrupting the engines
INTERRUPT_GRACE = 3.0
#: how often a waiting magic looks at Ctrl-C and its progress line, in seconds
_POLL = 0.1
#: what the done-callback puts in the event queue to wake the waiting thread
_DONE = object()
#: iopub messages that streaming shows as they arrive (results wait for the end)
_LIVE = frozenset({"stream", "display_data", "update_display_data", "clear_output", "error"})


def _live_listener(events: queue.SimpleQueue) -> Callable[[str, dict], None]:
    """An ``AsyncResult._output_listener`` queueing what streaming shows, for the waiting thread.

    It runs on the client's I/O thread: it must be quick and never raise.
    """

    def listener(msg_id: str, msg: dict) -> None:
        if msg["header"]["msg_type"] in _LIVE:
            events.put((msg_id, msg))

    return listener


# ---- options -----------------------------------------------------------------------------


def _apply(decorators: list[Callable], f: Callable) -> Callable:
    """Apply ``decorators`` so that the options appear in the help in list order."""
    for deco in reversed(decorators):
        f = deco(f)
    return f


def _exec_options(f: Callable) -> Callable:
    """Options that say where and how a cell runs (``%px``, ``%%px``, ``%pxconfig``)."""
    arg = magic_arguments.argument
    return _apply([
        arg("-t", "--targets", type=str, default=None,
            help="engines to run on: an id (0), a list (0,2 or [0, 2]), a slice (::2) or all"),
        arg("-b", "--block", action="store_const", const=True, dest="block", default=None,
            help="wait for the engines and show their output (the default of rc.activate())"),
        arg("-a", "--noblock", action="store_const", const=False, dest="block",
            help="return an AsyncResult at once; %%pxresult shows the output later"),
        arg("--stream", action="store_const", const=True, dest="stream", default=None,
            help="show output as it arrives (the default, when blocking)"),
        arg("--no-stream", action="store_const", const=False, dest="stream",
            help="show output only once every engine is done, grouped"),
        arg("--verbose", action="store_const", const=True, dest="verbose", default=None,
            help="say which engines each execution runs on"),
        arg("--no-verbose", action="store_const", const=False, dest="verbose",
            help="don't say which engines each execution runs on"),
        arg("--progress-after", type=float, default=None, metavar="SECONDS",
            help="show a progress line after this many seconds of waiting (-1: never; default 2)"),
        arg("--signal-on-interrupt", type=str, default=None, metavar="SIG",
            help="signal sent to the engines on Ctrl-C (default SIGINT; 0: none, keep them running)"),
    ], f)


def _output_options(f: Callable) -> Callable:
    """Options that say how output is shown and kept (``%px``, ``%%px``, ``%pxresult``)."""
    arg = magic_arguments.argument
    return _apply([
        arg("-o", "--out", dest="save_name", type=str, default=None, metavar="NAME",
            help="also store the AsyncResult in the user namespace as NAME"),
        arg("--group-outputs", dest="groupby", type=str, default=None,
            choices=["type", "engine", "order"],
            help="how output not streamed is grouped: all stdout then all stderr then displays "
                 "(type), everything of one engine together (engine), or displays collated (order)"),
        arg("-r", dest="groupby", action="store_const", const="order", help="same as --group-outputs=order"),
        arg("-e", dest="groupby", action="store_const", const="engine", help="same as --group-outputs=engine"),
    ], f)


def _local_option(f: Callable) -> Callable:
    return magic_arguments.argument(
        "--local", action="store_true", default=False,
        help="also run the cell here, in this namespace, after sending it to the engines",
    )(f)


def _parse(parser: Any, argv: list[str] | str) -> Any:
    """Parsed options; a bad flag raises a UsageError that shows the usage line.

    No options at all (most calls) gives a copy of the parser's defaults, parsed once.
    """
    if not argv or (isinstance(argv, str) and not argv.strip()):
        defaults = _defaults.get(parser)
        if defaults is None:
            defaults = _defaults[parser] = parser.parse_args([])
        return argparse.Namespace(**vars(defaults))
    try:
        if isinstance(argv, str):
            return parser.parse_argstring(argv)
        return parser.parse_args(argv)
    except UsageError as e:
        raise UsageError(f"{e}\n{parser.format_usage().strip()}") from None


#: the options of each magic's parser when none are given (parsers live as long as the module)
_defaults: dict[Any, argparse.Namespace] = {}

#: flags of %px (line form) that take a value, for splitting flags from code
_VALUED_FLAGS = {"-t", "--targets", "-o", "--out", "--group-outputs", "--progress-after",
                 "--signal-on-interrupt"}
_SWITCHES = {"-b", "-a", "-r", "-e"}
_TOKEN = re.compile(r"\s*(\S+)")


def split_line_flags(line: str) -> tuple[list[str], str]:
    """``"-t 0 --no-stream print(1)"`` -> ``(["-t", "0", "--no-stream"], "print(1)")``.

    Flags lead the line. A token is a flag when it starts with ``--`` and a letter (an
    unknown one is then reported by the parser) or is one of the short flags; ``--``
    alone ends the flags, for code that itself starts with a dash.
    """
    if not line.lstrip().startswith("-"):  # every flag starts with a dash
        return [], line.strip()
    argv: list[str] = []
    pos = 0
    while True:
        m = _TOKEN.match(line, pos)
        if m is None:
            break
        token = m.group(1)
        if token == "--":
            pos = m.end()
            break
        name = token.split("=", 1)[0]
        is_flag = (re.match(r"--[A-Za-z]", token) is not None or token in _SWITCHES
                   or name in _VALUED_FLAGS or re.fullmatch(r"-[to]\S+", token) is not None)
        if not is_flag:
            break
        argv.append(token)
        pos = m.end()
        if name in _VALUED_FLAGS and "=" not in token:
            value = _TOKEN.match(line, pos)
            if value is not None:
                argv.append(value.group(1))
                pos = value.end()
    return argv, line[pos:].strip()


def parse_targets(text: str, client: Any) -> Any:
    """Engine targets from ``-t`` text: ``all``, ``0``, ``-1``, ``0,2``, ``[0, 2]``, ``::2``.

    Returns what a view takes as targets (``"all"``, an int, or a list of ints); engines
    that are not registered raise a UsageError naming the registered ones.
    """
    text = text.strip().strip("'\"")
    if text == "all":
        return "all"
    if ":" in text and not text.startswith(("[", "(")):
        try:
            bounds = [int(p) if p.strip() else None for p in text.split(":")]
            if len(bounds) > 3:
                raise ValueError(text)
            return client.ids[slice(*bounds)]
        except ValueError:
            raise UsageError(f"bad targets {text!r}: a slice looks like 1: or ::2") from None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise UsageError(
            f"bad targets {text!r}: use an engine id, a list of ids (0,2), a slice (::2) or all"
        ) from None
    if isinstance(value, tuple | list | range):
        value = list(value)
    check_targets(client, value)
    return value


def check_targets(client: Any, targets: Any) -> list[int]:
    """The engine ids of ``targets``; a UsageError when some are not registered."""
    try:
        return client.resolve_targets(targets)
    except (error.KernelError, TypeError, RuntimeError) as e:
        raise UsageError(str(e)) from None


def parse_signal(text: str) -> int:
    """A signal number from ``SIGINT``, ``INT``, ``2`` or ``0`` (0: send none)."""
    text = text.strip()
    try:
        if text.lstrip("-").isdigit():
            number = int(text)
            return 0 if number == 0 else signal.Signals(number)
        name = text.upper()
        return signal.Signals[name if name.startswith("SIG") else "SIG" + name]
    except (ValueError, KeyError):
        raise UsageError(
            f"unknown signal {text!r}: use a name (SIGINT, SIGTERM, SIGKILL), a number, or 0 for none"
        ) from None


# ---- errors shown without our traceback ----------------------------------------------------


class ParallelMagicError(Exception):
    """An error of a %px cell shown as its own lines, without a (local) traceback."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines

    def _render_traceback_(self) -> list[str]:
        # IPython shows these lines instead of a traceback of the magic's internals
        return self.lines


class CellSyntaxError(ParallelMagicError):
    """The cell does not parse: it was not sent to the engines."""

    def __init__(self, err: SyntaxError):
        text = "".join(traceback.format_exception_only(type(err), err))
        super().__init__(text.rstrip("\n").split("\n"))
        self.syntax_error = err


_transformer_manager: Any = None
#: cells that parsed as plain Python, oldest first: a cell run again (a %px in a
#: loop, a re-run notebook cell) is not parsed again
_valid_cells: dict[str, None] = {}
_VALID_CELLS, _VALID_CELL_CHARS = 256, 10_000


def check_syntax(code: str) -> None:
    """Raise CellSyntaxError if ``code``, an IPython cell, is not valid syntax.

    The cell is transformed as IPython would (magics, ``!shell``, ``?``) and parsed
    with top-level ``await`` allowed, so only real syntax errors are caught. Anything
    else unusual is left for the engines to report.
    """
    global _transformer_manager
    if code in _valid_cells:
        return
    flags = ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    try:  # most cells are plain Python, and parse in a fraction of a transform's time
        compile(code, "<%px cell>", "exec", flags=flags, dont_inherit=True)
    except Exception:
        pass
    else:
        if len(code) <= _VALID_CELL_CHARS:
            if len(_valid_cells) >= _VALID_CELLS:
                _valid_cells.pop(next(iter(_valid_cells)))
            _valid_cells[code] = None
        return
    if _transformer_manager is None:
        from IPython.core.inputtransformer2 import TransformerManager

        # a manager of our own: the shell's may hold the %autopx transformer
        _transformer_manager = TransformerManager()
    try:
        source = _transformer_manager.transform_cell(code)
        compile(source, "<%px cell>", "exec", flags=flags, dont_inherit=True)
    except SyntaxError as e:
        raise CellSyntaxError(e) from None
    except Exception:  # e.g. NUL bytes: the engines will say what is wrong
        return


def raise_remote_errors(ar: Any) -> None:
    """Raise the errors of a finished request in a form IPython shows compactly.

    Remote errors render themselves (a CompositeError: a summary plus the first
    traceback); other failures (e.g. an aborted request) become one line.
    """
    try:
        ar.get()
    except error.RemoteError:
        raise
    except (error.KernelError, error.TimeoutError) as e:
        raise ParallelMagicError([f"{type(e).__name__}: {e}"]) from None


# ---- showing output ------------------------------------------------------------------------


# ---- %autopx -----------------------------------------------------------------------------


_MAGIC_CALL = re.compile(r"\s*%%?(\w+)")


class AutoPxTransformer:
    """An input transformer sending every cell to ``%%px``, except calls of our magics.

    A cell starting with one of the parallel magics (``%autopx`` to leave the mode,
    ``%%px -t 0``, ``%pxresult``...) runs here as typed: the engines have no such magics.
    ``has_side_effects`` keeps IPython from using the transformer to decide whether
    typed input is complete: that is still judged on the code as typed.
    """

    has_side_effects = True

    def __init__(self, shell: Any, px_name: str):
        self.shell = shell
        self.px_name = px_name

    def _is_ours(self, first_line: str) -> bool:
        m = _MAGIC_CALL.match(first_line)
        if m is None:
            return False
        kind = "cell" if first_line.lstrip().startswith("%%") else "line"
        magic = self.shell.magics_manager.magics[kind].get(m.group(1))
        return isinstance(getattr(magic, "__self__", None), ParallelMagics)

    def __call__(self, lines: list[str]) -> list[str]:
        cell = "".join(lines)
        first = cell.lstrip("\n").split("\n", 1)[0]
        if not cell.strip() or self._is_ours(first):
            return lines
        return [f"get_ipython().run_cell_magic({self.px_name!r}, '', {cell!r})\n"]


# ---- the magics ----------------------------------------------------------------------------


@magics_class
class ParallelMagics(Magics):
    """``%px``, ``%%px``, ``%autopx``, ``%pxresult``, ``%pxconfig`` (each + ``suffix``) on a view.

    ``view`` may be None (after ``%load_ext`` alone): every magic then raises a
    UsageError saying how to connect. Settings made with ``%pxconfig`` stay with the
    instance when a new view is bound to it.
    """

    def __init__(self, shell: Any, view: Any = None, suffix: str = ""):
        super().__init__(shell=shell)
        self.view = view
        self.suffix = suffix
        self.last_result: Any = None
        self.verbose = False
        self.stream = True
        self.progress_after = 2.0
        self.signal_on_interrupt: int = signal.SIGINT
        self.groupby = "type"
        self._autopx: AutoPxTransformer | None = None
        self.magics["line"].update({
            f"px{suffix}": self.px,
            f"autopx{suffix}": self.autopx,
            f"pxresult{suffix}": self.pxresult,
            f"pxconfig{suffix}": self.pxconfig,
        })
        if not suffix:
            self.magics["line"]["result"] = self.pxresult  # IPython parallel's old name
        self.magics["cell"][f"px{suffix}"] = self.cell_px

    # ---- the magics themselves ----

    @no_var_expand
    @magic_arguments.magic_arguments(name="px")
    @_local_option
    @_output_options
    @_exec_options
    def px(self, line: str = "") -> Any:
        """Run one line of code on the engines: ``%px [options] CODE``.

        Options come first (``%px -t 0 print(1)``); put ``--`` before code that itself
        starts with a dash. Blocking (the default after ``rc.activate()``), it shows the
        engines' output as it arrives and raises their errors; with ``-a`` it returns an
        AsyncResult at once.
        """
        argv, code = split_line_flags(line)
        args = _parse(self.px.parser, argv)
        if not code:
            raise UsageError(f"%px{self.suffix} needs code to run, e.g. %px{self.suffix} import os")
        return self._execute(code, args)

    @magic_arguments.magic_arguments(name="px")
    @_local_option
    @_output_options
    @_exec_options
    def cell_px(self, line: str = "", cell: str | None = None) -> Any:
        """Run the cell on the engines: ``%%px [options]``.

        Blocking (the default after ``rc.activate()``), it shows the engines' output as
        it arrives and raises their errors; with ``-a`` it returns an AsyncResult at
        once. ``--local`` also runs the cell here.
        """
        args = _parse(self.cell_px.parser, line)
        return self._execute(cell or "", args)

    @magic_arguments.magic_arguments(name="pxconfig")
    @magic_arguments.argument(
        "--group-outputs", dest="groupby", type=str, default=None, choices=["type", "engine", "order"],
        help="how output not streamed is grouped by default")
    @_exec_options
    def pxconfig(self, line: str = "") -> None:
        """Set the defaults of this view's magics; with no option, print them.

        Nothing changes unless every option given is valid.
        """
        args = _parse(self.pxconfig.parser, line)
        if all(value is None for value in vars(args).values()):
            print(self._describe_config())
            return
        sig = None if args.signal_on_interrupt is None else parse_signal(args.signal_on_interrupt)
        if args.targets is not None or args.block is not None:
            view = self._active_view()
            if args.targets is not None:
                view.targets = parse_targets(args.targets, view.client)
            if args.block is not None:
                view.block = args.block
        for name, value in (("verbose", args.verbose), ("stream", args.stream),
                            ("progress_after", args.progress_after), ("groupby", args.groupby),
                            ("signal_on_interrupt", sig)):
            if value is not None:
                setattr(self, name, value)

    @magic_arguments.magic_arguments(name="pxresult")
    @_output_options
    def pxresult(self, line: str = "") -> None:
        """Show the output of the last ``%px`` (waiting for it) and raise its errors."""
        args = _parse(self.pxresult.parser, line)
        ar = self.last_result
        if ar is None:
            raise UsageError(NO_LAST_RESULT)
        if args.save_name:
            self.shell.user_ns[args.save_name] = ar
            return
        events: queue.SimpleQueue = queue.SimpleQueue()
        ar.add_done_callback(lambda _: events.put(_DONE))
        try:
            self._wait(ar, events, None, self.progress_after)
        except KeyboardInterrupt:
            print("KeyboardInterrupt: stopped waiting; the engines keep running.", file=sys.stderr)
            return
        OutputRenderer(ar).show_rest(args.groupby or self.groupby)
        raise_remote_errors(ar)

    def autopx(self, line: str = "") -> None:
        """Toggle auto-parallel mode: every cell then runs on the engines, as with %%px.

        Cells that start with a parallel magic (``%%px -t 0``, ``%pxresult``...) still
        run here. Type ``%autopx`` again to come back.
        """
        if self._autopx is not None:
            self._disable_autopx()
            print(f"%autopx{self.suffix} disabled")
            return
        self._active_view()
        self._autopx = AutoPxTransformer(self.shell, f"px{self.suffix}")
        self.shell.input_transformers_cleanup.append(self._autopx)
        print(f"%autopx{self.suffix} enabled: cells run on the engines; %autopx{self.suffix} again to stop")

    def _disable_autopx(self) -> None:
        transforms = self.shell.input_transformers_cleanup
        if self._autopx in transforms:
            transforms.remove(self._autopx)
        self._autopx = None

    # ---- running a cell ----

    def _active_view(self) -> Any:
        if self.view is None:
            raise UsageError(NO_VIEW)
        if self.view.client.closed:
            raise UsageError(
                "The client of the active view is closed (its cluster stopped?). "
                "Connect again and call rc.activate()."
            )
        return self.view

    def _describe_config(self) -> str:
        view = self.view
        where = "no active view" if view is None else f"targets={view.targets!r}, block={view.block}"
        sig = self.signal_on_interrupt
        return (f"%px{self.suffix}: {where}, stream={self.stream}, verbose={self.verbose}, "
                f"group_outputs={self.groupby}, progress_after={self.progress_after}, "
                f"signal_on_interrupt={signal.Signals(sig).name if sig else 0}")

    def _execute(self, code: str, args: Any) -> Any:
        """Send ``code`` to the engines as ``args`` say; the AsyncResult if not blocking."""
        view = self._active_view()
        targets = view.targets if args.targets is None else parse_targets(args.targets, view.client)
        ids = check_targets(view.client, targets)
        sig = self.signal_on_interrupt if args.signal_on_interrupt is None else parse_signal(
            args.signal_on_interrupt)
        block = view.block if args.block is None else args.block
        stream = self.stream if args.stream is None else args.stream
        progress_after = self.progress_after if args.progress_after is None else args.progress_after
        check_syntax(code)
        if self.verbose if args.verbose is None else args.verbose:
            print(f"{'Parallel' if block else 'Async parallel'} execution on engine(s): "
                  f"{'all' if targets == 'all' else ids}")
        events: queue.SimpleQueue = queue.SimpleQueue()
        live = block and stream
        ar = self._submit(view, code, targets, _live_listener(events) if live else None)
        renderer = OutputRenderer(ar, streaming=live)
        if block:
            ar.add_done_callback(lambda _: events.put(_DONE))
        self.last_result = ar
        if args.save_name:
            self.shell.user_ns[args.save_name] = ar
        if args.local:
            self._run_local(code)
        if not block:
            return ar
        self._wait_and_show(ar, events, renderer, stream=stream, groupby=args.groupby or self.groupby,
                            progress_after=progress_after, sig=sig)
        return None

    def _submit(self, view: Any, code: str, targets: Any, listener: Callable | None) -> Any:
        try:
            ar = view._execute(code, silent=False, targets=targets, listener=listener)
        except (error.KernelError, RuntimeError, TypeError) as e:
            raise UsageError(str(e)) from None
        ar._fname = "%px"  # names the request in error summaries
        return ar

    def _run_local(self, code: str) -> None:
        """Run ``code`` in this shell too, not re-sent to the engines by %autopx."""
        ours = [t for t in self.shell.input_transformers_cleanup if isinstance(t, AutoPxTransformer)]
        for t in ours:
            self.shell.input_transformers_cleanup.remove(t)
        try:
            self.shell.run_cell(code, store_history=False)
        finally:
            self.shell.input_transformers_cleanup.extend(ours)

    def _wait_and_show(self, ar: Any, events: queue.SimpleQueue, renderer: OutputRenderer, *,
                       stream: bool, groupby: str, progress_after: float, sig: int) -> None:
        live = renderer if stream else None
        try:
            self._wait(ar, events, live, progress_after)
        except KeyboardInterrupt:
            self._interrupted(ar, events, live, sig)
            renderer.show_rest(groupby)
            return
        finally:
            ar._output_listener = None
        renderer.show_rest(groupby)
        raise_remote_errors(ar)

    def _wait(self, ar: Any, events: queue.SimpleQueue, renderer: OutputRenderer | None,
              progress_after: float | None, timeout: float | None = None) -> bool:
        """Wait for ``ar``, showing streamed output and, after a while, progress.

        True if ``ar`` finished, False if ``timeout`` seconds passed first.
        """
        start = time.monotonic()
        with contextlib.ExitStack() as stack:
            bar: Progress | None = None
            while not ar.done():
                now = time.monotonic()
                if timeout is not None and now - start >= timeout:
                    return False
                if bar is None and progress_after is not None and 0 <= progress_after <= now - start:
                    bar = stack.enter_context(Progress(total=len(ar.msg_ids), label="%px", unit="engines"))
                if bar is not None:
                    bar.update(ar.progress)
                try:
                    item = events.get(timeout=_POLL)
                except queue.Empty:
                    continue
                if item is not _DONE and renderer is not None:
                    renderer.on_event(*item)
            if bar is not None:
                bar.update(ar.progress, force=True)
        while True:  # what arrived with the last messages
            try:
                item = events.get_nowait()
            except queue.Empty:
                return True
            if item is not _DONE and renderer is not None:
                renderer.on_event(*item)

    def _interrupted(self, ar: Any, events: queue.SimpleQueue, renderer: OutputRenderer | None,
                     sig: int) -> None:
        """Ctrl-C while waiting: signal the engines still running, show what they say."""
        running = [md["engine_id"] for md in ar._metadata_list() if md.get("status") is None]
        if not running:
            return
        if not sig:
            print(f"KeyboardInterrupt: stopped waiting; engine(s) {running} keep running "
                  f"(%pxresult{self.suffix} shows their output).", file=sys.stderr)
            return
        name = signal.Signals(sig).name
        try:
            ar._client.send_signal(sig, targets=running)
        except Exception as e:  # an engine gone meanwhile: say so, don't hide the interrupt
            print(f"KeyboardInterrupt: could not send {name} to engine(s) {running}: {e}",
                  file=sys.stderr)
            return
        print(f"KeyboardInterrupt: sent {name} to engine(s) {running}", file=sys.stderr)
        try:
            self._wait(ar, events, renderer, progress_after=None, timeout=INTERRUPT_GRACE)
        except KeyboardInterrupt:
            pass


# ---- registration ----------------------------------------------------------------------------


def get_magics(shell: Any, suffix: str = "") -> ParallelMagics:
    """The ParallelMagics of ``shell`` for ``suffix``, created and registered if new.

    The instance is found through the magic it registered (``%px{suffix}``), so the
    shell alone holds the state, and activating again keeps ``%pxconfig`` settings.
    """
    current = shell.magics_manager.magics["cell"].get(f"px{suffix}")
    magics = getattr(current, "__self__", None)
    if not isinstance(magics, ParallelMagics):
        magics = ParallelMagics(shell, None, suffix)
    # (re-)register: some of the names may have been taken by other magics meanwhile
    shell.magics_manager.register(magics)
    return magics


def activate_view(view: Any, suffix: str = "", shell: Any = None) -> ParallelMagics | None:
    """Bind the magics (``%px{suffix}``...) of ``shell`` (default: the running one) to ``view``.

    Outside IPython there is nothing to register: a warning says so and None is returned.
    """
    if shell is None:
        from IPython import get_ipython

        shell = get_ipython()
    if shell is None:
        warnings.warn("The parallel magics (%px...) only work inside IPython or Jupyter.",
                      RuntimeWarning, stacklevel=3)
        return None
    magics = get_magics(shell, suffix)
    magics.view = view
    return magics


def activate_if_unbound(shell: Any, client: Any) -> None:
    """``client.activate()`` (``%px`` on all its engines, blocking) unless the unsuffixed
    magics of ``shell`` are bound to a view of another client that is still open."""
    current = shell.magics_manager.magics["cell"].get("px")
    magics = getattr(current, "__self__", None)
    if isinstance(magics, ParallelMagics) and magics.view is not None \
            and not magics.view.client.closed:
        return
    client.activate()


def load_ipython_extension(shell: Any) -> None:
    """``%load_ext ipyparallel_lite``: register the magics (bound to no view until activate)."""
    get_magics(shell, "")
