#!/usr/bin/env python
"""Verify shards against their manifest.json and print (or safely extract) a few samples.

    python tools/inspect_shards.py shards/ --samples 3

See `--help` and pmc_clip/sharding/inspect.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from pmc_clip.sharding.inspect import main

if __name__ == "__main__":
    sys.exit(main())
