"""pmc_clip: scalable pretraining of PMC-CLIP on PubMed Central figures and captions.

Importing the package is cheap on purpose (no torch): the shard-making workers and the
command-line tools import submodules they need and nothing else.
"""

__version__ = "0.1.0"
