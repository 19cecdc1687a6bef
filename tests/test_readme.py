"""The README's module map names every module of pmc_clip/, and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_module_map_matches_the_tree() -> None:
    readme = (REPO / "README.md").read_text()
    table = readme.split("| module | what it holds |", 1)[1].split("\n\n", 1)[0]
    named = set(re.findall(r"^\| `(pmc_clip/[\w/]+\.py)` \|", table, re.M))
    modules = {
        str(path.relative_to(REPO))
        for path in (REPO / "pmc_clip").rglob("*.py")
        if path.name != "__init__.py"
    }
    assert named == modules, (sorted(modules - named), sorted(named - modules))
