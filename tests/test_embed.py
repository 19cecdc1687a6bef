"""python -m pmc_clip.embed: Parquet parts from a folder, a table and shards; resume; search."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers_text import CAPTIONS, build_tokenizer
from PIL import Image

from pmc_clip import api, distributed, embed, export
from pmc_clip.config import ModelSpec
from pmc_clip.entry import EXIT_CODE_INTERRUPTED
from pmc_clip.sharding.options import ShardOptions
from pmc_clip.sharding.run import make_shards

NUM_IMAGES = 5


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny model exported as `pmc_clip.export` writes it, 5 figures, a JSONL of them."""
    root = tmp_path_factory.mktemp("embed")
    tokenizer_dir = root / "tokenizer"
    build_tokenizer(tokenizer_dir)
    spec = ModelSpec(model="tiny", tokenizer=str(tokenizer_dir), precision="fp32")
    torch.manual_seed(0)
    caption_tokenizer = api.build_tokenizer(spec)
    model = api.build_model(spec, caption_tokenizer).eval()
    clip = api.LoadedModel(
        model,
        api.ImagePreprocess(model.config.image_size),
        api.TextTokenizer(caption_tokenizer),
        torch.device("cpu"),
        "test",
    )
    export.export(clip, str(root / "model"))
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"fig_{i}.png" if i % 2 else f"sub/fig_{i}.png" for i in range(NUM_IMAGES)]
    for index, name in enumerate(names):
        pixels = rng.integers(0, 256, (40 + 8 * index, 72, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / name)
    captions = CAPTIONS[:NUM_IMAGES]
    table = root / "pairs.jsonl"
    rows = [
        {"image": n, "caption": c, "split": "test"} for n, c in zip(names, captions, strict=True)
    ]
    table.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {
        "root": root,
        "model": str(root / "model"),
        "images": images,
        "names": names,
        "captions": captions,
        "table": table,
        "clip": api.load(str(root / "model")),
    }


def _run(*args: str) -> None:
    assert embed.main(list(args)) == 0


def _read_parts(output: Path) -> dict[str, list[Any]]:
    parts = sorted(output.glob("part-*.parquet"))
    tables = [pq.read_table(part).to_pydict() for part in parts]
    return {name: [v for t in tables for v in t[name]] for name in tables[0]}


def test_folder_and_table_parts_hold_the_models_normalised_features(
    collection: dict[str, Any], tmp_path: Path
) -> None:
    clip, names = collection["clip"], collection["names"]
    paths = [collection["images"] / name for name in names]
    expected_images = clip.encode_images(paths).numpy()

    folder_out = tmp_path / "folder"
    _run(
        *("--input", str(collection["images"]), "--output", str(folder_out)),
        *("--model-source", collection["model"], "--part-size", "2", "--batch-size", "2"),
    )
    assert sorted(p.name for p in folder_out.glob("part-*")) == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"
    ]  # fmt: skip
    rows = _read_parts(folder_out)
    assert set(rows) == {"key", "caption", "image_embedding"}  # a folder has no captions
    order = [rows["key"].index(name) for name in names]
    image = np.array(rows["image_embedding"], dtype=np.float32)[order]
    assert image.shape == (NUM_IMAGES, clip.model.config.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(image, expected_images, atol=1e-6)
    schema = pq.read_schema(folder_out / "part-00000.parquet")
    dim = clip.model.config.embed_dim
    assert str(schema.field("image_embedding").type) == f"fixed_size_list<element: float>[{dim}]"

    table_out = tmp_path / "table"
    _run("--input", str(collection["table"]), "--image-dir", str(collection["images"]),
         "--output", str(table_out), "--model-source", collection["model"])  # fmt: skip
    rows = _read_parts(table_out)
    assert rows["key"] == names and rows["caption"] == collection["captions"]
    np.testing.assert_allclose(np.array(rows["image_embedding"]), expected_images, atol=1e-6)
    expected_texts = clip.encode_texts(collection["captions"]).numpy()
    np.testing.assert_allclose(np.array(rows["text_embedding"]), expected_texts, atol=1e-6)


def test_shards_embed_one_part_per_shard_with_their_captions(
    collection: dict[str, Any], tmp_path: Path
) -> None:
    make_shards(
        ShardOptions(
            input=str(collection["table"]),
            images=str(collection["images"]),
            output=str(tmp_path / "shards"),
            shard_size=3,
        )
    )
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    spec = str(tmp_path / "shards" / manifest["splits"]["test"]["pattern"])
    _run("--input", spec, "--output", str(tmp_path / "out"), "--model-source", collection["model"])
    assert len(list((tmp_path / "out").glob("part-*.parquet"))) == 2
    rows = _read_parts(tmp_path / "out")
    clip = collection["clip"]
    by_caption = dict(zip(rows["caption"], rows["image_embedding"], strict=True))
    assert sorted(by_caption) == sorted(collection["captions"])
    for name, caption in zip(collection["names"], collection["captions"], strict=True):
        expected = clip.encode_images([collection["images"] / name]).numpy()[0]
        np.testing.assert_allclose(by_caption[caption], expected, atol=1e-6)


def test_a_killed_run_resumes_keeping_its_finished_parts(
    collection: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "out"
    args = [
        *("--input", str(collection["table"]), "--image-dir", str(collection["images"])),
        *("--output", str(output), "--model-source", collection["model"], "--part-size", "2"),
    ]
    real_write = embed._write_part
    written: list[str] = []

    def write_then_die(fs: Any, path: str, table: Any) -> None:
        if written:  # killed while writing the second part: its staged file is left
            (output / f".tmp-{os.path.basename(path)}-killed").write_bytes(b"half a part")
            raise KeyboardInterrupt
        real_write(fs, path, table)
        written.append(path)

    monkeypatch.setattr(embed, "_write_part", write_then_die)
    assert embed.main(args) == EXIT_CODE_INTERRUPTED
    monkeypatch.setattr(embed, "_write_part", real_write)
    first = output / "part-00000.parquet"
    kept = first.stat()
    assert sorted(p.name for p in output.glob("part-*")) == ["part-00000.parquet"]

    embedded: list[int] = []
    real_embed_part = embed._embed_part
    monkeypatch.setattr(
        embed, "_embed_part", lambda clip, part, *a, **k: (
            embedded.append(part.index) or real_embed_part(clip, part, *a, **k)
        )
    )  # fmt: skip
    _run(*args)
    assert embedded == [1, 2]  # the finished part is not recomputed
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)
    assert not list(output.glob(".tmp-*"))
    assert _read_parts(output)["key"] == collection["names"]

    # Other options into the same output: refused, nothing written.
    assert embed.main([*args[:-1], "3"]) == embed.EXIT_CODE_USAGE


def test_ranks_embed_disjoint_shares(collection: dict[str, Any], tmp_path: Path) -> None:
    options = embed.EmbedOptions(
        input=str(collection["images"]),
        output=str(tmp_path / "out"),
        model_source=collection["model"],
        modalities=("image",),
        part_size=1,
    )
    written = []
    for rank in (1, 0):
        info = distributed.DistInfo(rank, rank, 2, "127.0.0.1", 0, "torchrun")
        assert embed.embed(options, info, torch.device("cpu")) == 3 - rank
        written.append(sorted(p.name for p in (tmp_path / "out").glob("part-*")))
    assert written[0] == ["part-00001.parquet", "part-00003.parquet"]
    assert len(written[1]) == NUM_IMAGES
    # A rerun with another world size finds every part written.
    single = distributed.DistInfo(0, 0, 1, "127.0.0.1", 0, "single")
    assert embed.embed(options, single, torch.device("cpu")) == 0


def test_search_prints_the_top_k_by_cosine_over_image_embeddings(
    collection: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out"
    _run("--input", str(collection["table"]), "--image-dir", str(collection["images"]),
         "--output", str(output), "--model-source", collection["model"])  # fmt: skip
    capsys.readouterr()
    query = collection["captions"][2]
    # The model is taken from the output's _embed.json.
    _run("--search", str(output), "--query", query, "--top-k", "3")
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    clip = collection["clip"]
    paths = [collection["images"] / name for name in collection["names"]]
    scores = clip.encode_images(paths).numpy() @ clip.encode_texts([query]).numpy()[0]
    best = np.argsort(-scores)[:3]
    assert [key for _, key, _ in lines] == [collection["names"][i] for i in best]
    assert [float(score) for score, _, _ in lines] == pytest.approx(scores[best], abs=1e-4)
    assert [caption for _, _, caption in lines] == [collection["captions"][i] for i in best]
