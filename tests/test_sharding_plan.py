"""pmc_clip/sharding/plan.py: keys, article ids, splits and parts: stable hashes, so the
same input lands in the same split and part on every machine and Python version."""

from __future__ import annotations

import collections

import pytest

from pmc_clip.sharding.options import ShardOptions
from pmc_clip.sharding.plan import (
    PlannedSample,
    article_id_for,
    make_key,
    part_for,
    plan,
    safe_relative_path,
    split_for,
)
from pmc_clip.sharding.rows import Skip

FRACTIONS = (("train", 0.8), ("valid", 0.1), ("test", 0.1))


def test_split_and_part_are_stable_hashes() -> None:
    # Fixed values: a change here moves rows between splits of existing outputs.
    splits = [split_for(f"PMC{i}", FRACTIONS) for i in range(12)]
    assert splits == ["train"] * 8 + ["test"] + ["train"] * 3
    assert [part_for(f"PMC{i}", 4) for i in range(12)] == [1, 1, 3, 2, 2, 2, 0, 3, 1, 3, 2, 1]
    assert split_for("PMC1", (("only", 1.0),)) == "only"
    counts = collections.Counter(split_for(f"PMC{i}", FRACTIONS) for i in range(4000))
    assert 0.77 < counts["train"] / 4000 < 0.83 and counts.keys() == {"train", "valid", "test"}
    parts = collections.Counter(part_for(f"PMC{i}", 4) for i in range(4000))
    assert parts.keys() == {0, 1, 2, 3} and min(parts.values()) > 900
    assert part_for("PMC1", 1) == 0


def test_parts_are_independent_of_splits() -> None:
    pairs = {(split_for(f"PMC{i}", FRACTIONS), part_for(f"PMC{i}", 2)) for i in range(200)}
    assert pairs == {(s, p) for s in ("train", "valid", "test") for p in (0, 1)}


def test_keys_and_paths() -> None:
    assert make_key("a/b.c/d.e.jpg") == "a__b_c__d_e"
    assert make_key("PMC1_Fig 2.png") == "PMC1_Fig_2"
    assert safe_relative_path("./a//b.jpg") == "a/b.jpg"
    for bad in ("/etc/passwd", "../x.jpg", "a/../../x", "c:/x", "a\\b", ""):
        assert safe_relative_path(bad) is None


def test_article_id_from_column_else_figure_name() -> None:
    assert article_id_for("f/PMC212319_Fig3_4.jpg", {}, article_column="pmcid") == "PMC212319"
    assert article_id_for("x.jpg", {"pmcid": " PMC9 "}, article_column="pmcid") == "PMC9"
    assert article_id_for("PMC5.jpg", {"pmcid": ""}, article_column="pmcid") == "PMC5"


def _rows(n: int) -> list[tuple[int, dict[str, object] | Skip]]:
    return [(i, {"image": f"PMC{i // 2}_F{i}.jpg", "caption": f"c{i}"}) for i in range(n)]


def test_plan_keeps_an_articles_rows_together_and_parts_cover_every_row() -> None:
    options = ShardOptions(input="in.jsonl", images="i", output="o")
    whole = plan(_rows(40), options)
    assert whole.num_rows == whole.num_input_rows == 40
    split_of: dict[str, str] = {}
    for split, samples in whole.samples_by_split.items():
        for sample in samples:
            assert split_of.setdefault(sample.article_id, split) == split
    parts = [
        plan(_rows(40), ShardOptions(input="in.jsonl", images="i", output="o", num_parts=3, part=p))
        for p in range(3)
    ]
    rows = sorted(s.row for p in parts for ss in p.samples_by_split.values() for s in ss)
    assert rows == list(range(40))
    assert {p.num_input_rows for p in parts} == {40}


def test_plan_skips_with_reasons_and_shuffles_by_seed() -> None:
    rows: list[tuple[int, dict[str, object] | Skip]] = [
        (0, {"image": "a.jpg", "caption": "x"}),
        (1, {"image": "a.jpg", "caption": "again"}),
        (2, {"image": "../b.jpg", "caption": "x"}),
        (3, {"image": "c.jpg", "caption": "  "}),
    ]
    planned = plan(rows, ShardOptions(input="in.jsonl", images="i", output="o", split="all"))
    assert [(s.row, s.reason) for s in planned.skips] == [
        (1, "duplicate_key"),
        (2, "path_escapes_root"),
        (3, "empty_caption"),
    ]
    assert [s.row for s in planned.samples_by_split["all"]] == [0]

    def order(seed: int) -> list[int]:
        options = ShardOptions(
            input="in.jsonl", images="i", output="o", split="all", shuffle=True, seed=seed
        )
        return [s.row for s in plan(_rows(30), options).samples_by_split["all"]]

    assert order(1) == order(1) != order(2) and sorted(order(1)) == list(range(30))


def test_missing_key_columns_are_a_start_up_error() -> None:
    rows: list[tuple[int, dict[str, object] | Skip]] = [(0, {"img": "a.jpg", "text": "x"})]
    with pytest.raises(ValueError, match=r"no column 'image' \(--csv-img-key\)"):
        plan(rows, ShardOptions(input="in.jsonl", images="i", output="o"))


def test_planned_sample_carries_other_columns() -> None:
    rows: list[tuple[int, dict[str, object] | Skip]] = [
        (0, {"image": "PMC1_a.jpg", "caption": "x", "split": "valid", "score": 0.5})
    ]
    sample = plan(rows, ShardOptions(input="in.jsonl", images="i", output="o")).samples_by_split[
        "valid"
    ][0]
    assert sample == PlannedSample(0, "PMC1_a", "PMC1_a.jpg", "x", "valid", "PMC1", {"score": 0.5})
