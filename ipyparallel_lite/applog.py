"""Logging of the controller and engine applications.

traitlets applications leave their logger at DEBUG and filter in the handler, so
every ``log.debug(...)`` still builds a record; ipykernel logs each reply it sends
that way, which cost an engine about 6% of a cell. Here the logger itself filters
at the application's ``log_level``.
"""

from __future__ import annotations

import logging
from typing import Any


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
