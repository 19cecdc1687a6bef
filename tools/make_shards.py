#!/usr/bin/env python
"""PMC-OA JSONL/CSV + figures -> webdataset shards (local or s3://) with a manifest.

    python tools/make_shards.py --input pmc_oa.jsonl --images images.zip --output shards/ \
        --shuffle --seed 0 --workers 16

See `--help` and pmc_clip/sharding/ (its `__init__` lists the modules).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from pmc_clip.sharding.cli import main

if __name__ == "__main__":
    sys.exit(main())
