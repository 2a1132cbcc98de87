"""The Jupyter server extension behind the JupyterLab cluster panel.

Enabled on install by ``jupyter-config/jupyter_server_config.d/ipyparallel_lite.json``
(the wheel puts it in ``etc/jupyter/``); ``jupyter server extension disable
ipyparallel_lite.jupyter`` turns it off. The panel itself (``lab/``, built into
``ipyparallel_lite/labextension/``) is toggled with ``jupyter labextension
enable|disable ipyparallel-lite``.
"""

from __future__ import annotations

from typing import Any

from jupyter_server.extension.application import ExtensionApp
from traitlets import Unicode

from ipyparallel_lite.jupyter.clusters import ClusterManager
from ipyparallel_lite.jupyter.handlers import handlers

#: the npm name of the panel, as ``jupyter labextension list`` shows it
LABEXTENSION_NAME = "ipyparallel-lite"


class ClusterPanelApp(ExtensionApp):
    """Serves the cluster panel's REST API; stops the clusters it started on shutdown."""

    name = "ipyparallel_lite"
    load_other_extensions = True

    ipython_dir = Unicode(
        "", config=True,
        help="IPython directory whose profiles hold the clusters (default: $IPYTHONDIR or ~/.ipython)",
    )

    def initialize_settings(self) -> None:
        self.clusters = ClusterManager(self.ipython_dir or None)
        self.settings["ipyparallel_lite_clusters"] = self.clusters

    def initialize_handlers(self) -> None:
        self.handlers.extend(handlers())

    async def stop_extension(self) -> None:
        await self.clusters.stop_all()


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    return [{"module": "ipyparallel_lite.jupyter", "app": ClusterPanelApp}]

