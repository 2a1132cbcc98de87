"""Profiles and their config files, loaded strictly.

A profile is IPython's (``IPython.core.profiledir.ProfileDir``): ``profile_<name>/``
with ``security/``, ``log/`` and ``startup/``. Its config files are the ones
ipyparallel reads, with the same class and trait names where the concept is the same:
``ipcluster_config.py`` (``c.Cluster.n``), ``ipcontroller_config.py``
(``c.TaskScheduler.scheme_name``), ``ipengine_config.py`` (``c.IPEngine.startup_command``).

Unlike IPython, which logs a broken config file and carries on, a file that does not
run or that sets a trait the command does not have stops the command with one
:class:`ConfigFileError` naming the file and the line, before any process is started.
A section for a class this command does not know (an ipyparallel launcher, say) is only
reported at debug level: the same profile may serve ipyparallel too.
"""

from __future__ import annotations

import difflib
import re
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from traitlets.config import Config, Configurable
from traitlets.config.loader import ConfigFileNotFound, PyFileConfigLoader


class ConfigFileError(ValueError):
    """A config file that does not run, or that sets a trait no class here has."""


def find_profile_dir(profile: str = "default", ipython_dir: str | Path | None = None,
                     profile_dir: str | Path | None = None) -> Path:
    """The profile's folder (created with ``security/`` 0700, ``log/``, ``startup/``).

    ``profile_dir`` names the folder outright; otherwise ``profile_<profile>`` in
    ``ipython_dir`` (default: ``$IPYTHONDIR`` or ``~/.ipython``).
    """
    from IPython.core.profiledir import ProfileDir

    if profile_dir:
        return Path(ProfileDir.create_profile_dir(str(Path(profile_dir).expanduser())).location)
    if not ipython_dir:
        from IPython.paths import get_ipython_dir

        ipython_dir = get_ipython_dir()
    Path(ipython_dir).mkdir(parents=True, exist_ok=True)
    return Path(ProfileDir.create_profile_dir_by_name(str(ipython_dir), profile).location)


def config_traits(classes: Iterable[type]) -> dict[str, set[str]]:
    """Configurable trait names by class name, for ``classes`` and their bases."""
    known: dict[str, set[str]] = {}
    for cls in classes:
        for base in cls.mro():
            if isinstance(base, type) and issubclass(base, Configurable):
                known.setdefault(base.__name__, set()).update(base.class_trait_names(config=True))
    return known


def _line_of(path: Path, section: str, key: str) -> int | None:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    pattern = re.compile(rf"\b{re.escape(section)}\s*\.\s*{re.escape(key)}\b")
    return next((i for i, line in enumerate(lines, 1) if pattern.search(line)), None)


def _where(path: Path | str, line: int | None) -> str:
    return f"{path}, line {line}" if line else str(path)


def check_config(config: Config, classes: Iterable[type], source: Path | str,
                 log: Any = None) -> None:
    """Raise :class:`ConfigFileError` for a trait that no class named in ``config`` has."""
    known = config_traits(classes)
    for section, values in config.items():
        if not isinstance(values, dict):
            continue
        if section not in known:
            if log is not None:
                log.debug("%s: no class %s here; its settings are ignored", source, section)
            continue
        for key in values:
            if key in known[section] or key[:1].isupper():  # a nested section
                continue
            hint = difflib.get_close_matches(key, sorted(known[section]), n=1)
            line = _line_of(Path(source), section, key) if isinstance(source, Path) else None
            raise ConfigFileError(
                f"{_where(source, line)}: {section} has no setting {key!r}"
                + (f"; did you mean {section}.{hint[0]}?" if hint else "")
            )


def load_config_file(path: str | Path, classes: Iterable[type] = (), log: Any = None) -> Config:
    """Run config file ``path`` and return its config (empty if the file is absent).

    With ``classes``, every trait set for one of them (or their bases) must exist.
    """
    path = Path(path)
    loader = PyFileConfigLoader(path.name, str(path.parent), log=log)
    try:
        config = loader.load_config()
    except ConfigFileNotFound:
        return Config()
    except SyntaxError as e:
        raise ConfigFileError(f"{_where(path, e.lineno)}: syntax error: {e.msg}") from None
    except Exception as e:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == str(path)]
        line = frames[-1].lineno if frames else None
        raise ConfigFileError(f"{_where(path, line)}: {type(e).__name__}: {e}") from None
    if classes:
        check_config(config, classes, path, log)
    return config


def unknown_option(config: Config, classes: Iterable[type]) -> str | None:
    """What is wrong with ``--Class.trait=value`` options in ``config``, or None."""
    try:
        check_config(config, classes, "the command line")
    except ConfigFileError as e:
        return str(e).removeprefix("the command line: ")
    return None
