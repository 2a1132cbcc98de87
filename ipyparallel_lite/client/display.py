"""Showing what engines printed and displayed, grouped as ``%px`` does."""

from __future__ import annotations

import sys
from typing import Any


def _show(msg: dict) -> None:
    content = msg["content"]
    msg_type = msg["header"]["msg_type"]
    if msg_type == "error":
        print("\n".join(content.get("traceback", [])), file=sys.stderr)
        return
    data = content.get("data", {})
    try:
        from IPython import get_ipython
        from IPython.display import publish_display_data

        if get_ipython() is not None and msg_type in ("display_data", "execute_result"):
            publish_display_data(data, metadata=content.get("metadata", {}))
            return
    except ImportError:
        pass
    print(data.get("text/plain", ""))


def display_outputs(ar: Any, groupby: str = "type") -> None:
    """Print each engine's stdout and stderr with an ``[stdout:N]`` prefix, then its outputs.

    ``groupby``: ``"type"`` (all stdout, then all stderr, then outputs), ``"engine"``
    (everything of one engine together) or ``"order"`` (outputs in the order produced).
    """
    if groupby not in ("type", "engine", "order"):
        raise ValueError(f"groupby must be 'type', 'engine' or 'order', not {groupby!r}")
    mds = ar._metadata_list()

    def streams(md: dict, name: str) -> None:
        text = md.get(name) or ""
        if text:
            out = sys.stdout if name == "stdout" else sys.stderr
            print(f"[{name}:{md['engine_id']}] {text}", end="" if text.endswith("\n") else "\n", file=out)

    if groupby == "engine":
        for md in mds:
            streams(md, "stdout")
            streams(md, "stderr")
            for msg in md["outputs"]:
                _show(msg)
        return
    for name in ("stdout", "stderr"):
        for md in mds:
            streams(md, name)
    outputs = [(md, msg) for md in mds for msg in md["outputs"]]
    if groupby == "order":
        outputs.sort(key=lambda pair: str(pair[1]["header"].get("date")))
    for _, msg in outputs:
        _show(msg)
