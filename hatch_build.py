"""Wheel build hook: build the JupyterLab panel (``lab/``) into
``ipyparallel_lite/labextension/``, which the wheel installs as shared data.

``IPP_LITE_LAB_BUILD`` picks what happens:

* ``auto`` (default): a wheel runs the JS build when ``node`` is on PATH (``jlpm
  install`` from the npm registry, then ``jlpm build``); without node it ships the
  committed built assets. An editable install builds only when no assets exist.
* ``always``: run the JS build, fail without node.
* ``never``: ship the committed built assets as they are.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

MODES = ("auto", "always", "never")


class LabExtensionBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name != "wheel":
            return
        root = Path(self.root)
        lab = root / "lab"
        built = root / "ipyparallel_lite" / "labextension" / "package.json"
        mode = os.environ.get("IPP_LITE_LAB_BUILD", "auto")
        if mode not in MODES:
            raise ValueError(f"IPP_LITE_LAB_BUILD={mode!r}: use one of {', '.join(MODES)}")
        node = shutil.which("node")
        if mode == "always" and node is None:
            raise RuntimeError("IPP_LITE_LAB_BUILD=always, but node is not on PATH: install "
                               "Node.js >= 20, or build with the committed assets (never)")
        build = mode == "always" or (
            mode == "auto" and node is not None and (version != "editable" or not built.exists()))
        if build:
            self._build(lab)
        elif not built.exists():
            raise RuntimeError(f"the JupyterLab panel is not built ({built} is missing) and "
                               "node is not on PATH: install Node.js >= 20 and build again")
        else:
            self.app.display_info("ipyparallel_lite: shipping the committed JupyterLab panel build")

    def _build(self, lab: Path) -> None:
        # jlpm and jupyter-builder come with the build requirement jupyter_builder
        scripts = {sysconfig.get_path("scripts"), str(Path(sys.executable).parent)}
        env = {**os.environ, "PATH": os.pathsep.join([*scripts, os.environ.get("PATH", "")])}
        jlpm = shutil.which("jlpm", path=env["PATH"])
        if jlpm is None:
            raise RuntimeError("jlpm not found: it comes with the jupyter_builder package")
        self.app.display_info("ipyparallel_lite: building the JupyterLab panel (jlpm install, jlpm build)")
        for args in (["install"], ["clean"], ["build"]):
            subprocess.run([jlpm, *args], cwd=lab, env=env, check=True)
