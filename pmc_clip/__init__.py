"""pmc_clip: scalable pretraining of PMC-CLIP on PubMed Central figures and captions.

Importing the package is cheap on purpose (no torch): the shard-making workers and the
command-line tools import submodules they need and nothing else. The inference API
(`pmc_clip.load`, `pmc_clip.zero_shot`, ..., see pmc_clip/api.py) is imported on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API_NAMES = (
    "ImagePreprocess",
    "LoadedModel",
    "TextTokenizer",
    "load",
    "load_image_encoder",
    "zero_shot",
)


def __getattr__(name: str) -> Any:
    if name in _API_NAMES:
        from pmc_clip import api

        return getattr(api, name)
    raise AttributeError(f"module 'pmc_clip' has no attribute {name!r}")
