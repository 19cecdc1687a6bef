#!/usr/bin/env python
"""Write the sample index (.idx) beside every shard that lacks a current one.

    python tools/index_shards.py 's3://bucket/pmc-oa-train-{000000..000131}.tar' --workers 16

See `--help` and pmc_clip/sharding/index.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from pmc_clip.sharding.index import main

if __name__ == "__main__":
    sys.exit(main())
