"""The streaming data pipeline: webdataset shards (local, s3:// or any fsspec URL) into
per-rank DataLoaders whose batches are dicts of tensors.

    loader = build_train_loader(config.data, caption_tokenizer, rank, world_size, seed,
                                ranks_per_node=local_world_size)
    loader.set_epoch(epoch)            # or loader.load_state_dict(saved) on resume
    for batch in loader:               # len(loader) batches, identical on every rank
        batch["images"], batch["input_ids"], batch["attention_mask"], batch["keys"]
    loader.meter.snapshot()            # samples/s, data-wait seconds, read/skip counters

Training: sample-exact epochs (`sample_order`). An epoch is a seeded order of every
training sample, fixed by (seed, epoch, canonical node count, span size) and independent
of the world size and worker count; global step t takes the next batch_size x world_size
samples of it and each rank its share. Every sample is seen once per epoch, at any ratio of
readers to shards and with shards of any size; only a remainder smaller than one global
batch waits, a different one every epoch. Every rank yields the same number of batches,
each exactly batch_size samples. Inside every data-loader worker the stream is a list of
small stages:

    worker_step_runs (this worker's steps: steps w, w + num_workers, ... of the pass)
      -> read_steps (runs of consecutive samples by byte range, read ahead: shard_runs)
      -> decode_step (crop and MLM mask seeded by the sample's place in the order)
      -> fill_step (exactly batch_size: a bad or unreadable sample is replaced by another
         of its batch and counted as samples_substituted) -> batch

The shards need their sample index (`shard_index`, written by make_shards; for shards from
other tools `python tools/index_shards.py SPEC`); a shard without one is a start-up error.
Resume: `state_dict()` is the epoch, the samples consumed and the order's parameters; a
resumed loader continues that epoch at its own world size and worker count and reads
nothing before the resume point.

Evaluation: every val shard once, split by rank then worker, in order (the shard opener
of `storage`, read front to back by `shard_index.tar_members`), the last batch partial:

    shard_urls -> read_shards -> decode_and_transform -> batch

Hostile shards cost bounded time and memory in both: member sizes are checked before
anything is read (training: in the index; evaluation: in each tar header, against the
shard's size), a member claiming more bytes than its shard holds stops that shard at once
(evaluation: a warning, its remaining samples counted as missing), a kept member over
`--max-member-bytes` makes a bad sample without being read, and members the loader drops
are never read into memory. Only plain `.tar` shards are read: a compressed one could
inflate past every limit before its sizes were known.

Batches cross from a worker to the trainer's process in shared memory. Each worker reuses
a small pool of image buffers (`BatchBufferPool`): a slot goes back to the worker once the
trainer's process holds no tensor on it (or the pin-memory thread has copied it), so a
consumer may keep any batch as long as it likes; keeping many only costs fresh buffers
(counted as `batch_buffers_allocated`).

Security: only image members (jpg/jpeg/png/webp, opened with PIL restricted to those
formats), `.txt` (strict UTF-8) and `.json` are read; anything else in a shard (`.pyd`,
`.pth`, `.npy`, ...) is skipped unread. Shard content is never unpickled.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import itertools
import json
import logging
import os
import posixpath
import stat
import tarfile
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pmc_clip import shard_index, storage, transforms
from pmc_clip.config import DataConfig
from pmc_clip.sample_order import EpochOrder, OrderConfig, Run
from pmc_clip.shard_cache import check_cache_limit
from pmc_clip.shard_index import INDEX_TOOL
from pmc_clip.shard_runs import SKIPPED_KEY, RunReader, RunResult, oversized_member
from pmc_clip.tokenize import CaptionTokenizer

_log = logging.getLogger(__name__)

SIZE_FILES = ("sizes.json", "manifest.json")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
PIL_FORMATS = ("JPEG", "PNG", "WEBP")
KEPT_EXTENSIONS = frozenset((*IMAGE_EXTENSIONS, "txt", "json"))
STATS_KEY = "_stats"  # worker counters riding along each batch; the loader pops them
BUFFER_KEY = "_buffer"  # (worker, pool slot) of a batch's image buffer; the loader pops it
# (names, [N, B, L] tensor): a batch's token tensors stacked, so a worker ships one shared
# tensor instead of N (each costs the trainer's process ~0.6 ms: a socket connection to the
# worker for its file descriptor, then an mmap); the loader unpacks them into views.
TOKENS_KEY = "_tokens"
# Image buffers per worker beyond its prefetched batches: the batch the trainer holds, the
# one the previous step's variables still hold, and the one being filled.
POOL_SLOTS_BEYOND_PREFETCH = 3
_WARN_FIRST = 10  # warnings logged per worker and kind before only every _WARN_EVERY-th
_WARN_EVERY = 1000


# --------------------------------------------------------------------------- shard specs


@dataclass(frozen=True)
class ShardSource:
    """One `::`-separated part of a shard spec."""

    spec: str  # the pattern as given (may hold credentials: print redact_url(spec))
    urls: tuple[str, ...]
    weight: float
    shard_sizes: dict[str, int] | None  # url -> samples, from the manifest; None: unknown

    @property
    def num_samples(self) -> int | None:
        return None if self.shard_sizes is None else sum(self.shard_sizes.values())


@dataclass(frozen=True)
class Dataset:
    """The resolved shard list of --train-data or --val-data."""

    sources: tuple[ShardSource, ...]
    num_samples: int  # per epoch (manifest sum, weighted by upsampling, or the override)

    @property
    def urls(self) -> list[str]:
        return [url for source in self.sources for url in source.urls]

    @property
    def weights(self) -> list[float]:
        return [source.weight for source in self.sources for _ in source.urls]

    def shard_size(self, url: str) -> int | None:
        for source in self.sources:
            if source.shard_sizes is not None and url in source.shard_sizes:
                return source.shard_sizes[url]
        return None


def read_shard_sizes(urls: list[str]) -> dict[str, int] | None:
    """Samples per shard from the sizes.json (or manifest.json) next to the shards, read
    through fsspec; None when a folder has neither (or the source is a `pipe:`)."""
    by_folder: dict[str, list[str]] = {}
    for url in urls:
        if url.startswith("pipe:"):
            return None
        by_folder.setdefault(posixpath.dirname(url), []).append(url)
    sizes: dict[str, int] = {}
    for folder, folder_urls in by_folder.items():
        counts = _read_folder_sizes(folder)
        if counts is None:
            return None
        for url in folder_urls:
            name = posixpath.basename(url)
            if name not in counts:
                raise ValueError(
                    f"{storage.redact_url(url)} is not listed in the sizes.json/manifest.json "
                    f"of {storage.redact_url(folder or '.')}: the manifest belongs to other "
                    "shards; regenerate it or pass --train-num-samples/--val-num-samples"
                )
            sizes[url] = counts[name]
    return sizes


def _read_folder_sizes(folder: str) -> dict[str, int] | None:
    fs, root = storage.url_to_fs(folder or ".")
    for name in SIZE_FILES:
        path = storage.join(root, name)
        try:
            document = json.loads(storage.read_bytes(fs, path))
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            url = storage.join(folder, name)
            raise ValueError(
                f"cannot read {storage.redact_url(url)}: {storage.describe_error(exc, url)}"
            ) from None
        where = storage.redact_url(storage.join(folder, name))
        try:
            if name == "sizes.json":
                pairs = list(document.items())
            else:
                pairs = [(s["name"], s["count"]) for s in document["shards"]]
        except (AttributeError, KeyError, TypeError):
            raise ValueError(
                f"{where} is not a {name} (shard name -> sample count); regenerate it"
            ) from None
        return {str(shard): _sample_count(count, where, shard) for shard, count in pairs}
    return None


def _sample_count(value: Any, where: str, shard: str) -> int:
    """A manifest's sample count: a non-negative integer (not a float, bool or string)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"{where}: the sample count of {shard!r} is {json.dumps(value)}, not a "
            "non-negative integer; regenerate the manifest (make_shards) or fix the file"
        )
    return value


