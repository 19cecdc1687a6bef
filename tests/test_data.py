"""The data pipeline on local shards made by make_shards, with real DataLoader workers:
sample-exact epochs across ranks and workers (at the 8-node ratio of readers to shards),
equal batch counts, seeded resampling, resume on the same and on other world sizes,
indexes, bad samples, unsafe members, shard specs and manifests. The order itself is
tested number by number in test_sample_order.py."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import multiprocessing
import os
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers_data import (
    IMAGE_SIZE,
    all_keys,
    caption_tokenizer,
    collect,
    data_config,
    deadline,
    keys_of,
    make_figures,
    same_batches,
    write_shards,
)
from PIL import Image

from pmc_clip import shard_index, storage, transforms
from pmc_clip.config import CLIP_MEAN, CLIP_STD, DataConfig
from pmc_clip.data.batches import POOL_SLOTS_BEYOND_PREFETCH
from pmc_clip.data.loaders import TrainLoader, build_eval_loader, build_train_loader
from pmc_clip.tokenize import CaptionTokenizer

NUM_ARTICLES = 40  # x 4 figures = 160 samples


@dataclasses.dataclass(frozen=True)
class Shards:
    root: Path
    pattern: str  # brace pattern of the shards
    keys: frozenset[str]
    num_shards: int


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return make_figures(tmp_path_factory.mktemp("figures"), NUM_ARTICLES)


def _shards(figures: tuple[str, str], root: Path, shard_size: int) -> Shards:
    manifest = write_shards(*figures, output=str(root), shard_size=shard_size)
    split = manifest["splits"]["train"]
    return Shards(
        root,
        str(root / split["pattern"]),
        frozenset(all_keys(manifest, figures[0])),
        split["shards"],
    )


@pytest.fixture(scope="module")
def even(figures: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Shards:
    """160 samples in 16 shards of 10."""
    return _shards(figures, tmp_path_factory.mktemp("even"), 10)


@pytest.fixture(scope="module")
def uneven(figures: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Shards:
    """160 samples in 23 shards: 22 of 7 and one of 6."""
    return _shards(figures, tmp_path_factory.mktemp("uneven"), 7)


@pytest.fixture(scope="module")
def two_shards(figures: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Shards:
    """160 samples in 2 shards of 100 and 60: the cluster's ratio at small scale when read
    by 4 ranks x 2 workers (>= 4 readers a shard, a reader's share ~1/5 shard)."""
    return _shards(figures, tmp_path_factory.mktemp("two"), 100)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> CaptionTokenizer:
    return caption_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def run_ranks(
    cfg: DataConfig, tokenizer: CaptionTokenizer, world_size: int, seed: int = 0, epoch: int = 0
) -> list[list[dict[str, Any]]]:
    """One epoch of every rank (each rank's loader is built exactly as its process would:
    rank and world size passed in)."""
    out = []
    for rank in range(world_size):
        loader = build_train_loader(
            cfg, tokenizer, rank=rank, world_size=world_size, seed=seed, epoch=epoch
        )
        batches = collect(loader)
        assert len(batches) == loader.num_batches
        out.append(batches)
    return out


def take(loader: TrainLoader, num_batches: int) -> list[dict[str, Any]]:
    """The first batches of a pass, then the pass is left (as a stop or a crash does)."""
    head: list[dict[str, Any]] = []
    with deadline(60):
        for batch in loader:
            head.append(batch)
            if len(head) == num_batches:
                break
    return head


def test_epoch_over_two_ranks_and_two_workers_is_exactly_the_dataset(
    even: Shards, tokenizer: CaptionTokenizer
) -> None:
    ranks = run_ranks(data_config(even.pattern), tokenizer, world_size=2)
    assert [len(batches) for batches in ranks] == [10, 10]  # 160 / (8 x 2 ranks)
    delivered = [key for batches in ranks for key in keys_of(batches)]
    assert len(delivered) == len(set(delivered)) == 160
    assert set(delivered) == even.keys
    batch = ranks[0][0]
    assert batch["images"].shape == (8, 3, IMAGE_SIZE, IMAGE_SIZE)
    # uint8, channels-last in memory (one plain copy per image): normalised by the trainer.
    assert batch["images"].dtype == torch.uint8
    assert batch["images"].is_contiguous(memory_format=torch.channels_last)
    assert batch["input_ids"].shape == batch["mlm_labels"].shape == (8, 16)
    assert set(batch) == {
        "images", "input_ids", "attention_mask", "mlm_input_ids", "mlm_labels", "keys"
    }  # fmt: skip
    # Shards shuffled per epoch: the next epoch is the same set in another order.
    next_epoch = run_ranks(data_config(even.pattern), tokenizer, world_size=2, epoch=1)
    next_keys = [keys_of(batches) for batches in next_epoch]
    assert set(next_keys[0]) | set(next_keys[1]) == even.keys
    assert next_keys[0] != keys_of(ranks[0])


def test_reused_image_buffers_never_overwrite_a_batch_the_consumer_keeps(
    even: Shards, tokenizer: CaptionTokenizer
) -> None:
    """Workers reuse their shared image buffers once the trainer's process lets go of a
    batch. A consumer that keeps every batch must see each intact (the workers fall back to
    one-off buffers), and one that lets go at once gets the same pixels from a few buffers."""
    cfg = data_config(even.pattern, batch_size=4)  # 40 batches: 20 per worker, 5 slots each
    keeper = build_train_loader(cfg, tokenizer, rank=0, world_size=1, seed=0)
    kept = collect(keeper)
    assert len(kept) == 40
    assert keeper.meter.totals()["batch_buffers_allocated"] == 40  # none could be reused

    prompt = build_train_loader(cfg, tokenizer, rank=0, world_size=1, seed=0)
    copies: dict[str, torch.Tensor] = {}
    with deadline(60):
        for batch in prompt:
            copies |= {key: batch["images"][row].clone() for row, key in enumerate(batch["keys"])}
    num_slots = cfg.num_workers * (cfg.prefetch_factor + POOL_SLOTS_BEYOND_PREFETCH)
    assert prompt.meter.totals()["batch_buffers_allocated"] <= num_slots < 40

    assert len(copies) == 160
    for batch in kept:
        for row, key in enumerate(batch["keys"]):
            assert torch.equal(batch["images"][row], copies[key]), key


def test_uneven_shards_give_every_rank_and_worker_the_same_batch_count(
    uneven: Shards, tokenizer: CaptionTokenizer
) -> None:
    cfg = data_config(uneven.pattern, batch_size=6)
    for world_size in (2, 3):
        ranks = run_ranks(cfg, tokenizer, world_size)
        # 160 // (6 x world x 2 workers) batches per worker, 2 workers per rank
        expected = 160 // (6 * world_size)  # global steps: the remainder < one global batch
        assert [len(batches) for batches in ranks] == [expected] * world_size
        assert all(len(batch["keys"]) == 6 for batches in ranks for batch in batches)
        delivered = [key for batches in ranks for key in keys_of(batches)]
        assert len(delivered) == len(set(delivered)) == expected * 6 * world_size


def test_more_readers_than_shards_every_sample_once_per_epoch_for_three_epochs(
    two_shards: Shards, tokenizer: CaptionTokenizer
) -> None:
    """4 ranks x 2 workers over 2 shards of unequal size (the 8-node ratio): each epoch
    every sample once but a remainder < one global batch, which rotates."""
    cfg = data_config(two_shards.pattern, batch_size=3)  # global batch 12: 13 steps, 4 left
    left_out = []
    for epoch in range(3):
        ranks = run_ranks(cfg, tokenizer, world_size=4, seed=5, epoch=epoch)
        assert [len(batches) for batches in ranks] == [13] * 4
        delivered = [key for batches in ranks for key in keys_of(batches)]
        assert len(delivered) == len(set(delivered)) == 156
        left_out.append(two_shards.keys - set(delivered))
        assert len(left_out[-1]) == 4
    assert left_out[0] != left_out[1] != left_out[2]
    # Local shards are read by seeks: by default every sample is placed on its own.
    default = build_train_loader(
        data_config(two_shards.pattern, span_samples=None), tokenizer, rank=0, world_size=4, seed=0
    )
    assert default.state_dict()["span_samples"] == 1
    with pytest.raises(ValueError, match="less than one global batch"):
        build_train_loader(
            data_config(two_shards.pattern, batch_size=64), tokenizer, rank=0, world_size=4, seed=0
        )
    with pytest.raises(ValueError, match="multiple of the 3 canonical nodes"):
        build_train_loader(
            data_config(two_shards.pattern, num_canonical_nodes=3),
            tokenizer,
            rank=0,
            world_size=2,
            seed=0,
        )


def test_resampled_epochs_cover_every_position_of_a_shard_evenly(
    two_shards: Shards, tokenizer: CaptionTokenizer
) -> None:
    """Resampling draws runs at any position of a shard (wrapping inside it): the start of
    a shard is not favoured. 3 epochs of 400 draws over 2 ranks x 2 workers."""
    cfg = data_config(
        two_shards.pattern, batch_size=4, dataset_resampled=True, train_num_samples=400
    )
    position = {}
    for shard in sorted(two_shards.root.glob("*.tar")):
        with open(shard, "rb") as file:
            index = shard_index.build_index(file, shard.stat().st_size)
        for i, key in enumerate(index.keys.tolist()):
            position[key] = i / index.num_samples
    deciles = np.zeros(10)
    for epoch in range(3):
        for batches in run_ranks(cfg, tokenizer, world_size=2, seed=1, epoch=epoch):
            for key in keys_of(batches):
                deciles[int(position[key] * 10)] += 1
    assert deciles.sum() == 3 * 400
    # 120 expected per decile; binomial sd ~10.4: within 35% (~4 sd).
    assert np.all(np.abs(deciles / 120 - 1) < 0.35), deciles


def test_resampled_streams_are_seeded(even: Shards, tokenizer: CaptionTokenizer) -> None:
    cfg = data_config(even.pattern, dataset_resampled=True)
    first = run_ranks(cfg, tokenizer, world_size=2, seed=7)
    again = run_ranks(cfg, tokenizer, world_size=2, seed=7)
    other = run_ranks(cfg, tokenizer, world_size=2, seed=8)
    for rank in range(2):
        assert same_batches(first[rank], again[rank])
        assert keys_of(first[rank]) != keys_of(other[rank])
    assert [len(b) for b in first] == [len(b) for b in other] == [10, 10]
    # Ranks draw differently from each other, and with replacement.
    assert keys_of(first[0]) != keys_of(first[1])
    next_epoch = run_ranks(cfg, tokenizer, world_size=2, seed=7, epoch=1)
    assert keys_of(next_epoch[0]) != keys_of(first[0])


def test_workers_persist_across_epochs_and_a_left_pass_restarts_them(
    even: Shards, tokenizer: CaptionTokenizer
) -> None:
    others = {process.pid for process in multiprocessing.active_children()}

    def worker_pids() -> set[int | None]:
        return {process.pid for process in multiprocessing.active_children()} - others

    cfg = data_config(even.pattern)
    loader = build_train_loader(cfg, tokenizer, rank=0, world_size=2, seed=1)
    first = collect(loader)
    workers = worker_pids()
    assert len(workers) == 2  # alive after their epoch
    loader.set_epoch(1)
    # Epoch 1 from the same processes, yet its own stream (not epoch 0's again): exactly
    # a fresh loader's epoch 1.
    second = collect(loader)
    assert worker_pids() == workers
    fresh = collect(build_train_loader(cfg, tokenizer, rank=0, world_size=2, seed=1, epoch=1))
    assert same_batches(second, fresh)
    assert keys_of(second) != keys_of(first)
    # A pass left early takes its workers along; new ones continue where it stopped.
    loader.set_epoch(2)
    head = take(loader, 3)
    rest = collect(loader)
    assert len(worker_pids()) == 2 and not worker_pids() & workers
    # The new workers decode only what they deliver: nothing before the resume point.
    assert loader.meter.totals()["samples_read"] == len(rest) * 8
    assert same_batches(
        head + rest,
        collect(build_train_loader(cfg, tokenizer, rank=0, world_size=2, seed=1, epoch=2)),
    )


@pytest.mark.parametrize("resampled", [False, True])
def test_resume_continues_the_stream_exactly(
    even: Shards, tokenizer: CaptionTokenizer, resampled: bool
) -> None:
    cfg = data_config(even.pattern, dataset_resampled=resampled)
    loader = build_train_loader(cfg, tokenizer, rank=1, world_size=2, seed=3, epoch=2)
    full = collect(loader)
    assert loader.state_dict()["samples_consumed"] == 16 * len(full) == 160
    for step in (3, 4, 9):  # on either worker's turn, and at 90% of the epoch
        interrupted = build_train_loader(cfg, tokenizer, rank=1, world_size=2, seed=3, epoch=2)
        head = take(interrupted, step)
        state = interrupted.state_dict()
        assert (state["epoch"], state["samples_consumed"]) == (2, step * 16)
        resumed = build_train_loader(cfg, tokenizer, rank=1, world_size=2, seed=3, epoch=0)
        resumed.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint holds it
        assert len(resumed) == 10 - step
        rest = collect(resumed)
        # Same keys, crops (pixels) and MLM masks as the uninterrupted epoch.
        assert same_batches(head + rest, full)
        assert resumed.state_dict()["samples_consumed"] == 160
        assert resumed.meter.totals()["samples_read"] == (10 - step) * 8  # none skipped
    with pytest.raises(ValueError, match="seed 3 -> 4"):
        build_train_loader(cfg, tokenizer, rank=1, world_size=2, seed=4).load_state_dict(state)


def test_resume_on_other_world_sizes_and_worker_counts_finishes_the_same_epoch(
    two_shards: Shards, tokenizer: CaptionTokenizer
) -> None:
    """Stopped at 4 ranks x 2 workers after 3 steps; resumed at 2 ranks x 1 worker and at
    3 ranks x 3 workers (the canonical node count, 2, is the saved one): the samples
    before and after are the epoch, none twice."""
    cfg = data_config(two_shards.pattern, batch_size=2, num_canonical_nodes=2)
    before: list[str] = []
    states = []
    for rank in range(4):
        loader = build_train_loader(
            cfg, tokenizer, rank=rank, world_size=4, seed=9, epoch=1, ranks_per_node=2
        )
        before += keys_of(take(loader, 3))
        states.append(loader.state_dict())
    assert all(state == states[0] for state in states)  # every rank saves the same position
    assert states[0]["samples_consumed"] == 3 * 8 and states[0]["num_canonical_nodes"] == 2
    for world_size, workers, batch_size in ((2, 1, 4), (3, 3, 2)):
        after: list[str] = []
        other = data_config(two_shards.pattern, batch_size=batch_size, num_workers=workers)
        for rank in range(world_size):
            loader = build_train_loader(other, tokenizer, rank=rank, world_size=world_size, seed=9)
            loader.load_state_dict(states[rank % 4])
            batches = collect(loader)
            assert loader.meter.totals()["samples_read"] == len(batches) * batch_size
            after += keys_of(batches)
        global_batch = world_size * batch_size
        assert len(before) == len(set(before)) == 24
        assert len(after) == len(set(after)) == (160 - 24) // global_batch * global_batch
        assert not set(before) & set(after)
        assert len(two_shards.keys - set(before) - set(after)) < global_batch
    with pytest.raises(ValueError, match="multiple of the 2 canonical nodes"):
        odd = data_config(two_shards.pattern, batch_size=3)
        build_train_loader(odd, tokenizer, rank=0, world_size=1, seed=9).load_state_dict(states[0])


def test_eval_loader_delivers_every_sample_once_with_a_partial_last_batch(
    uneven: Shards, tokenizer: CaptionTokenizer
) -> None:
    cfg = dataclasses.replace(data_config(None, val_data=uneven.pattern), val_batch_size=16)
    delivered: list[str] = []
    for rank in range(2):
        loader = build_eval_loader(cfg, tokenizer, rank=rank, world_size=2)
        batches = collect(loader)
        assert loader.rank_num_samples() == sum(len(b["keys"]) for b in batches)
        assert any(len(b["keys"]) < 16 for b in batches)
        delivered += keys_of(batches)
        # Eval: centre crops, the same each time.
        assert same_batches(
            batches, collect(build_eval_loader(cfg, tokenizer, rank=rank, world_size=2))
        )
    assert len(delivered) == 160 and set(delivered) == uneven.keys
    assert loader.num_samples == 160


def _write_tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample["__key__"].decode()
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _jpeg(size: tuple[int, int] = (40, 30), colour: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG")
    return buffer.getvalue()


class _Exploit:
    """Unpickling this writes a file: proof that something unpickled shard content."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.marker, "unpickled!"))


def test_bad_samples_are_skipped_and_counted_and_pickles_never_loaded(
    tmp_path: Path, tokenizer: CaptionTokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "unpickled.txt"
    payload = pickle.dumps(_Exploit(marker))
    good = [
        {"__key__": f"good{i}".encode(), "jpg": _jpeg(), "txt": b"a red square"} for i in range(6)
    ]
    good[0] |= {"pyd": payload, "pth": payload, "pickle": payload}
    bad = [
        {"__key__": b"truncated", "jpg": _jpeg()[:100], "txt": b"cut"},
        {"__key__": b"notutf8", "jpg": _jpeg(), "txt": b"\xff\xfe caption"},
        {"__key__": b"noimage", "txt": b"caption only"},
        {"__key__": b"pngasjpg", "jpg": b"GIF89a not an allowed format", "txt": b"x"},
        {"__key__": b"blank", "jpg": _jpeg(), "txt": b" \n\t "},  # nothing to contrast
    ]
    _write_tar(tmp_path / "mixed-0.tar", good[:3] + bad[:2])
    _write_tar(tmp_path / "mixed-1.tar", good[3:] + bad[2:])
    (tmp_path / "sizes.json").write_text(json.dumps({"mixed-0.tar": 5, "mixed-1.tar": 6}))
    cfg = data_config(None, val_data=str(tmp_path / "mixed-{0..1}.tar"), num_workers=0)
    loader = build_eval_loader(cfg, tokenizer, rank=0, world_size=1)
    with caplog.at_level(logging.WARNING, logger="pmc_clip.data"):
        batches = collect(loader)
    assert sorted(keys_of(batches)) == [f"good{i}" for i in range(6)]
    totals = loader.meter.totals()
    assert (totals["samples_read"], totals["samples_bad"], totals["samples_delivered"]) == (
        11, 5, 6
    )  # fmt: skip
    assert not marker.exists()
    assert "bad sample" in caplog.text and "notutf8" in caplog.text
    assert "'blank' in" in caplog.text and "empty caption" in caplog.text
    # Training: every step is a whole batch; the 5 bad samples are replaced by good ones of
    # their batch and counted.
    for shard in tmp_path.glob("mixed-*.tar"):
        with open(shard, "rb") as file:
            index = shard_index.build_index(file, shard.stat().st_size)
        shard.with_suffix(".idx").write_bytes(index.to_bytes())
    train = data_config(str(tmp_path / "mixed-{0..1}.tar"), batch_size=11, num_workers=0)
    loader = build_train_loader(train, tokenizer, rank=0, world_size=1, seed=0)
    batches = collect(loader)
    assert [len(batch["keys"]) for batch in batches] == [11]
    assert set(keys_of(batches)) <= {f"good{i}" for i in range(6)}
    totals = loader.meter.totals()
    assert (totals["samples_read"], totals["samples_bad"], totals["samples_substituted"]) == (
        11, 5, 5
    )  # fmt: skip
    assert not marker.exists()


def test_shards_without_manifest_are_counted_by_their_indexes_and_need_one(
    even: Shards, tmp_path: Path, tokenizer: CaptionTokenizer
) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for tar in even.root.glob("*.tar"):
        (bare / tar.name).symlink_to(tar)
    pattern = str(bare / Path(even.pattern).name)
    with pytest.raises(
        ValueError, match=r"16 of 16 --train-data shards have no sample index.*index_shards\.py"
    ):
        build_train_loader(data_config(pattern), tokenizer, rank=0, world_size=1, seed=0)
    for index in even.root.glob("*.idx"):
        (bare / index.name).symlink_to(index)
    loader = build_train_loader(data_config(pattern), tokenizer, rank=0, world_size=1, seed=0)
    assert loader.num_samples == 160
    with pytest.raises(ValueError, match="without --dataset-resampled an epoch is every"):
        build_train_loader(
            data_config(pattern, train_num_samples=64), tokenizer, rank=0, world_size=1, seed=0
        )
    resampled = data_config(pattern, train_num_samples=64, dataset_resampled=True)
    assert build_train_loader(resampled, tokenizer, rank=0, world_size=1, seed=0).num_samples == 64


def test_a_shard_changed_after_indexing_is_an_error_naming_the_tool(
    even: Shards, tmp_path: Path, tokenizer: CaptionTokenizer
) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in even.root.iterdir():
        if path.is_file():
            (copy / path.name).write_bytes(path.read_bytes())
    shard = copy / "pmc-oa-train-000003.tar"
    shard.write_bytes(shard.read_bytes() + b"\0" * 1024)  # rewritten: another size
    loader = build_train_loader(
        data_config(str(copy / Path(even.pattern).name), num_workers=0),
        tokenizer,
        rank=0,
        world_size=1,
        seed=0,
    )
    with pytest.raises(ValueError, match=r"000003\.tar is \d+ bytes, its index says.*index_shards"):
        collect(loader)
    # Rewritten at the same size (a member's header changed): caught by its checksum.
    shard.write_bytes((even.root / shard.name).read_bytes().replace(b"0000444", b"0000400", 1))
    loader = build_train_loader(
        data_config(str(copy / Path(even.pattern).name), num_workers=0),
        tokenizer,
        rank=0,
        world_size=1,
        seed=0,
    )
    with pytest.raises(ValueError, match=r"000003\.tar has no valid tar header.*index_shards"):
        collect(loader)


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_fifo_in_place_of_a_shard_is_refused_without_blocking(
    even: Shards,
    tmp_path: Path,
    tokenizer: CaptionTokenizer,
    caplog: pytest.LogCaptureFixture,
    split: str,
) -> None:
    for path in even.root.iterdir():
        if path.is_file():
            (tmp_path / path.name).symlink_to(path)
    (tmp_path / "pmc-oa-train-000003.tar").unlink()
    os.mkfifo(tmp_path / "pmc-oa-train-000003.tar")  # opening it would wait for a writer
    pattern = str(tmp_path / Path(even.pattern).name)
    if split == "train":
        loader: Any = build_train_loader(
            data_config(pattern, num_workers=0), tokenizer, rank=0, world_size=1, seed=0
        )
    else:
        cfg = data_config(None, val_data=pattern, val_batch_size=8, num_workers=0)
        loader = build_eval_loader(cfg, tokenizer, rank=0, world_size=1)
    with caplog.at_level(logging.WARNING):
        batches = collect(loader, seconds=60)
    assert "000003.tar" in caplog.text and "not a regular file" in caplog.text
    if split == "train":
        assert len(batches) == 20 and all(len(batch["keys"]) == 8 for batch in batches)
        assert loader.meter.totals()["samples_substituted"] == 10  # the shard's samples
    else:  # skipped: every other shard's samples evaluated once
        assert len(keys_of(batches)) == len(set(keys_of(batches))) == 160 - 10


def test_sources_joined_with_double_colon_weights_and_no_pipe(
    even: Shards, uneven: Shards, tokenizer: CaptionTokenizer
) -> None:
    spec = f"{even.pattern}::{uneven.pattern}"
    assert [len(urls) for urls in storage.expand_spec(spec)] == [16, 23]
    loader = build_train_loader(data_config(spec), tokenizer, rank=0, world_size=1, seed=0)
    assert loader.num_samples == 320  # both manifests read
    with pytest.raises(ValueError, match="needs --dataset-resampled"):
        data_config(spec, train_data_upsampling_factors=(1.0, 3.0))
    with pytest.raises(ValueError, match="2 '::'-joined"):
        data_config(spec, train_data_upsampling_factors=(1.0,), dataset_resampled=True)
    weighted = data_config(spec, train_data_upsampling_factors=(1.0, 3.0), dataset_resampled=True)
    weighted_loader = build_train_loader(weighted, tokenizer, rank=0, world_size=1, seed=0)
    assert weighted_loader.num_samples == 160 + 3 * 160
    drawn = keys_of(collect(weighted_loader))
    # Each source has the same keys; upsampled 3x, the second source's shards (23 of them,
    # other names) provide ~3/4 of the draws: checked on the order in test_sample_order.
    assert len(drawn) == 640
    # Training reads byte ranges: a pipe: source is refused at start-up.
    first = f"{even.root}/pmc-oa-train-000000.tar"
    with pytest.raises(ValueError, match="pipe: command cannot serve"):
        build_train_loader(
            data_config(f"pipe:cat {first}"), tokenizer, rank=0, world_size=1, seed=0
        )


@pytest.mark.parametrize("count", [4.5, True, None, "8", [8], -1])
def test_manifest_counts_must_be_non_negative_integers(
    even: Shards, tmp_path: Path, tokenizer: CaptionTokenizer, count: Any
) -> None:
    for path in even.root.glob("pmc-oa-train-00000[01].*"):
        (tmp_path / path.name).symlink_to(path)
    sizes = {"pmc-oa-train-000000.tar": 10, "pmc-oa-train-000001.tar": count}
    (tmp_path / "sizes.json").write_text(json.dumps(sizes))
    with pytest.raises(ValueError, match=r"sizes\.json: the sample count of 'pmc-oa-train-000001"):
        build_train_loader(
            data_config(str(tmp_path / "pmc-oa-train-{000000..000001}.tar")),
            tokenizer,
            rank=0,
            world_size=1,
            seed=0,
        )


def test_spec_and_config_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="empty shard source"):
        storage.expand_spec("a-{0..1}.tar::")
    with pytest.raises(ValueError, match="--crop-scale"):
        DataConfig(crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="--batch-size"):
        DataConfig(batch_size=0)


def test_random_resized_crop_matches_torchvision_semantics() -> None:
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(500):
        left, top, width, height = transforms.random_resized_crop_box(200, 100, (0.5, 1.0), rng)
        assert left >= 0 and left + width <= 200 and top >= 0 and top + height <= 100
        areas.append(width * height / 20_000)
        ratio = width / height
        assert 3 / 4 - 0.05 <= ratio <= 4 / 3 + 0.05 or (width, height) == (133, 100)
    assert min(areas) >= 0.45 and max(areas) <= 1.0
    a = transforms.random_resized_crop_box(64, 64, (0.5, 1.0), np.random.default_rng(5))
    b = transforms.random_resized_crop_box(64, 64, (0.5, 1.0), np.random.default_rng(5))
    assert a == b


def test_draft_decode_matches_full_decode() -> None:
    # A smooth gradient: the DCT-scaled decode of a large JPEG must match the full one.
    across, down = np.meshgrid(np.linspace(0, 255, 1024), np.linspace(0, 255, 768))
    pixels = np.stack([across, down, np.full_like(across, 128.0)], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=95)
    box = (100, 50, 700, 600)
    with Image.open(io.BytesIO(buffer.getvalue())) as image:
        fast = transforms.crop_to_pixels(image, box, 64)
        assert image.size[0] < 1024  # decoded at reduced scale
    with Image.open(io.BytesIO(buffer.getvalue())) as image:
        image.load()  # a loaded image is not drafted: full decode
        full = transforms.crop_to_pixels(image, box, 64)
    assert fast.shape == full.shape == (64, 64, 3) and fast.dtype == np.uint8
    assert np.abs(fast.astype(np.float32) - full).mean() < 3.0
    # Odd sizes: libjpeg rounds each reduced side up; a box touching the far corner holds.
    buffer = io.BytesIO()
    Image.new("RGB", (1001, 767), "blue").save(buffer, "JPEG")
    with Image.open(io.BytesIO(buffer.getvalue())) as image:
        assert transforms.crop_to_pixels(image, (301, 199, 700, 568), 64).shape == (64, 64, 3)


def test_batches_hold_the_pixels_and_normalise_in_either_layout() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=(2, 5, 5, 3), dtype=np.uint8)
    batch = transforms.empty_batch(2, 5)
    for slot, image in zip(batch, pixels, strict=True):
        transforms.write_image(slot, image)
    assert torch.equal(batch, torch.from_numpy(pixels).permute(0, 3, 1, 2))
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float64).view(1, 3, 1, 1)
    expected = (batch.double() / 255.0 - mean) / std
    normalized = transforms.normalize_images(batch)
    assert normalized.dtype == torch.float32 and normalized.is_contiguous()
    assert torch.allclose(normalized.double(), expected, atol=1e-5)
    # The model's memory format is the caller's choice; the values do not depend on it.
    channels_last = transforms.normalize_images(batch, torch.channels_last)
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(channels_last, normalized)
