"""make_shards in parts (--num-parts K --part I) and --merge, run by hand (no SLURM; the
array job is in test_slurm.py): every row once, articles whole, the merge's checks."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import braceexpand
import pytest
from helpers_data import make_figures, sample_metadata

from pmc_clip.sharding import inspect as inspect_shards
from pmc_clip.sharding.cli import main

NUM_PARTS = 3


def _input(tmp_path: Path) -> tuple[Path, Path, list[dict[str, Any]]]:
    """24 articles (96 figures) and five bad rows: a missing figure, an empty caption, a
    corrupt image, a row that is not JSON, and a figure listed again under another
    article (its key is taken: a duplicate whichever parts the two articles go to)."""
    jsonl, images = make_figures(tmp_path, 24)
    rows = [json.loads(line) for line in Path(jsonl).read_text().splitlines()]
    (Path(images) / "PMC9_F1_0.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    rows += [
        {"image": "PMC8_F1_0.jpg", "caption": "a figure that is not there", "pmcid": "PMC8"},
        {"image": rows[0]["image"].replace("_0.", "_7."), "caption": " ", "pmcid": "PMC7"},
        {"image": "PMC9_F1_0.jpg", "caption": "a corrupt figure", "pmcid": "PMC9"},
        "{not json",
        {"image": rows[5]["image"], "caption": "the same figure again", "pmcid": "PMC6"},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path, Path(images), rows


def _run(*args: str | Path) -> int:
    return main([str(a) for a in args])


def _part(jsonl: Path, images: Path, out: Path | str, part: int, *extra: str) -> int:
    return _run(
        "--input", jsonl, "--images", images, "--output", out, "--shard-size", "5",
        "--workers", "0", "--num-parts", str(NUM_PARTS), "--part", str(part), *extra,
    )  # fmt: skip


def _written(out: Path) -> dict[int, tuple[str, str, str]]:
    """row -> (shard, split, article) of every sample in the shards of `out`."""
    written: dict[int, tuple[str, str, str]] = {}
    for shard, meta in sample_metadata(out):
        assert meta["row"] not in written, f"row {meta['row']} written twice"
        written[meta["row"]] = (shard, meta["split"], meta["article_id"])
    return written


def _skipped(out: Path) -> dict[int, str]:
    lines = (out / "skipped.jsonl").read_text().splitlines()
    return {s["row"]: s["reason"] for s in map(json.loads, lines)}


def test_parts_cover_every_row_once_keep_articles_whole_and_merge(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jsonl, images, rows = _input(tmp_path)
    out = tmp_path / "parts"
    for part in range(NUM_PARTS - 1):
        assert _part(jsonl, images, out, part) == 0
    capsys.readouterr()
    assert _run("--merge", "--output", out) == 2
    assert "1 of 3 parts have not finished (--part 2)" in capsys.readouterr().err
    assert not (out / "manifest.json").exists()
    assert _part(jsonl, images, out, 2) == 0
    assert _run("--merge", "--output", out) == 0

    written, skipped = _written(out), _skipped(out)
    assert sorted([*written, *skipped]) == list(range(len(rows)))  # each row exactly once
    assert skipped == {
        96: "missing_file",
        97: "empty_caption",
        98: "unreadable_image",
        99: "bad_record",
        100: "duplicate_key",
    }
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parts"] == NUM_PARTS
    assert manifest["rows"]["read"] == len(rows) == len(written) + len(skipped)
    assert manifest["rows"]["skipped_by_reason"]["duplicate_key"] == 1
    # An article's figures: one part, one split. The parts share the work.
    by_article: dict[str, set[tuple[str, str]]] = {}
    for shard, split, article in written.values():
        by_article.setdefault(article, set()).add((shard.split("-part")[1][:5], split))
    assert all(len(places) == 1 for places in by_article.values()), by_article
    part_sizes = [
        json.loads((out / "_progress" / f"part-{p:05d}" / "summary.json").read_text())["rows"][
            "written"
        ]
        for p in range(NUM_PARTS)
    ]
    assert all(size > 0 for size in part_sizes), part_sizes
    # The patterns name every shard; the merged output verifies.
    for split, info in manifest["splits"].items():
        listed = {s["name"] for s in manifest["shards"] if s["split"] == split}
        assert set(braceexpand.braceexpand(info["pattern"])) == listed
    assert sorted(json.loads((out / "sizes.json").read_text())) == sorted(
        s["name"] for s in manifest["shards"]
    )
    assert inspect_shards.main([str(out), "--samples", "0"]) == 0

    # One run over the same input keeps and skips the same rows.
    whole = tmp_path / "whole"
    assert _run("--input", jsonl, "--images", images, "--output", whole, "--workers", "0") == 0
    assert _written(whole).keys() == written.keys()
    assert _skipped(whole) == skipped


def test_merge_checks_the_shards_and_a_changed_part_unlists_the_merge(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jsonl, images, rows = _input(tmp_path)
    out = tmp_path / "out"
    for part in range(NUM_PARTS):
        assert _part(jsonl, images, out, part) == 0
    assert _run("--merge", "--output", out) == 0
    merged_at = (out / "manifest.json").stat().st_mtime_ns

    # A finished, unchanged part run again: nothing rewritten, the merge stands.
    assert _part(jsonl, images, out, 0) == 0
    assert (out / "manifest.json").stat().st_mtime_ns == merged_at

    # A shard lost after the parts finished: the merge names the part to rerun.
    lost = sorted(out.glob("*-part00001-000000.tar"))[0]
    lost.unlink()
    capsys.readouterr()
    assert _run("--merge", "--output", out) == 2
    assert f"{lost.name}: the recorded shard is missing: rerun --part 1" in capsys.readouterr().err
    assert not (out / "manifest.json").exists() and not (out / "sizes.json").exists()
    assert _part(jsonl, images, out, 1) == 0
    assert lost.exists()
    assert _run("--merge", "--output", out) == 0

    # A caption fixed in the input: its part is rewritten, and the merged listings, which
    # describe the part as it was, are gone until the next merge.
    written = _written(out)
    row = next(r for r, (shard, _, _) in written.items() if "-part00002-" in shard)
    rows[row]["caption"] = "A corrected caption."
    jsonl.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    assert _part(jsonl, images, out, 2) == 0
    assert not (out / "manifest.json").exists() and not (out / "sizes.json").exists()
    # Only part 2's rows changed: parts 0 and 1 stand as they are.
    assert _run("--merge", "--output", out) == 0
    shard = written[row][0]
    with tarfile.open(out / shard) as tar:
        captions = [
            tar.extractfile(m).read().decode()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.name.endswith(".txt")
        ]
    assert "A corrected caption." in captions


def test_parts_and_whole_runs_do_not_mix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jsonl, images, _ = _input(tmp_path)
    out, whole = tmp_path / "out", tmp_path / "whole"
    assert _part(jsonl, images, out, 0) == 0
    capsys.readouterr()
    common = ("--input", jsonl, "--images", images, "--shard-size", "5", "--workers", "0")
    assert _run(*common, "--output", out) == 2
    assert "made with other options (num_parts)" in capsys.readouterr().err
    assert _run(*common, "--output", out, "--num-parts", "4", "--part", "0") == 2
    assert "made with other options (num_parts)" in capsys.readouterr().err
    assert _part(jsonl, images, out, NUM_PARTS) == 2
    assert "--part must be in 0..2 (--num-parts 3), got 3" in capsys.readouterr().err
    assert _run("--output", out) == 2
    assert "--input and --images are required" in capsys.readouterr().err
    assert _run(*common, "--output", whole) == 0
    capsys.readouterr()
    assert _run("--merge", "--output", whole) == 2
    assert "written by one run, not in parts" in capsys.readouterr().err
    assert _run("--merge", "--output", tmp_path / "empty") == 2
    assert "holds no make_shards output" in capsys.readouterr().err


def test_a_part_clears_only_its_own_staged_files(tmp_path: Path) -> None:
    """Parts write into one folder side by side: a part starting must not remove the
    file another part is writing (staged as `.tmp-<shard name>-*`)."""
    jsonl, images, _ = _input(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    others = out / ".tmp-pmc-oa-train-part00001-000000.tar-abc123"
    own = out / ".tmp-pmc-oa-train-part00000-000004.tar-def456"
    for path in (others, own):
        path.write_bytes(b"half a shard")
    assert _part(jsonl, images, out, 0) == 0
    assert others.exists() and not own.exists()


def test_parts_write_straight_to_s3_and_merge_there(tmp_path: Path, s3_bucket: str) -> None:
    """The same parts into an S3 --output (a real S3 server on loopback): the same shard
    bytes as locally, the merge's listing checks through ETags, and --train-data takes the
    merged pattern (sizes from the merged sizes.json)."""
    import fsspec

    from pmc_clip.data.sources import resolve_dataset

    jsonl, images, _ = _input(tmp_path)
    local, remote = tmp_path / "local", f"{s3_bucket}/pmc-oa"
    for part in range(NUM_PARTS):
        assert _part(jsonl, images, local, part) == 0
        assert _part(jsonl, images, remote, part) == 0
    assert _run("--merge", "--output", local) == 0
    assert _run("--merge", "--output", remote) == 0
    fs = fsspec.filesystem("s3")
    manifest = json.loads(fs.cat_file(f"{remote}/manifest.json"))
    assert manifest == json.loads((local / "manifest.json").read_text()) | {
        "options": manifest["options"]
    }
    for shard in manifest["shards"]:
        assert fs.cat_file(f"{remote}/{shard['name']}") == (local / shard["name"]).read_bytes()
    train = manifest["splits"]["train"]
    dataset = resolve_dataset(f"{remote}/{train['pattern']}", None)
    assert dataset.num_samples == train["samples"] and len(dataset.urls) == train["shards"]