def resolve_dataset(
    spec: str,
    num_samples_override: int | None,
    weights: tuple[float, ...] | None = None,
    flag: str = "--train-data",
    need_sizes: bool = True,
) -> Dataset:
    """Expand `spec`, read its sizes, and fix the samples per epoch.

    Per epoch: the override if given, else the sum over sources of
    upsampling factor x samples in the source's manifest. Without `need_sizes` (training:
    the shard indexes know the counts) a source without a manifest is no error.
    """
    expanded = storage.expand_spec(spec)
    weights = weights or tuple(1.0 for _ in expanded)
    assert len(weights) == len(expanded), (weights, len(expanded))
    sources = []
    for part, urls, weight in zip(
        spec.split(storage.SOURCE_SEPARATOR), expanded, weights, strict=True
    ):
        sizes = None if num_samples_override is not None else read_shard_sizes(urls)
        if sizes is None and num_samples_override is None and need_sizes:
            raise ValueError(
                f"{flag} source {storage.redact_url(part.strip())} has no sizes.json or "
                f"manifest.json next to its shards, so its size is unknown: pass "
                f"{flag.replace('-data', '-num-samples')} (samples per epoch)"
            )
        sources.append(ShardSource(part.strip(), tuple(urls), weight, sizes))
    if num_samples_override is not None:
        num_samples = num_samples_override
    else:
        num_samples = round(sum(s.weight * (s.num_samples or 0) for s in sources))
    return Dataset(tuple(sources), num_samples)


# --------------------------------------------------------------------------- epoch plan

# Default span of the sample order (--shuffle-span-samples), measured in bench/RESULTS.md:
# where a run is a seek (local or node-cached shards), every sample is placed on its own,
# and a global batch mixes as many articles as it has samples; where a run is a request to
# object storage, 32 consecutive samples (~1-6 MB for PMC-OA figures) keep the requests
# per sample at 1/32, at the price of fewer articles a batch when shards hold an
# article's subfigures side by side (make_shards --shuffle writes them apart).
SPAN_SAMPLES_RANDOM_ACCESS = 1
SPAN_SAMPLES_STREAMING = 32


@dataclass(frozen=True)
class TrainShards:
    """The training shards as the sample order sees them: samples and weight per shard."""

    urls: tuple[str, ...]
    num_samples: tuple[int, ...]
    weights: tuple[float, ...]  # the upsampling factor of each shard's source


@dataclass(frozen=True)
class EpochPlan:
    """How one rank's training batches are cut from the epoch's sample order
    (sample_order): global step t takes the next `global_batch` samples."""

    batch_size: int  # per rank
    world_size: int
    num_workers: int  # >= 1: 0 DataLoader workers means one stream in the main process
    order: OrderConfig

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def num_batches(self) -> int:
        """Per rank, in a whole epoch (the same on every rank)."""
        return self.order.samples_per_epoch // self.global_batch

    @property
    def num_samples(self) -> int:
        """Over all ranks, per whole epoch."""
        return self.num_batches * self.global_batch

    def num_batches_after(self, consumed: int) -> int:
        """Per rank, left in the epoch after `consumed` samples (a resume)."""
        return (self.order.samples_per_epoch - consumed) // self.global_batch


def plan_train_epoch(
    shards: TrainShards,
    config: DataConfig,
    world_size: int,
    ranks_per_node: int,
    seed: int,
) -> EpochPlan:
    """The plan of a fresh run; the canonical node count defaults to this run's nodes."""
    if world_size % ranks_per_node:
        raise ValueError(f"world size {world_size} is not a multiple of {ranks_per_node} per node")
    num_canonical_nodes = config.num_canonical_nodes or world_size // ranks_per_node
    total = sum(shards.num_samples)
    if config.dataset_resampled:
        samples_per_epoch = config.train_num_samples or round(
            sum(n * w for n, w in zip(shards.num_samples, shards.weights, strict=True))
        )
    else:
        if config.train_num_samples not in (None, total):
            raise ValueError(
                f"--train-num-samples {config.train_num_samples}: without --dataset-resampled "
                f"an epoch is every training sample once ({total} in --train-data's "
                "manifests/indexes); drop the flag, or add --dataset-resampled to draw "
                "epochs of that length"
            )
        samples_per_epoch = total
    random_access = config.cache_dir is not None or all(map(storage.is_local_url, shards.urls))
    span_samples = config.span_samples or (
        SPAN_SAMPLES_RANDOM_ACCESS if random_access else SPAN_SAMPLES_STREAMING
    )
    order = OrderConfig(
        seed, num_canonical_nodes, span_samples, config.dataset_resampled, samples_per_epoch
    )
    plan = EpochPlan(config.batch_size, world_size, max(1, config.num_workers), order)
    check_plan(plan)
    return plan


def check_plan(plan: EpochPlan) -> None:
    """Start-up checks shared by a fresh plan and a resumed one."""
    nodes = plan.order.num_canonical_nodes
    if plan.global_batch % nodes:
        raise ValueError(
            f"the global batch ({plan.batch_size} x {plan.world_size} ranks = "
            f"{plan.global_batch}) must be a multiple of the {nodes} canonical nodes of the "
            "sample order (--num-canonical-nodes, or the run's node count): every step takes "
            "an equal share of every node's samples. Change --batch-size"
        )
    if plan.num_batches < 1:
        raise ValueError(
            f"an epoch of {plan.order.samples_per_epoch} samples is less than one global batch "
            f"({plan.batch_size} x {plan.world_size} ranks = {plan.global_batch}): lower "
            "--batch-size"
        )


# --------------------------------------------------------------------------- stages


