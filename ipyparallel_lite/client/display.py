"""Showing what engines printed and displayed: ``[stdout:N]`` text and rich outputs.

:class:`OutputRenderer` serves ``%px`` (streaming, then the rest) and
``AsyncResult.display_outputs`` (everything at once).

A line an engine redraws with ``\r`` (a progress line, a tqdm bar) is one labelled line
per engine that updates in place: in a notebook an updatable display per engine, in a
terminal a block of lines at the bottom rewritten with ANSI cursor moves. Shown all at
once, such a line is its final state.
"""

from __future__ import annotations

import sys
import uuid
from typing import Any

from IPython import get_ipython
from IPython.display import clear_output
from IPython.display import publish_display_data as _publish_in_ipython

#: iopub messages that are shown as outputs (errors are raised at the end instead)
_SHOWN_OUTPUTS = ("display_data", "execute_result")


def publish_display_data(data: dict, **kwargs: Any) -> None:
    """IPython's ``publish_display_data`` inside IPython; elsewhere (a script) the text:
    IPython's would create an InteractiveShell singleton just to print it."""
    if get_ipython() is not None:
        _publish_in_ipython(data, **kwargs)
    elif not kwargs.get("update"):
        print(data.get("text/plain", ""), flush=True)


def _in_notebook() -> bool:
    """Whether output goes to a Jupyter frontend (a kernel's shell), not a terminal."""
    return getattr(get_ipython(), "kernel", None) is not None


#: ANSI: cursor up to the start of a line N lines above; erase to the end of the line
_UP = "\x1b[{}F"
_ERASE = "\x1b[K"


def final_lines(text: str) -> str:
    """``text`` as a terminal leaves it: of a line redrawn with ``\r``, its last state."""
    if "\r" not in text:
        return text
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.replace("\r\n", "\n").split("\n"))


def display_outputs(ar: Any, groupby: str = "type", result_only: bool = False) -> None:
    """Show each engine's stdout and stderr with an ``[stdout:N]`` prefix, then its outputs.

    ``groupby``: ``"type"`` (all stdout, then all stderr, then outputs), ``"engine"``
    (everything of one engine together) or ``"order"`` (outputs interleaved by engine).
    ``result_only``: only the results (``Out[N:count]``), when the rest was streamed.
    """
    if groupby not in ("type", "engine", "order"):
        raise ValueError(f"groupby must be 'type', 'engine' or 'order', not {groupby!r}")
    # a streaming renderer's show_rest shows the results only: the rest was streamed
    OutputRenderer(ar, streaming=result_only).show_rest(groupby)


