"""``python -m bench.replay``: the same as ``kvfabric bench replay``."""

import sys

from bench.replay.cli import main

sys.exit(main())