@dataclass
class WorkerCounters:
    """One worker's counters for one epoch (shipped to the main process with each batch)."""

    worker: int = 0
    samples_read: int = 0
    samples_bad: int = 0
    samples_delivered: int = 0
    # Train: bad or unreadable samples replaced by another of their batch (fill_step).
    samples_substituted: int = 0
    runs_read: int = 0  # train: runs of consecutive samples fetched
    stream_errors: int = 0
    # Samples a shard's manifest count promised but the shard did not hold (a tar cut at
    # a member boundary reads as a shorter, valid archive: only the count shows the loss).
    samples_missing: int = 0
    # Samples a val shard held beyond its manifest count (the manifest is of another version).
    samples_unlisted: int = 0
    # Batch image buffers allocated in shared memory; once the pool is warm only a consumer
    # that keeps batches alive (or more of them than the pool holds) makes this grow.
    batch_buffers_allocated: int = 0
    read: storage.ShardReadCounters = dataclasses.field(default_factory=storage.ShardReadCounters)

    def as_dict(self) -> dict[str, int]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "read"}
        out |= {f"shard_{k}": v for k, v in self.read.as_dict().items()}
        return out


class _RateLimitedWarning:
    def __init__(self, what: str) -> None:
        self.what, self.count = what, 0

    def __call__(self, message: str) -> None:
        self.count += 1
        if self.count <= _WARN_FIRST or self.count % _WARN_EVERY == 0:
            _log.warning("%s #%d: %s", self.what, self.count, message)


def _stream_error_handler(counters: WorkerCounters) -> Callable[[BaseException], bool]:
    """webdataset handler: an unreadable shard or a broken tar is warned about, counted,
    and skipped (the stream goes on with the next shard)."""
    warn = _RateLimitedWarning("skipped shard data")

    def handler(exc: BaseException) -> bool:
        counters.stream_errors += 1
        texts = [arg for arg in exc.args if isinstance(arg, str)]  # webdataset adds the URL
        text = " ".join(t for i, t in enumerate(texts) if not any(t in u for u in texts[:i]))
        warn(f"{type(exc).__name__}: {storage.redact_url(text)}")
        return True

    return handler


def shard_urls(
    urls: Iterable[str], opener: storage.ShardOpener
) -> Callable[[], Iterator[dict[str, str]]]:
    """The pipeline's source: the worker's shards, in order, each opened ahead (a remote
    one, in a background thread) while the one before it is read."""

    def source() -> Iterator[dict[str, str]]:
        upcoming = iter(urls)
        url = next(upcoming, None)
        try:
            while url is not None:
                following = next(upcoming, None)
                if following is not None:
                    opener.open_ahead(following)
                yield {"url": url}  # read_shards opens it (opener.open) and reads it
                url = following
        finally:
            opener.discard_ahead()

    return source


def read_shards(
    opener: storage.ShardOpener,
    counters: WorkerCounters,
    expected_count: Callable[[str], int | None],
    max_member_bytes: int,
) -> Callable[[Iterable[dict[str, str]]], Iterator[dict[str, Any]]]:
    """Evaluation stage: shard URLs ({url}) -> samples ({__key__, __url__, ext: bytes}),
    members grouped by key as webdataset's group_by_keys groups them.

    Each shard is opened with storage's opener (a local file is refused at once unless it
    is a regular file; remote URLs are read with retried range requests) and read through
    shard_index.tar_members, so sizes are checked before reading: a member claiming more
    bytes than the shard holds stops the shard at once, a kept member over
    `max_member_bytes` is not read (SKIPPED_KEY: a bad sample), and members that are not
    an image, caption or json (.pyd/.pth pickles) are skipped over unread. A shard that
    cannot be opened or read to its end is warned about with its URL (redacted) and
    counted (stream_errors); the stream goes on with the next one. Where a shard delivers
    fewer samples than its manifest count the missing ones are counted (samples_missing),
    where more the unlisted ones (samples_unlisted), with a warning unless a stream error
    already named the shard."""
    on_error = _stream_error_handler(counters)
    warn = _RateLimitedWarning("shard count")

    def check(url: str, count: int, failed: bool) -> None:
        expected = expected_count(url)
        if expected is None or count == expected:
            return
        if count < expected:
            counters.samples_missing += expected - count
            if not failed:
                warn(
                    f"{storage.redact_url(url)} ended after {count} of its {expected} "
                    "samples (truncated?)"
                )
        else:
            counters.samples_unlisted += count - expected
            warn(
                f"{storage.redact_url(url)} holds {count} samples, its manifest lists "
                f"{expected} (a manifest of another version?)"
            )

    def stage(sources: Iterable[dict[str, str]]) -> Iterator[dict[str, Any]]:
        for source in sources:
            url, count, failed = source["url"], 0, False
            try:
                with opener.open(url) as stream:
                    for sample in _shard_samples(url, stream, max_member_bytes):
                        count += 1
                        yield sample
            except Exception as exc:  # unreadable, broken or hostile: skip the rest
                exc.args = (*exc.args, url)  # named as webdataset's own stages name it
                on_error(exc)
                failed = True
            check(url, count, failed)

    return stage


def _shard_samples(url: str, stream: Any, max_member_bytes: int) -> Iterator[dict[str, Any]]:
    # "r|": a plain tar only; a compressed stream is "not a readable tar", never inflated.
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        members = shard_index.tar_members(tar, _shard_size(stream))
        yield from group_samples(members, url, max_member_bytes)


def group_samples(
    members: Iterable[shard_index.TarMember], url: str, max_member_bytes: int
) -> Iterator[dict[str, Any]]:
    """A shard's members (shard_index.tar_members) -> the samples the loader decodes
    ({__key__, __url__, ext: bytes}): consecutive members of one key, as webdataset's
    group_by_keys makes them. Only images, `.txt` and `.json` within `max_member_bytes`
    are read; one over it, or a second member of an extension, makes the sample bad
    (SKIPPED_KEY). Where the shard stops (a broken or hostile member) the sample read so
    far comes out before the error (decoding tells whether it is whole)."""
    sample: dict[str, Any] | None = None
    try:
        for member in members:
            if not member.in_sample or member.key is None:
                continue  # as webdataset: folders, links, meta files, names without extension
            if sample is None or member.key != sample["__key__"]:
                if sample is not None:
                    yield sample
                sample = {"__key__": member.key, "__url__": url}
            extension, size = member.extension, member.info.size
            if extension not in KEPT_EXTENSIONS:
                continue
            if extension in sample:
                sample.setdefault(SKIPPED_KEY, []).append(f"two .{extension} members")
            elif size > max_member_bytes:
                reason = oversized_member(extension, size, max_member_bytes)
                sample.setdefault(SKIPPED_KEY, []).append(reason)
            else:
                sample[extension] = member.read()
    except Exception:
        if sample is not None:
            yield sample
        raise
    if sample is not None:
        yield sample