class OutputRenderer:
    """Shows what the engines of one request printed and displayed, each piece once.

    Streaming (``streaming=True``): ``on_event`` shows each iopub message as it arrives
    (the messages themselves, fed in order from the moment the request was sent):
    stream text, displays, display updates, ``clear_output`` and a one-line note per
    error; ``show_rest`` then adds the results, in engine order. Otherwise ``show_rest``
    shows everything the result's metadata holds, grouped by ``type``, ``engine`` or
    ``order``. Engine stdout/stderr is prefixed ``[stdout:N]``/``[stderr:N]``, displays
    follow an ``[output:N]`` line, and results read ``Out[N:count]``.

    An engine's ``clear_output`` clears the output area here, as a local cell's would;
    in a notebook the other engines' output since their own last clear is shown again,
    so one engine's progress display does not wipe the others'.
    """

    def __init__(self, ar: Any, streaming: bool = False):
        self._ar = ar
        self._streaming = streaming
        self._mds = dict(zip(ar.msg_ids, ar._metadata_list()))
        self._shown = {m: {"stdout": 0, "stderr": 0, "outputs": 0} for m in ar.msg_ids}
        self._prefix: dict[str, str | None] = {"stdout": None, "stderr": None}
        self._line_start = {"stdout": True, "stderr": True}
        self._output_engine: Any = None
        #: streaming in a notebook: each request's messages shown since its engine's last
        #: clear_output, to show again when another engine clears the output area
        self._notebook = _in_notebook()
        self._redraw = streaming and self._notebook
        self._live: dict[str, list[dict]] = {m: [] for m in ar.msg_ids}
        #: lines redrawn with \r, by (msg_id, stream name): the unfinished text so far,
        #: and where each is shown (a display id in a notebook, a row of the terminal block)
        self._partial: dict[tuple[str, str], str] = {}
        self._displays: dict[tuple[str, str], str] = {}
        self._block: list[list[str]] = []  # [stream name, text] per row, bottom of the terminal
        self._rows: dict[tuple[str, str], int] = {}

    # ---- streaming ----

    def on_event(self, msg_id: str, msg: dict) -> None:
        """Show iopub message ``msg`` of ``msg_id``, which just arrived."""
        if msg_id not in self._mds:
            return
        kind, content = msg["header"]["msg_type"], msg["content"]
        if kind == "clear_output":
            self._clear(msg_id, bool(content.get("wait")))
        elif kind == "update_display_data":
            publish_display_data(content.get("data", {}), metadata=content.get("metadata", {}),
                                 transient=content.get("transient", {}), update=True)
        elif kind == "error":
            self._note_error(msg_id, content)
        elif self._show_live(msg_id, msg) and self._redraw:
            self._live[msg_id].append(msg)

    def _show_live(self, msg_id: str, msg: dict) -> bool:
        kind, content = msg["header"]["msg_type"], msg["content"]
        if kind == "stream" and content.get("name") in self._prefix:
            self._write(msg_id, content["name"], content.get("text", ""))
            return True
        if kind == "display_data":
            self._show_output(msg_id, msg)
            return True
        return False

    def _clear(self, msg_id: str, wait: bool) -> None:
        self._live[msg_id] = []
        self._partial = {}  # rebuilt below from the messages shown again
        self._displays = {}  # the clear removed them
        self._end_lines()
        clear_output(wait=wait)
        self._prefix = {"stdout": None, "stderr": None}
        self._output_engine = None
        if self._redraw:
            for other, shown in self._live.items():
                for msg in shown:
                    self._show_live(other, msg)

    def _note_error(self, msg_id: str, content: dict) -> None:
        """One line as an engine fails; the whole error is raised when all are done."""
        self._end_block()
        self._end_lines()
        eid = self._mds[msg_id]["engine_id"]
        print(f"[{eid}:execute] {content.get('ename')}: {content.get('evalue')}", file=sys.stderr, flush=True)
        self._prefix = {"stdout": None, "stderr": None}

    # ---- all at once ----

    def show_rest(self, groupby: str = "type") -> None:
        """Show everything not shown yet, grouped by ``type``, ``engine`` or ``order``."""
        ids = self._ar.msg_ids
        if self._streaming:  # everything else was shown as it arrived
            for m in ids:
                result = self._mds[m].get("execute_result")
                if result is not None:
                    self._show_output(m, {"header": {"msg_type": "execute_result"}, "content": result})
            return
        if groupby == "engine":
            for m in ids:
                self._stream(m, "stdout")
                self._stream(m, "stderr")
                for out in self._take_outputs(m):
                    self._show_output(m, out)
            return
        for name in ("stdout", "stderr"):
            for m in ids:
                self._stream(m, name)
        pending = {m: self._take_outputs(m) for m in ids}
        displays = {m: [o for o in outs if o["header"]["msg_type"] == "display_data"]
                    for m, outs in pending.items()}
        if groupby == "order":
            # the first display of every engine, then the second of every engine...
            for i in range(max((len(d) for d in displays.values()), default=0)):
                for m in ids:
                    if i < len(displays[m]):
                        self._show_output(m, displays[m][i])
        else:
            for m in ids:
                for out in displays[m]:
                    self._show_output(m, out)
        for m in ids:
            for out in pending[m]:
                if out["header"]["msg_type"] == "execute_result":
                    self._show_output(m, out)

    # ---- pieces ----

    def _stream(self, msg_id: str, name: str) -> None:
        md, shown = self._mds[msg_id], self._shown[msg_id]
        text = (md.get(name) or "")[shown[name]:]
        shown[name] += len(text)
        self._write(msg_id, name, final_lines(text))

    def _write(self, msg_id: str, name: str, text: str) -> None:
        if not text:
            return
        key = (msg_id, name)
        if self._streaming and ("\r" in text or key in self._partial):
            self._write_redrawn(msg_id, name, text.replace("\r\n", "\n"))
            return
        prefix = f"[{name}:{self._mds[msg_id]['engine_id']}] "
        head = ""
        if prefix != self._prefix[name]:
            # a new source: start a line of its own, headed by the prefix
            head = ("" if self._line_start[name] else "\n") + prefix
            self._prefix[name] = prefix
        self._line_start[name] = text.endswith("\n")
        out = sys.stdout if name == "stdout" else sys.stderr
        if self._block:  # printed above the redrawn rows, which follow it again
            block_out = self._block_stream()
            block_out.write(_UP.format(len(self._block)))
            block_out.flush()
            out.write((head + text).rstrip("\n").replace("\n", _ERASE + "\n") + _ERASE + "\n")
            out.flush()
            self._line_start[name] = True
            self._draw_block(block_out)
            return
        out.write(head + text)
        out.flush()

    # ---- lines redrawn with \r ----

    def _write_redrawn(self, msg_id: str, name: str, text: str) -> None:
        key = (msg_id, name)
        *finished, rest = (self._partial.pop(key, "") + text).split("\n")
        for line in finished:
            self._show_line(msg_id, name, line.rsplit("\r", 1)[-1], final=True)
        if rest:
            self._partial[key] = rest
            self._show_line(msg_id, name, rest.rsplit("\r", 1)[-1], final=False)

    def _show_line(self, msg_id: str, name: str, text: str, final: bool) -> None:
        """Show the current state of an engine's redrawn line; ``final``: it is done."""
        key = (msg_id, name)
        label = f"[{name}:{self._mds[msg_id]['engine_id']}] {text}"
        if self._notebook:
            display_id = self._displays.pop(key, None)
            new = display_id is None
            if new:
                self._end_lines()
                self._prefix = {"stdout": None, "stderr": None}
                display_id = uuid.uuid4().hex
            publish_display_data({"text/plain": label}, transient={"display_id": display_id},
                                 update=not new)
            if not final:
                self._displays[key] = display_id
            return
        row = self._rows.get(key)
        if row is None:
            if self._block and self._block[0][0] != name:
                self._end_block()  # one block per stream: the cursor moves within one
            self._end_lines()
            self._prefix = {"stdout": None, "stderr": None}
            self._rows[key] = len(self._block)
            self._block.append([name, label])
            out = self._block_stream()
            out.write(label + "\n")
            out.flush()
        else:
            self._block[row][1] = label
            out = self._block_stream()
            out.write(_UP.format(len(self._block)))
            self._draw_block(out)
        if final:
            del self._rows[key]  # the row stays as it is; a new line of this engine goes below

    def _block_stream(self) -> Any:
        return sys.stdout if self._block[0][0] == "stdout" else sys.stderr

    def _draw_block(self, out: Any) -> None:
        """Write the redrawn rows from where the cursor is (the block's first row)."""
        out.write("".join(f"{line}{_ERASE}\n" for _, line in self._block))
        out.flush()

    def _end_block(self) -> None:
        """Other output follows: the redrawn rows so far stay where they are."""
        self._block = []
        self._rows = {}

    def _take_outputs(self, msg_id: str) -> list[dict]:
        """Displays and results of ``msg_id`` not shown yet."""
        outputs = self._mds[msg_id]["outputs"]
        shown = self._shown[msg_id]
        taken = [out for out in outputs[shown["outputs"]:] if out["header"]["msg_type"] in _SHOWN_OUTPUTS]
        shown["outputs"] = len(outputs)
        return taken

    def _end_lines(self) -> None:
        """Finish pending stream lines, so that what comes next never lands mid-line."""
        for name, out in (("stdout", sys.stdout), ("stderr", sys.stderr)):
            if not self._line_start[name]:
                out.write("\n")
                self._line_start[name] = True
            out.flush()

    def _show_output(self, msg_id: str, msg: dict) -> None:
        eid = self._mds[msg_id]["engine_id"]
        content = msg["content"]
        self._end_block()
        self._end_lines()
        self._prefix = {"stdout": None, "stderr": None}
        metadata = {**(content.get("metadata") or {}), "engine": eid}
        data = dict(content.get("data") or {})
        if msg["header"]["msg_type"] == "execute_result":
            text = data.get("text/plain", "")
            prompt = f"Out[{eid}:{content.get('execution_count', '?')}]: "
            data["text/plain"] = prompt + ("\n" if "\n" in text else "") + text
            publish_display_data(data, metadata=metadata)
            self._output_engine = None
            return
        if self._output_engine != eid:
            print(f"[output:{eid}]", flush=True)
            self._output_engine = eid
        kwargs = {"transient": content["transient"]} if content.get("transient") else {}
        publish_display_data(data, metadata=metadata, **kwargs)
