"""``python -m ipyparallel_lite.cluster``: the same as ``ipcluster-lite``."""

import sys

from ipyparallel_lite.cluster.app import main

sys.exit(main())