def _shard_size(stream: Any) -> int | None:
    """Bytes of an opened shard: a range reader's (object stores), a regular file's
    (local, node cache); None for a `pipe:` (tar_members then stops at its first missing
    byte instead)."""
    raw = getattr(stream, "raw", None)
    if isinstance(raw, storage.RangeReader):
        return raw.size_bytes
    try:
        status = os.fstat(stream.fileno())
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None
    return status.st_size if stat.S_ISREG(status.st_mode) else None


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """An evaluation sample's generator (its MLM mask), from its key."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return np.random.default_rng([seed, epoch, int.from_bytes(digest, "little")])


def position_rng(seed: int, epoch: int, stream: int, position: int) -> np.random.Generator:
    """A training sample's generator (crop, MLM mask), from its place in the epoch's order
    (sample_order): the same whatever the world size, and a resampled sample drawn twice
    gets two crops."""
    return np.random.default_rng([seed, epoch, stream, position])


@dataclass(frozen=True)
class SampleProcessor:
    """Undecoded sample -> {key, image uint8 [H, W, 3], caption, rng}; raises if bad.

    The caption is tokenized per batch (`BatchBuilder`), with the sample's own generator
    (after the crop's draws), so masks are those of a per-sample tokenizer call."""

    image_size: int
    crop_scale: tuple[float, float] | None  # None: eval transform (centre crop)
    eval_preprocess: str = "fast"  # the eval transform's (transforms.eval_transform)

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        key = sample["__key__"]
        if SKIPPED_KEY in sample:
            raise ValueError("; ".join(sample[SKIPPED_KEY]))
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if image_ext is None:
            raise ValueError("no image member")
        if "txt" not in sample:
            raise ValueError("no .txt caption member")
        caption = sample["txt"].decode("utf-8")  # strict: a non-UTF-8 caption is bad
        if not caption.strip():
            raise ValueError("empty caption")  # nothing to contrast the image with
        with Image.open(io.BytesIO(sample[image_ext]), formats=PIL_FORMATS) as image:
            if self.crop_scale is None:
                pixels = transforms.eval_transform(image, self.image_size, self.eval_preprocess)
            else:
                pixels = transforms.train_transform(image, self.image_size, self.crop_scale, rng)
        return {"key": key, "image": pixels, "caption": caption, "rng": rng}


class SampleDecoder:
    """Runs a SampleProcessor on one sample; a bad sample is counted, warned about (rate
    limited) and comes back as None."""

    def __init__(self, processor: SampleProcessor, counters: WorkerCounters) -> None:
        self.processor, self.counters = processor, counters
        self.warn = _RateLimitedWarning("bad sample")

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any] | None:
        self.counters.samples_read += 1
        try:
            return self.processor(sample, rng)
        except Exception as exc:  # any decode failure: PIL, UTF-8, truncation, bombs
            self.counters.samples_bad += 1
            url = storage.redact_url(str(sample.get("__url__", "?")))
            self.warn(f"{sample.get('__key__')!r} in {url}: {type(exc).__name__}: {exc}")
            return None


def decode_and_transform(
    samples: Iterable[dict[str, Any]], decoder: SampleDecoder, seed: int
) -> Iterator[dict[str, Any]]:
    """Evaluation stage: bad samples are dropped (counted)."""
    for sample in samples:
        decoded = decoder(sample, sample_rng(seed, 0, sample["__key__"]))
        if decoded is not None:
            yield decoded


# --------------------------------------------------------------------------- train stages
#
#   my steps -> their runs (sample_order) -> run bytes, read ahead (shard_runs)
#     -> decode (crop and mask seeded by the sample's position) -> exactly B per step


def worker_step_runs(
    order: EpochOrder, plan: EpochPlan, rank: int, consumed: int, worker: int, num_workers: int
) -> Iterator[list[Run]]:
    """The runs of this worker's steps of the pass that starts after `consumed` samples:
    the DataLoader takes one batch from each worker in turn, so worker w makes the
    pass's steps w, w + num_workers, ..."""
    for step in range(worker, plan.num_batches_after(consumed), num_workers):
        start = consumed + step * plan.global_batch
        yield order.rank_runs(start, plan.global_batch, rank, plan.batch_size)


def read_steps(
    steps: Iterable[list[Run]], reader: RunReader, counters: WorkerCounters
) -> Iterator[list[RunResult]]:
    """Each step's runs fetched (reading ahead across step boundaries)."""
    runs_per_step: collections.deque[int] = collections.deque()

    def all_runs() -> Iterator[Run]:
        for runs in steps:
            runs_per_step.append(len(runs))
            yield from runs

    results = reader.read_all(all_runs())
    warn = _RateLimitedWarning("unreadable run")
    for first in results:
        group = [first, *itertools.islice(results, runs_per_step.popleft() - 1)]
        for result in group:
            counters.runs_read += 1
            if result.error is not None:
                counters.stream_errors += 1
                warn(str(result.error))
        yield group


def decode_step(
    results: list[RunResult], decoder: SampleDecoder, seed: int, epoch: int
) -> list[dict[str, Any] | None]:
    """The step's samples in order, None where a sample was bad or its run unreadable."""
    out: list[dict[str, Any] | None] = []
    for result in results:
        run = result.run
        if result.error is not None:
            out += [None] * run.num_samples
            continue
        for offset, sample in enumerate(result.samples):
            rng = position_rng(seed, epoch, run.stream, run.position + offset)
            out.append(decoder(sample, rng))
    return out


def fill_step(
    samples: list[dict[str, Any] | None], counters: WorkerCounters
) -> list[dict[str, Any]]:
    """Exactly the step's batch size: every rank must hand the same shapes to the
    collectives (a short batch would hang the all-gather). A bad or unreadable sample is
    replaced by another sample of the same batch (counted as samples_substituted); the
    duplicate keeps the batch full at the price of one repeated pair."""
    good = [sample for sample in samples if sample is not None]
    if len(good) == len(samples):
        return good
    if not good:
        raise RuntimeError(
            f"a whole batch of {len(samples)} samples was unreadable or bad: check the "
            "warnings above for the shards and the storage behind them"
        )
    counters.samples_substituted += len(samples) - len(good)
    filled = []
    for i, sample in enumerate(samples):
        filled.append(sample if sample is not None else good[i % len(good)])
    return filled


class BatchBuilder:
    """Collects decoded samples into one batch dict: {images, keys, TOKENS_KEY}, the token
    tensors stacked (the loader unpacks them into input_ids, attention_mask, ...).

    Each image is written into the batch's pixel buffer (`images`, uint8 [capacity, 3, H, W])
    as it arrives, so a sample's decoded pixels are freed (and their pages reused by the
    next decode) at once instead of 64 of them living until the batch is stacked: on this
    VM every fresh page faults at ~6 us. In a data-loader worker the buffer is shared
    memory (`BatchBufferPool`), so the batch reaches the trainer's process without the copy
    torch makes of a private tensor. Captions are tokenized (and MLM-masked) in one call
    per batch.
    """

    def __init__(self, tokenizer: CaptionTokenizer, images: torch.Tensor) -> None:
        self.tokenizer = tokenizer
        self.images = images
        self.keys: list[str] = []
        self.captions: list[str] = []
        self.rngs: list[np.random.Generator] = []

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, sample: dict[str, Any]) -> None:
        transforms.write_image(self.images[len(self.keys)], sample["image"])
        self.keys.append(sample["key"])
        self.captions.append(sample["caption"])
        self.rngs.append(sample["rng"])

    def build(self) -> dict[str, Any]:
        # A partial (last eval) batch is a view of the first rows: its shared buffer keeps
        # the unused rows, once per eval pass, rather than paying a copy.
        images = self.images[: len(self.keys)]
        tokens = self.tokenizer.batch(self.captions, self.rngs)
        return {
            "images": images,
            "keys": self.keys,
            TOKENS_KEY: (list(tokens), torch.stack(list(tokens.values()))),
        }


