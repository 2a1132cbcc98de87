"""Logging of the controller, engine and cluster applications.

Every process logs at INFO by default, each line with a timestamp, the command's name
and its pid. A process started by a ``Cluster`` writes to its own file in the
profile's ``log/`` folder, named as ipyparallel names them
(``ipcontroller-<cluster-id>-<pid>.log``, ``ipengine-<cluster-id>-<pid>.log``);
``ipcluster-lite clean`` removes the files of processes that are gone.

traitlets applications leave their logger at DEBUG and filter in the handler, so
every ``log.debug(...)`` still builds a record; ipykernel logs each reply it sends
that way, which cost an engine about 6% of a cell. Here the logger itself filters
at the application's ``log_level``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

#: timestamp, command and pid on every line; ``{name}`` is the command's name
LOG_FORMAT = "%(asctime)s.%(msecs)03d [{name} %(process)d] %(levelname)s | %(message)s"
LOG_DATEFMT = "%Y-%m-%d %H:%M:%S"

#: ``<prefix>[-<cluster id>]-<pid>.log``: the pid is the last dash-separated part
_LOG_NAME = re.compile(r"^(ipcontroller|ipengine|ipcluster)-(?:.*-)?(\d+)\.log$")


def log_file_name(prefix: str, cluster_id: str, pid: int | str) -> str:
    """ipyparallel's name for a process's log file: ``ipengine-<cluster-id>-<pid>.log``."""
    return "-".join(part for part in (prefix, cluster_id, str(pid)) if part) + ".log"


def log_file_pid(path: Path) -> int | None:
    """The pid a log file named by :func:`log_file_name` belongs to (None: not ours)."""
    match = _LOG_NAME.match(path.name)
    return int(match.group(2)) if match else None


class LevelFilteredLogging:
    """Mixin for a traitlets ``Application``: its logger drops records below ``log_level``.

    A ``logging_config`` naming the logger's level still wins.
    """

    log_level: Any

    def get_default_logging_config(self) -> dict:
        config = super().get_default_logging_config()  # type: ignore[misc]
        level = self.log_level
        name = logging.getLevelName(level) if isinstance(level, int) else level
        for logger in config.get("loggers", {}).values():
            logger["level"] = name
        return config
