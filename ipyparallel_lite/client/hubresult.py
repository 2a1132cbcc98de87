"""Results read from the Hub: :class:`AsyncHubResult`, and the helpers the Client's Hub
queries share (msg_ids from what users pass, replies turned into messages).

An AsyncHubResult covers tasks this client is not waiting on: submitted by another
client, before a controller restart, or resubmitted. It asks the Hub
(``result_request``) until every result is there, from one thread of its own that
backs off from 50 ms to 1 s between questions and ends when the results are in or the
client closes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from ipyparallel_lite.client.asyncresult import AsyncResult

#: record keys holding times, parsed back from the ISO strings JSON carried them as
DATE_KEYS = ("submitted", "started", "completed", "received", "resubmitted")


def msg_ids_of(client: Any, jobs: Any) -> list[str]:
    """msg_ids from a msg_id, an index into ``client.history``, an AsyncResult, or a list
    of those."""
    if isinstance(jobs, str | int | AsyncResult):
        jobs = [jobs]
    if not isinstance(jobs, Iterable):
        raise TypeError(f"expected msg_ids, history indices or AsyncResults, not {jobs!r}")
    out: list[str] = []
    for job in jobs:
        if isinstance(job, AsyncResult):
            out.extend(job.msg_ids)
        elif isinstance(job, int) and not isinstance(job, bool):
            try:
                out.append(client.history[job])
            except IndexError:
                raise IndexError(f"no task {job} in this client's history "
                                 f"({len(client.history)} tasks)") from None
        elif isinstance(job, str):
            out.append(job)
        else:
            raise TypeError(f"expected msg_ids, history indices or AsyncResults, not {job!r}")
    return out


def parse_dates(record: dict) -> dict:
    """``record`` with the ISO strings of its DATE_KEYS as datetimes."""
    for key in DATE_KEYS:
        value = record.get(key)
        if isinstance(value, str):
            try:
                record[key] = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                pass  # "resubmitted" of an original holds the new msg_id
    return record


def results_of(reply: dict) -> dict[str, dict]:
    """``{msg_id: message}`` of the completed results in a ``result_reply``, as the
    messages ``AsyncResult._receive`` takes (each with its buffers, and the recorded
    output keys in its metadata)."""
    content, buffers = reply["content"], list(reply.get("buffers") or [])
    out = {}
    at = 0
    for msg_id in content.get("completed", []):
        part = content.get(msg_id)
        if part is None:
            continue
        n = part.get("nbuffers", 0)
        out[msg_id] = {
            "header": part.get("header") or {},
            "parent_header": {"msg_id": msg_id},
            # what the task printed and returned, as the Hub recorded it: read as
            # ar.stdout, ar.execute_result... like the output an AsyncResult collects
            "metadata": {**(part.get("metadata") or {}), **(part.get("outputs") or {})},
            "content": part.get("content") or {},
            "buffers": buffers[at:at + n],
        }
        at += n
    return out


class AsyncHubResult(AsyncResult):
    """The results of tasks, fetched from the Hub's records (``rc.get_result``).

    ``query(msg_type, content)`` sends a request to the Hub and returns its reply
    (the client's query call); :meth:`fetch` asks once, :meth:`start_polling` asks
    until every result is in.
    """

    #: seconds between questions to the Hub: the first, and the most
    POLL_START, POLL_MAX = 0.05, 1.0

    def __init__(self, client: Any, msg_ids: list[str], query: Callable[[str, dict], dict],
                 fname: str = "get_result", single: bool = False):
        super().__init__(client, msg_ids, fname, single=single)
        self._query = query
        self._poller: threading.Thread | None = None
        self._poll_error: Exception | None = None

    def _take(self, reply: dict) -> None:
        for msg_id, msg in results_of(reply).items():
            if msg_id in self.metadata_by_id:
                self._receive(msg_id, msg)

    def _missing(self) -> list[str]:
        return [m for m in self.msg_ids if m not in self._replies]

    def fetch(self) -> None:
        """Ask the Hub once for the results not received yet (raises for unknown ones)."""
        missing = self._missing()
        if missing:
            self._take(self._query("result_request", {"msg_ids": missing}))

    def start_polling(self) -> None:
        """Ask the Hub from a thread until every result is in."""
        if self.done() or self._poller is not None:
            return
        self._poller = threading.Thread(target=self._poll, name="ipp-lite-hub-result", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        interval = self.POLL_START
        stop = threading.Event()
        while not self.done():
            try:
                self.fetch()
            except Exception as e:  # the records were purged meanwhile, the client closed...
                self._poll_error = e
                if not self.done():
                    self.set_exception(e)
                return
            stop.wait(interval)
            interval = min(interval * 2, self.POLL_MAX)

    def _collect(self, return_exceptions: bool) -> Any:
        if self._poll_error is not None:
            raise self._poll_error
        return super()._collect(return_exceptions)
