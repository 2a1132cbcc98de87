"""Showing what engines printed and displayed: ``[stdout:N]`` text and rich outputs.

:class:`OutputRenderer` serves ``%px`` (streaming, then the rest) and
``AsyncResult.display_outputs`` (everything at once).
"""

from __future__ import annotations

import sys
from typing import Any

from IPython.display import publish_display_data

#: iopub messages that are shown as outputs (errors are raised at the end instead)
_SHOWN_OUTPUTS = ("display_data", "execute_result")


def display_outputs(ar: Any, groupby: str = "type") -> None:
    """Show each engine's stdout and stderr with an ``[stdout:N]`` prefix, then its outputs.

    ``groupby``: ``"type"`` (all stdout, then all stderr, then outputs), ``"engine"``
    (everything of one engine together) or ``"order"`` (outputs interleaved by engine).
    """
    if groupby not in ("type", "engine", "order"):
        raise ValueError(f"groupby must be 'type', 'engine' or 'order', not {groupby!r}")
    OutputRenderer(ar).show_rest(groupby)


class OutputRenderer:
    """Shows what the engines of one request printed and displayed, each piece once.

    ``on_event`` shows what is new after an iopub message (streaming); ``show_rest``
    shows everything not shown yet, grouped by ``type``, ``engine`` or ``order``.
    Engine stdout/stderr is prefixed ``[stdout:N]``/``[stderr:N]``, displays follow an
    ``[output:N]`` line, and results read ``Out[N:count]``.
    """

    def __init__(self, ar: Any):
        self._ar = ar
        self._mds = dict(zip(ar.msg_ids, ar._metadata_list()))
        self._shown = {m: {"stdout": 0, "stderr": 0, "outputs": 0} for m in ar.msg_ids}
        self._prefix: dict[str, str | None] = {"stdout": None, "stderr": None}
        self._line_start = {"stdout": True, "stderr": True}
        self._output_engine: Any = None

    # ---- streaming ----

    def on_event(self, msg_id: str, msg: dict) -> None:
        """Show what is new for ``msg_id`` after iopub message ``msg`` arrived."""
        if msg_id not in self._mds:
            return
        kind = msg["header"]["msg_type"]
        if kind == "stream":
            name = msg["content"].get("name")
            if name in self._prefix:
                self._stream(msg_id, name)
        elif kind == "display_data":
            # results wait for show_rest, to be listed in engine order at the end
            for out in self._take_outputs(msg_id, "display_data"):
                self._show_output(msg_id, out)
        elif kind == "update_display_data":
            content = msg["content"]
            publish_display_data(content.get("data", {}), metadata=content.get("metadata", {}),
                                 transient=content.get("transient", {}), update=True)

    # ---- all at once ----

    def show_rest(self, groupby: str = "type") -> None:
        """Show everything not shown yet, grouped by ``type``, ``engine`` or ``order``."""
        ids = self._ar.msg_ids
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
        if not text:
            return
        shown[name] += len(text)
        prefix = f"[{name}:{md['engine_id']}] "
        head = ""
        if prefix != self._prefix[name]:
            # a new source: start a line of its own, headed by the prefix
            head = ("" if self._line_start[name] else "\n") + prefix
            self._prefix[name] = prefix
        self._line_start[name] = text.endswith("\n")
        out = sys.stdout if name == "stdout" else sys.stderr
        out.write(head + text)
        out.flush()

    def _take_outputs(self, msg_id: str, kind: str | None = None) -> list[dict]:
        """Outputs of ``msg_id`` not shown yet (only up to the first that is not ``kind``)."""
        outputs = self._mds[msg_id]["outputs"]
        shown = self._shown[msg_id]
        taken = []
        for out in outputs[shown["outputs"]:]:
            msg_type = out["header"]["msg_type"]
            if kind is not None and msg_type in _SHOWN_OUTPUTS and msg_type != kind:
                break
            shown["outputs"] += 1
            if msg_type in _SHOWN_OUTPUTS:
                taken.append(out)
        return taken

    def _show_output(self, msg_id: str, msg: dict) -> None:
        eid = self._mds[msg_id]["engine_id"]
        content = msg["content"]
        # finish pending stream lines, so that a display never lands mid-line
        for name, out in (("stdout", sys.stdout), ("stderr", sys.stderr)):
            if not self._line_start[name]:
                out.write("\n")
                self._line_start[name] = True
            out.flush()
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
