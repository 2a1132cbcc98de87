"""What every command shares: profile, config files, options and logging.

``ipcontroller-lite``, ``ipengine-lite`` and each ``ipcluster-lite`` subcommand are
IPython applications (``BaseIPythonApplication``) with this mixin, so that they all
take ``--profile``, ``--profile-dir``, ``--ipython-dir``, ``--cluster-id``,
``--log-level``, ``--debug``, ``--log-to-file`` and ``--Class.trait=value``, and read
their profile's config file (:attr:`config_file_name`) strictly
(:mod:`ipyparallel_lite.config`).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from traitlets import Bool, Enum, Unicode, default
from traitlets.config import Configurable

from ipyparallel_lite.applog import LOG_DATEFMT, LOG_FORMAT, LevelFilteredLogging, log_file_name
from ipyparallel_lite.config import ConfigFileError, load_config_file, unknown_option

#: exit code of a command line that cannot be understood (argparse's)
EXIT_USAGE = 2

common_aliases = {
    "profile": "BaseIPythonApplication.profile",
    "profile-dir": "ProfileDir.location",
    "ipython-dir": "BaseIPythonApplication.ipython_dir",
    "log-level": "ParallelApp.log_level",
    "config": "BaseIPythonApplication.extra_config_file",
}

common_flags = {
    "debug": ({"ParallelApp": {"log_level": logging.DEBUG}}, "log everything (log level DEBUG)"),
    "log-to-file": ({"ParallelApp": {"log_to_file": True}},
                    "log to log/<command>-<cluster-id>-<pid>.log in the profile, not to stderr"),
}


class UsageError(Exception):
    """A command line that cannot be understood: the command exits 2 with this message."""


class ParallelApp(LevelFilteredLogging, Configurable):
    """Mixin for a ``BaseIPythonApplication``: a command of ipyparallel_lite."""

    cluster_id = Unicode("", help="Id of the cluster: names its connection files (default '').").tag(
        config=True)
    log_to_file = Bool(False, help="Log to a file in the profile's log/ folder.").tag(config=True)
    #: the start of this command's log file name (``ipcontroller``, ``ipengine``)
    log_file_prefix = "ipcluster"
    #: whether this command also reads the profile's ``ipython_config.py`` (engines do)
    read_ipython_config = False
    auto_create = Bool(True)  # a cluster may name a profile that does not exist yet

    log_level = Enum((0, 10, 20, 30, 40, 50, "DEBUG", "INFO", "WARN", "ERROR", "CRITICAL"),
                     default_value=logging.INFO, help="Set the log level by value or name.").tag(
        config=True)

    @default("log_format")
    def _log_format_default(self) -> str:
        return LOG_FORMAT.replace("{name}", self.name)

    @default("log_datefmt")
    def _log_datefmt_default(self) -> str:
        return LOG_DATEFMT

    @classmethod
    def checked_classes(cls) -> list[type]:
        """The classes whose traits this command's options and config file may set."""
        return [cls, *cls.classes]

    def init_profile_dir(self) -> None:
        Path(self.ipython_dir).mkdir(parents=True, exist_ok=True)  # IPython wants it to exist
        super().init_profile_dir()  # type: ignore[misc]

    def init_crash_handler(self) -> None:
        """No crash-report files: a failure is one message on stderr (and in the log)."""

    def check_options(self, argv: list[str]) -> None:
        """Raise UsageError for an option that is neither ours nor ``--Class.trait=value``."""
        names = {"help", "h", "help-all", "version", "show-config", "show-config-json"}
        for key in [*self.aliases, *self.flags]:
            names.update(key if isinstance(key, tuple) else [key])
        for arg in argv:
            if arg == "--":
                break
            option = arg.lstrip("-").split("=", 1)[0]
            if arg.startswith("-") and not option[:1].isdigit() and "." not in option and option not in names:
                raise UsageError(f"unrecognized arguments: {arg}")

    def parse_command_line(self, argv: list[str] | None = None) -> None:
        argv = sys.argv[1:] if argv is None else list(argv)
        self.check_options(argv)
        super().parse_command_line(argv)  # type: ignore[misc]
        if self.subapp is not None:
            return
        problem = unknown_option(self.cli_config, self.checked_classes())
        if problem is None and self.extra_args:  # no command takes arguments
            problem = f"unrecognized arguments: {' '.join(self.extra_args)}"
        if problem:
            raise UsageError(problem)

    def load_config_file(self, suppress_errors: Any = None) -> None:
        """Read the profile's config files; a broken one raises ConfigFileError."""
        names = (["ipython_config.py"] if self.read_ipython_config else []) + list(self.config_files)
        for name in dict.fromkeys(n for n in names if n):
            for folder in reversed(self.config_file_paths):  # the first folder wins
                path = Path(folder, name)
                if path.is_file():
                    checked = () if name == "ipython_config.py" else self.checked_classes()
                    config = load_config_file(path, checked, self.log)
                    config.merge(self.cli_config)
                    self.update_config(config)
                    self.log.debug("loaded config file %s", path)
        if self.log_to_file:
            path = Path(self.profile_dir.location, "log",
                        log_file_name(self.log_file_prefix, self.cluster_id, os.getpid()))
            self.logging_config = {
                "handlers": {"file": {"class": "logging.FileHandler", "filename": str(path),
                                      "formatter": "console"}},
                "loggers": {type(self).__name__: {"handlers": ["file"]}},
            }


def run_app(app: Any, argv: list[str] | None) -> None:
    """``app.initialize(argv)``, turning bad input into one line and an exit code.

    A usage error exits 2, a broken config file 1.
    """
    try:
        app.initialize(argv)
    except UsageError as e:
        print(f"{app.name}: error: {e}\nSee `{app.name} --help` for its options.", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except ConfigFileError as e:
        print(f"{app.name}: error in config file {e}", file=sys.stderr)
        sys.exit(1)