class BatchBufferPool:
    """Shared-memory image buffers that data-loader workers reuse from batch to batch.

    A fresh shared buffer per batch costs the worker a page fault (and the kernel a zeroed
    page) per 4 KiB: ~0.2 ms per sample for 224 px batches on the VM of bench/RESULTS.md,
    about a tenth of a sample's decode. A worker takes a free slot
    (allocating its buffer on first use); the trainer's process marks the slot free again
    once nothing there holds the batch's images: at once when the pin-memory thread has
    copied them, otherwise when the last tensor on the buffer is garbage-collected (views
    included: a storage lives as long as any tensor on it). A worker with no free slot
    allocates a one-off buffer, so a consumer that keeps batches never blocks a worker and
    never sees its batch overwritten.

    Created in the main process before the workers start; `in_use` is shared memory, the
    buffers are per worker process.
    """

    def __init__(self, num_workers: int, num_slots: int) -> None:
        self.in_use = torch.zeros((num_workers, num_slots), dtype=torch.uint8).share_memory_()
        self._buffers: dict[int, torch.Tensor] = {}  # this worker's, by slot

    def acquire(
        self,
        worker: int,
        batch_size: int,
        image_size: int,
        counters: WorkerCounters,
    ) -> tuple[torch.Tensor, int]:
        """(buffer, slot) in a worker; slot -1 for a one-off buffer."""
        free = [slot for slot, busy in enumerate(self.in_use[worker].tolist()) if not busy]
        # Lowest free slot first: a consumer that lets go promptly keeps few buffers busy.
        slot = free[0] if free else -1
        buffer = self._buffers.get(slot)
        if buffer is None:
            buffer = transforms.empty_batch(batch_size, image_size).share_memory_()
            counters.batch_buffers_allocated += 1
            if slot >= 0:
                self._buffers[slot] = buffer
        assert buffer.shape == (batch_size, 3, image_size, image_size), buffer.shape
        if slot >= 0:
            self.in_use[worker, slot] = 1
        return buffer, slot

    def release_when_unused(self, images: torch.Tensor, worker: int, slot: int) -> None:
        """In the trainer's process, for a batch received from `worker`."""
        if slot < 0:
            return
        if images.is_pinned():  # the pin-memory thread's copy; the shared buffer is gone
            self.in_use[worker, slot] = 0
        else:
            release = weakref.finalize(
                images.untyped_storage(), _mark_free, self.in_use, worker, slot
            )
            release.atexit = False  # nothing to hand back once the process exits


def _mark_free(in_use: torch.Tensor, worker: int, slot: int) -> None:
    in_use[worker, slot] = 0


# --------------------------------------------------------------------------- worker stream


@dataclass(frozen=True)
class StreamSpec:
    """Everything a worker needs to produce its part of one epoch (plain, picklable data)."""

    dataset: Dataset
    config: DataConfig
    tokenizer: CaptionTokenizer
    rank: int
    world_size: int
    seed: int
    epoch: int
    train: bool
    plan: EpochPlan | None  # train only; eval: every sample once, the last batch partial
    shards: TrainShards | None = None  # train only
    consumed: int = 0  # train: samples of the epoch consumed before this pass (all ranks)

    @property
    def read_options(self) -> storage.ShardReadOptions:
        c = self.config
        return storage.ShardReadOptions(
            chunk_bytes=c.read_chunk_bytes,
            retry=storage.RetryPolicy(
                c.read_max_attempts, c.read_backoff_seconds, c.read_backoff_max_seconds
            ),
            timeout_seconds=c.read_timeout_seconds,
            cache_dir=c.cache_dir,
            cache_limit_bytes=c.cache_limit_bytes,
        )


class ShardStream(IterableDataset):
    """One rank's stream; each DataLoader worker iterates its own part of it."""

    def __init__(
        self,
        spec: StreamSpec,
        buffers: BatchBufferPool | None = None,
        position: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.buffers = buffers  # for DataLoader workers
        # Each reading process makes its own on first use (see ShardFilesystems), and a
        # persistent worker keeps them (and the shard indexes) for its later epochs.
        self.filesystems = storage.ShardFilesystems(spec.read_options)
        self._reader: RunReader | None = None
        self._order: EpochOrder | None = None
        # Shared int64 [epoch, samples consumed], set by the loader before each pass:
        # persistent workers outlive the epoch their copy of `spec` was made for.
        self.position = position

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.position is not None:
            epoch, consumed = self.position.tolist()
            # This process's copy of the stream (a worker's own, or the loader's with no
            # workers): the rest of the pass reads self.spec.
            self.spec = dataclasses.replace(self.spec, epoch=epoch, consumed=consumed)
        spec = self.spec
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if spec.plan is not None:
            assert num_workers == spec.plan.num_workers, (num_workers, spec.plan)
        counters = WorkerCounters(worker=worker)
        if spec.train:
            samples = self._train_samples(worker, num_workers, counters)
        else:
            samples = self._eval_samples(worker, num_workers, counters)
        if info is not None:
            # One tokenizer thread per worker: the workers already occupy the cores, and a
            # Rust thread pool per worker would oversubscribe them (an explicit setting
            # inherited from the parent wins).
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        batch_size = spec.config.batch_size if spec.train else spec.config.eval_batch_size
        image_size = spec.config.image_size

        def new_images() -> tuple[torch.Tensor, int]:
            if info is None or self.buffers is None:
                return transforms.empty_batch(batch_size, image_size), -1
            return self.buffers.acquire(worker, batch_size, image_size, counters)

        for batch, slot in self._batches(samples, batch_size, new_images):
            counters.samples_delivered += len(batch["keys"])
            batch[STATS_KEY] = counters.as_dict()
            batch[BUFFER_KEY] = (worker, slot)
            yield batch

    def _batches(
        self,
        samples: Iterable[dict[str, Any]],
        batch_size: int,
        new_images: Callable[[], tuple[torch.Tensor, int]],
    ) -> Iterator[tuple[dict[str, Any], int]]:
        builder: BatchBuilder | None = None  # a buffer is taken at a batch's first sample
        for sample in samples:
            if builder is None:
                images, slot = new_images()
                builder = BatchBuilder(self.spec.tokenizer, images)
            builder.add(sample)
            if len(builder) == batch_size:
                yield builder.build(), slot
                builder = None
        if builder is not None:
            # Every train step is a whole batch (fill_step): a partial one is a bug.
            assert not self.spec.train, f"partial train batch of {len(builder)}"
            yield builder.build(), slot

    def _train_samples(
        self, worker: int, num_workers: int, counters: WorkerCounters
    ) -> Iterator[dict[str, Any]]:
        """This worker's steps of the pass, batch after batch: the runs of each step are
        read (never a sample before the resume point), decoded, and filled to B."""
        spec = self.spec
        assert spec.plan is not None and spec.shards is not None
        if self._order is None or self._order.epoch != spec.epoch:
            shards = spec.shards
            self._order = EpochOrder(
                np.asarray(shards.num_samples),
                np.asarray(shards.weights),
                spec.plan.order,
                spec.epoch,
            )
        if self._reader is None:
            self._reader = RunReader(
                spec.shards.urls,
                spec.shards.num_samples,
                self.filesystems,
                counters.read,
                KEPT_EXTENSIONS,
                spec.config.max_member_bytes,
            )
        self._reader.counters = counters.read  # this pass's counters
        decoder = SampleDecoder(
            SampleProcessor(spec.config.image_size, spec.config.crop_scale), counters
        )
        steps = worker_step_runs(
            self._order, spec.plan, spec.rank, spec.consumed, worker, num_workers
        )
        for results in read_steps(steps, self._reader, counters):
            yield from fill_step(decode_step(results, decoder, spec.seed, spec.epoch), counters)

    def _eval_samples(
        self, worker: int, num_workers: int, counters: WorkerCounters
    ) -> Iterator[dict[str, Any]]:
        """Every sample of this rank's val shards (split by rank, then worker), in order."""
        spec = self.spec
        # Filesystems are created lazily in this process (s3fs is not fork-safe).
        opener = storage.ShardOpener(self.filesystems, counters.read)
        urls = spec.dataset.urls[spec.rank :: spec.world_size][worker::num_workers]
        processor = SampleProcessor(spec.config.image_size, None, spec.config.eval_preprocess)
        decoder = SampleDecoder(processor, counters)
        pipeline = wds.DataPipeline(
            shard_urls(urls, opener),
            read_shards(opener, counters, spec.dataset.shard_size, spec.config.max_member_bytes),
            lambda src: decode_and_transform(src, decoder, spec.seed),
        )
        yield from pipeline


# --------------------------------------------------------------------------- main process


class ThroughputMeter:
    """Samples/s and time the trainer waited for data, plus the workers' counters.

    The trainer logs `snapshot()` and may `reset()` the window after each log line.
    """

    def __init__(self) -> None:
        self.worker_counters: dict[int, dict[str, int]] = {}
        self.reset()

    def reset(self) -> None:
        self.window_start = time.perf_counter()
        self.num_samples = 0
        self.num_batches = 0
        self.data_wait_seconds = 0.0

    def update(self, num_samples: int, wait_seconds: float, stats: dict[str, int]) -> None:
        self.num_samples += num_samples
        self.num_batches += 1
        self.data_wait_seconds += wait_seconds
        self.worker_counters[stats["worker"]] = stats

    def totals(self) -> dict[str, int]:
        """Worker counters summed over this rank's workers (this epoch)."""
        out: dict[str, int] = {}
        for stats in self.worker_counters.values():
            for name, value in stats.items():
                if name != "worker":
                    out[name] = out.get(name, 0) + value
        return out

    def snapshot(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        return {
            "data/samples_per_second": self.num_samples / elapsed,
            "data/wait_seconds": self.data_wait_seconds,
            "data/wait_fraction": self.data_wait_seconds / elapsed,
            **{f"data/{k}": float(v) for k, v in self.totals().items()},
        }


class _Loader:
    """Iterates one epoch of a rank's stream through a DataLoader and meters it.

    With `persistent_workers` the DataLoader's worker processes (and their pooled image
    buffers, tokenizer, filesystems, shard indexes and warm heaps) serve epoch after
    epoch: starting a worker costs ~50 ms of CPU (fork, fresh shared buffers, first-touch
    page faults), and at 64 GPUs x 8 workers a worker's share of a PMC-OA epoch is only
    ~3,000 samples. They are kept only after a complete pass; a pass the consumer left
    early (a resume, a stop) takes the DataLoader with it, and the next pass starts fresh
    workers.
    """

    persistent_workers = False

    def __init__(self, spec: StreamSpec) -> None:
        self.spec = spec
        self.meter = ThroughputMeter()
        self._position = torch.zeros(2, dtype=torch.int64).share_memory_()
        # (DataLoader, its workers' buffer pool), kept between complete passes.
        self._dataloader: tuple[DataLoader[dict[str, Any]], BatchBufferPool | None] | None = None

    def _new_dataloader(self) -> tuple[DataLoader[dict[str, Any]], BatchBufferPool | None]:
        config = self.spec.config
        num_workers = config.num_workers
        buffers = (
            BatchBufferPool(num_workers, config.prefetch_factor + POOL_SLOTS_BEYOND_PREFETCH)
            if num_workers
            else None
        )
        loader = DataLoader(
            ShardStream(self.spec, buffers, self._position),
            batch_size=None,  # batches are made inside the workers
            num_workers=num_workers,
            pin_memory=config.pin_memory and torch.cuda.is_available(),
            prefetch_factor=config.prefetch_factor if num_workers else None,
            persistent_workers=self.persistent_workers and num_workers > 0,
            # A worker that hangs (a read that never returns) becomes an error in this
            # process instead of a stalled job; without workers there is nothing to wait on.
            timeout=config.batch_timeout_seconds if num_workers else 0,
            # Every random choice in the stream is seeded explicitly; a private generator
            # keeps the DataLoader from drawing its base seed from the global torch RNG,
            # which the trainer restores on resume for dropout (bit-identical resumes).
            generator=torch.Generator(),
        )
        return loader, buffers

    def _batches(self) -> Iterator[dict[str, Any]]:
        self.meter.worker_counters = {}
        # Read by every worker when its pass begins (after iter() below).
        self._position.copy_(torch.tensor([self.spec.epoch, self.spec.consumed]))
        (loader, buffers), self._dataloader = self._dataloader or self._new_dataloader(), None
        iterator = iter(loader)
        while True:
            wait_start = time.perf_counter()
            try:
                batch = next(iterator)  # blocks while no worker has a batch ready
            except StopIteration:
                break
            stats = batch.pop(STATS_KEY)
            worker, slot = batch.pop(BUFFER_KEY)
            names, tokens = batch.pop(TOKENS_KEY)
            batch.update(zip(names, tokens.unbind(0), strict=True))
            if buffers is not None:
                buffers.release_when_unused(batch["images"], worker, slot)
            self.meter.update(len(batch["keys"]), time.perf_counter() - wait_start, stats)
            yield batch
            # Only the consumer holds it now: its buffer goes back to the pool as soon as
            # the consumer lets go, not when the next batch has arrived.
            del batch
        if self.persistent_workers:
            # A complete pass: every worker ended its part, no batch is in flight, and each
            # delivered one went through release_when_unused. Ready for the next epoch.
            self._dataloader = loader, buffers


class TrainLoader(_Loader):
    """A rank's training loader: `len()` batches per epoch, the same on every rank.

    Resumable: `state_dict()` is a few integers, the epoch, the samples all ranks
    consumed in it, and the sample order's own parameters; `load_state_dict()` continues
    there at this loader's world size and worker count (the rest of the same epoch, no
    sample repeated or lost), reading nothing before that point. Its workers persist from
    one complete epoch to the next.
    """

    persistent_workers = True

    def __init__(self, spec: StreamSpec) -> None:
        super().__init__(spec)
        self._pass_start = spec.consumed

    @property
    def plan(self) -> EpochPlan:
        assert self.spec.plan is not None
        return self.spec.plan

    @property
    def epoch(self) -> int:
        return self.spec.epoch

    @property
    def num_batches(self) -> int:
        """Per whole epoch, for this rank (and every other)."""
        return self.plan.num_batches

    @property
    def num_samples(self) -> int:
        """Per whole epoch, over all ranks."""
        return self.plan.num_samples

    def __len__(self) -> int:
        """Batches of the current (or next) pass: the whole epoch, or the rest of it after
        a resume or a pass left early."""
        return self.plan.num_batches_after(self._pass_start)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        global_batch = self.plan.global_batch
        self._pass_start = self.spec.consumed
        for batch in self._batches():
            # Counted before the consumer sees the batch: a checkpoint taken after its
            # step resumes with the next one.
            self.spec = dataclasses.replace(self.spec, consumed=self.spec.consumed + global_batch)
            yield batch
        assert self.plan.num_batches_after(self.spec.consumed) == 0, (self.spec, self.plan)

    def set_epoch(self, epoch: int) -> None:
        self.spec = dataclasses.replace(self.spec, epoch=epoch, consumed=0)
        self._pass_start = 0

    def state_dict(self) -> dict[str, int]:
        order = self.plan.order
        return {
            "epoch": self.spec.epoch,
            "samples_consumed": self.spec.consumed,
            "seed": order.seed,
            "num_canonical_nodes": order.num_canonical_nodes,
            "span_samples": order.span_samples,
            "resampled": int(order.resampled),
            "samples_per_epoch": order.samples_per_epoch,
            "num_shards": len(self.spec.shards.urls) if self.spec.shards else 0,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue the saved epoch. Its order's own parameters (canonical node count,
        span) are the saved ones; world size, workers, batch size and the cache may differ,
        as long as the global batch stays a multiple of the canonical node count."""
        if "samples_consumed" not in state:
            raise ValueError(
                "this checkpoint's data position predates sample-exact epochs (it counts "
                "batches of the old shard-per-reader order) and cannot be continued mid-epoch; "
                "resume from an end-of-epoch checkpoint"
            )
        mine = self.state_dict()
        changed = [
            f"{name} {state.get(name)} -> {mine[name]}"
            for name in ("seed", "resampled", "samples_per_epoch", "num_shards")
            if state.get(name) != mine[name]
        ]
        if changed:
            raise ValueError(
                "cannot continue the data stream where it stopped: it was saved with other "
                f"data settings ({', '.join(changed)}). Resume with the same --train-data, "
                "--seed and sampling flags, or start the next epoch afresh"
            )
        order = dataclasses.replace(
            self.plan.order,
            num_canonical_nodes=state["num_canonical_nodes"],
            span_samples=state["span_samples"],
        )
        plan = dataclasses.replace(self.plan, order=order)
        check_plan(plan)
        consumed = state["samples_consumed"]
        if not 0 <= consumed <= order.samples_per_epoch or consumed % order.num_canonical_nodes:
            raise ValueError(f"saved position {consumed} is not a position of this epoch")
        if plan != self.plan:
            self._dataloader = None  # persistent workers hold the old plan
        self.spec = dataclasses.replace(
            self.spec, plan=plan, epoch=state["epoch"], consumed=consumed
        )
        self._pass_start = consumed


class EvalLoader(_Loader):
    """Every val sample once across ranks; batch counts may differ between ranks."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._batches()

    @property
    def num_samples(self) -> int:
        """Samples in the val set (manifest or --val-num-samples), over all ranks."""
        return self.spec.dataset.num_samples

    def rank_num_samples(self) -> int | None:
        """Samples this rank will see (bad samples aside); None without a manifest."""
        spec = self.spec
        sizes = [
            spec.dataset.shard_size(u) for u in spec.dataset.urls[spec.rank :: spec.world_size]
        ]
        return None if any(n is None for n in sizes) else sum(n or 0 for n in sizes)


def build_train_loader(
    config: DataConfig,
    tokenizer: CaptionTokenizer,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int = 0,
    ranks_per_node: int = 1,
) -> TrainLoader:
    """The training loader of one rank. Reads the manifests (or the shard indexes), checks
    that every shard is indexed and fixes the epoch plan now, so a bad --train-data fails
    at start-up on every rank alike. `ranks_per_node` sets the default canonical node
    count (world_size / ranks_per_node): ranks are numbered node by node."""
    if config.train_data is None:
        raise ValueError("--train-data is required for training")
    _check_rank(rank, world_size)
    # Counts from the manifests (or, without one, the indexes); --train-num-samples is
    # the epoch length of plan_train_epoch, not a shard count.
    dataset = resolve_dataset(
        config.train_data, None, config.train_data_upsampling_factors, need_sizes=False
    )
    shards = train_shards(dataset, config)
    plan = plan_train_epoch(shards, config, world_size, ranks_per_node, seed)
    spec = StreamSpec(dataset, config, tokenizer, rank, world_size, seed, epoch, True, plan, shards)
    return TrainLoader(spec)


def train_shards(dataset: Dataset, config: DataConfig) -> TrainShards:
    """Samples per shard (manifest, else the shard's index) once every shard is known to
    have an index; the node cache's limit is checked against the largest shard."""
    urls = dataset.urls
    pipes = [url for url in urls if url.startswith("pipe:")]
    if pipes:
        raise ValueError(
            f"--train-data {storage.redact_url(pipes[0])}: training reads runs of samples by "
            "byte range, which a pipe: command cannot serve; give the shards' paths or URLs"
        )
    shard_bytes = check_indexed(urls)
    if config.cache_limit_bytes is not None:
        check_cache_limit(config.cache_limit_bytes, max(shard_bytes.values()))
    counts = []
    for url in urls:
        count = dataset.shard_size(url)
        if count is None:
            count = read_index_count(url)
        counts.append(count)
    return TrainShards(tuple(urls), tuple(counts), tuple(dataset.weights))


def read_index_count(url: str) -> int:
    """A shard's sample count from its index (shards without sizes.json/manifest.json)."""
    fs, path = storage.url_to_fs(shard_index.index_url(url))
    return shard_index.read_index(fs, path, storage.redact_url(url)).num_samples


def build_eval_loader(
    config: DataConfig, tokenizer: CaptionTokenizer, rank: int, world_size: int, seed: int = 0
) -> EvalLoader:
    """Every val sample exactly once across ranks (shards split by rank, then worker), in
    a fixed order, centre crops, last batch partial. Ranks may get different batch counts:
    evaluation must not run a collective per batch."""
    if config.val_data is None:
        raise ValueError("--val-data is required for evaluation")
    _check_rank(rank, world_size)
    dataset = resolve_val_dataset(config)
    spec = StreamSpec(dataset, config, tokenizer, rank, world_size, seed, 0, False, None)
    return EvalLoader(spec)


def resolve_val_dataset(config: DataConfig) -> Dataset:
    """--val-data, resolved and checked at start-up, so a val set that cannot be evaluated
    stops the run before training, not after an epoch: every shard is a plain `.tar` (a
    compressed one could inflate past every size limit before its sizes were known), at
    least one of them exists (one listing per folder), and where every shard has its index
    beside it (make_shards writes them) the indexes are read: no key may name two samples
    (retrieval pairs images and captions by key), and a source without a manifest is
    counted by them. Without manifest or indexes --val-num-samples gives the size."""
    assert config.val_data is not None
    dataset = resolve_dataset(
        config.val_data, config.val_num_samples, flag="--val-data", need_sizes=False
    )
    urls = dataset.urls
    for url in urls:
        if not url.startswith("pipe:") and not url.endswith(".tar"):
            raise ValueError(
                f"--val-data shard {storage.redact_url(url)} is not a .tar: only plain tar "
                "shards are read (a compressed member's size is unknown until it is "
                f"inflated); decompress it (e.g. gunzip) and index it with {INDEX_TOOL}"
            )
    twice = next((url for i, url in enumerate(urls) if url in urls[:i]), None)
    if twice is not None:
        raise ValueError(
            f"--val-data names {storage.redact_url(twice)} twice: every val pair would be "
            "evaluated twice under one key"
        )
    files = [url for url in urls if not url.startswith("pipe:")]
    listing = list_shards(files)
    if files and all(entry is None for entry in listing.values()):
        raise ValueError(
            f"none of the {len(files)} --val-data shards exists (first: "
            f"{storage.redact_url(files[0])}): check the pattern and the storage behind it"
        )
    indexed = len(files) == len(urls) and all(entry and entry[1] for entry in listing.values())
    counts = check_val_keys(files) if indexed else None
    if config.val_num_samples is not None or all(s.shard_sizes for s in dataset.sources):
        return dataset
    if counts is None:
        raise ValueError(
            "--val-data has no sizes.json or manifest.json next to its shards, nor an index "
            "beside each shard, so its size is unknown: pass --val-num-samples, or index the "
            f"shards: {INDEX_TOOL} '<your --val-data>'"
        )
    sources = tuple(
        dataclasses.replace(s, shard_sizes=s.shard_sizes or {u: counts[u] for u in s.urls})
        for s in dataset.sources
    )
    return Dataset(sources, round(sum(s.weight * (s.num_samples or 0) for s in sources)))


def check_val_keys(urls: list[str]) -> dict[str, int]:
    """Samples per val shard, from the shards' indexes, after checking that no key is in
    two of them (ValueError naming the key and both shards)."""
    counts: dict[str, int] = {}
    key_shard: dict[str, str] = {}
    for url in urls:
        index = _read_val_index(url)
        counts[url] = index.num_samples
        for key in index.keys.tolist():
            first = key_shard.setdefault(key, url)
            if first != url:
                raise ValueError(
                    f"--val-data: sample key {key!r} is in {storage.redact_url(first)} and in "
                    f"{storage.redact_url(url)}; retrieval pairs images and captions by key, "
                    "so each key must be one sample: drop one of the shards or rebuild the "
                    "val set with make_shards"
                )
    return counts


def _read_val_index(url: str) -> shard_index.ShardIndex:
    index = shard_index.index_url(url)
    fs, path = storage.url_to_fs(index)
    with storage.redacting_errors("read", index):
        return shard_index.read_index(fs, path, storage.redact_url(index))


def list_shards(urls: list[str]) -> dict[str, tuple[int, bool] | None]:
    """Per shard: (its size in bytes, whether its index is beside it), or None where it
    does not exist; one listing per folder (a LIST request on object stores), not a
    request per shard, where the folder can be listed."""
    by_folder: dict[str, list[str]] = {}
    for url in urls:
        by_folder.setdefault(posixpath.dirname(url), []).append(url)
    found: dict[str, tuple[int, bool] | None] = {}
    for folder, folder_urls in by_folder.items():
        fs, root = storage.url_to_fs(folder or ".")
        try:
            listing = {
                posixpath.basename(e["name"]): int(e["size"]) for e in fs.ls(root, detail=True)
            }
        except OSError:
            # Not listable (plain HTTP, a missing folder or bucket): ask for each file.
            listing = _file_sizes(fs, folder_urls)
        for url in folder_urls:
            name = posixpath.basename(url)
            index_name = (
                posixpath.basename(shard_index.index_url(url)) if name.endswith(".tar") else None
            )
            found[url] = (listing[name], index_name in listing) if name in listing else None
    return found


def _file_sizes(fs: fsspec.AbstractFileSystem, urls: list[str]) -> dict[str, int]:
    """Name -> size of each shard and index that exists (a HEAD request each on object
    stores); ValueError naming the file where asking fails for another reason (denied)."""
    sizes: dict[str, int] = {}
    for url in urls:
        for file_url in (url, shard_index.index_url(url)) if url.endswith(".tar") else (url,):
            try:
                sizes[posixpath.basename(file_url)] = int(fs.size(fs._strip_protocol(file_url)))
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise ValueError(
                    f"cannot read {storage.redact_url(file_url)}: "
                    f"{storage.describe_error(exc, file_url)}"
                ) from None
    return sizes


def check_indexed(urls: list[str]) -> dict[str, int]:
    """Every shard's size in bytes, after checking that each exists and has its index
    beside it (`list_shards`)."""
    sizes: dict[str, int] = {}
    missing: list[str] = []
    for url, entry in list_shards(urls).items():
        if entry is None:
            raise ValueError(f"--train-data shard {storage.redact_url(url)} does not exist")
        sizes[url], indexed = entry
        if not indexed:
            missing.append(url)
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(urls)} --train-data shards have no sample index (first: "
            f"{storage.redact_url(shard_index.index_url(missing[0]))}). make_shards writes one "
            f"beside every shard; for shards written by other tools run once: {INDEX_TOOL} "
            "'<your --train-data>'"
        )
    return sizes


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
