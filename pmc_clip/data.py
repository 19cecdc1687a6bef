"""The streaming data pipeline: webdataset shards (local, s3:// or any fsspec URL, pipe:)
into per-rank DataLoaders whose batches are dicts of tensors.

    loader = build_train_loader(config.data, caption_tokenizer, rank, world_size, seed)
    loader.set_epoch(epoch)            # or loader.load_state_dict(saved) on resume
    for batch in loader:               # len(loader) batches, identical on every rank
        batch["images"], batch["input_ids"], batch["attention_mask"], batch["keys"]
    loader.meter.snapshot()            # samples/s, data-wait seconds, read/skip counters

Inside every data-loader worker the stream is a webdataset DataPipeline of small stages:

    shard_urls -> tarfile_to_samples -> keep_known_members -> shuffle (undecoded)
      -> decode_and_transform (image, caption -> tokens; bad samples counted and dropped)
      -> [exactly N samples per worker, minus those a resume skips] -> batch

Equal batch counts (a rank that yields one batch fewer hangs DDP in its next all-reduce):
every worker of every rank yields exactly `num_batches_per_worker` full batches per epoch,

    num_batches_per_worker = num_samples // (batch_size * world_size * num_workers)

so a rank yields `num_workers * num_batches_per_worker` batches (the DataLoader takes one
batch from each worker in turn). What that costs:
- the remainder of that division (< batch_size * world_size * num_workers samples) is
  not seen in that epoch; a different part each epoch, as the shard order is reshuffled;
- shards are whole units, so without resampling a worker's shards hold more or fewer
  samples than its quota. Extra samples are left for that epoch; a worker that runs short
  (smaller shards, bad samples, shards skipped after read errors) reads its own shards
  again (a new "pass", with new crops) until its quota is full. With make_shards' equal
  shard sizes that affects at most the worker holding the last, smaller shard;
- with resampling the quota is simply where each worker's infinite stream is cut.
A worker whose shards yield no sample at all in a whole pass raises RuntimeError instead
of spinning: nothing can fill its quota.

Shard order: without resampling, the shard list is shuffled with (seed, epoch), identical
on all ranks, then split by rank (`shards[rank::world_size]`) then by worker. Fewer shards
than ranks x workers is a ValueError at start-up. With resampling (`dataset_resampled`)
each worker draws shards with replacement, shard probability proportional to its
source's upsampling factor, from a generator seeded with (seed, epoch, rank, worker).

Determinism and resume: every random choice has an explicit seed (shard order, shuffle
buffer, per-sample crop and MLM mask from (seed, epoch, pass, sample key)), so an epoch's
stream is a function of the config. `load_state_dict({"epoch", "step", ...})` positions
the loader at a step: worker w of the new loader plays the role of worker
(w + step) % num_workers of the interrupted one (so the round-robin order lines up) and
drops the samples it had already delivered, after decoding them (a bad sample must be
recognised to be skipped the same way). A resumed epoch yields exactly the batches the
interrupted run would have yielded from that step on; the skip costs a decode of the
delivered part of the epoch, divided over all ranks and workers.

Batches cross from a worker to the trainer's process in shared memory. Each worker reuses
a small pool of image buffers (`BatchBufferPool`): a slot goes back to the worker once the
trainer's process holds no tensor on it (or the pin-memory thread has copied it), so a
consumer may keep any batch as long as it likes; keeping many only costs fresh buffers
(counted as `batch_buffers_allocated`).

Security: only image members (jpg/jpeg/png/webp, opened with PIL restricted to those
formats), `.txt` (strict UTF-8) and `.json` are kept; anything else in a shard (`.pyd`,
`.pth`, `.npy`, ...) is dropped unread. Shard content is never unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import logging
import os
import posixpath
import random
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pmc_clip import storage, transforms
from pmc_clip.config import DataConfig
from pmc_clip.tokenize import CaptionTokenizer

_log = logging.getLogger(__name__)

SOURCE_SEPARATOR = "::"
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


def expand_spec(spec: str) -> list[list[str]]:
    """Split a shard spec at `::` and brace-expand each source."""
    sources = [part.strip() for part in spec.split(SOURCE_SEPARATOR)]
    if not spec.strip() or any(not part for part in sources):
        raise ValueError(f"empty shard source in {storage.redact_url(spec)!r}")
    return [list(braceexpand.braceexpand(part)) for part in sources]


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
            raise ValueError(
                f"cannot read {storage.redact_url(storage.join(folder, name))}: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        if name == "sizes.json":
            return {str(k): int(v) for k, v in document.items()}
        return {str(s["name"]): int(s["count"]) for s in document["shards"]}
    return None


def resolve_dataset(
    spec: str,
    num_samples_override: int | None,
    weights: tuple[float, ...] | None = None,
    flag: str = "--train-data",
) -> Dataset:
    """Expand `spec`, read its sizes, and fix the samples per epoch.

    Per epoch: the override if given, else the sum over sources of
    upsampling factor x samples in the source's manifest.
    """
    expanded = expand_spec(spec)
    weights = weights or tuple(1.0 for _ in expanded)
    assert len(weights) == len(expanded), (weights, len(expanded))
    sources = []
    for part, urls, weight in zip(spec.split(SOURCE_SEPARATOR), expanded, weights, strict=True):
        sizes = None if num_samples_override is not None else read_shard_sizes(urls)
        if sizes is None and num_samples_override is None:
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


@dataclass(frozen=True)
class EpochPlan:
    """How many batches every worker and rank yields per epoch (the same for all)."""

    batch_size: int
    world_size: int
    num_workers: int  # >= 1: 0 DataLoader workers means one stream in the main process
    num_batches_per_worker: int

    @property
    def num_batches(self) -> int:
        """Per rank and epoch."""
        return self.num_batches_per_worker * self.num_workers

    @property
    def num_samples(self) -> int:
        """Over all ranks, per epoch."""
        return self.num_batches * self.batch_size * self.world_size


def plan_train_epoch(
    dataset: Dataset, batch_size: int, world_size: int, num_workers: int, resampled: bool
) -> EpochPlan:
    num_streams = max(1, num_workers)
    num_slots = world_size * num_streams
    num_shards = len(dataset.urls)
    if not resampled and num_shards < num_slots:
        raise ValueError(
            f"--train-data has {num_shards} shards for {world_size} ranks x {num_streams} "
            f"workers = {num_slots} readers: every reader needs at least one shard without "
            "--dataset-resampled. Use --dataset-resampled, fewer --workers, or reshard with "
            "a smaller --shard-size"
        )
    samples_per_round = batch_size * num_slots
    num_batches_per_worker = dataset.num_samples // samples_per_round
    if num_batches_per_worker < 1:
        raise ValueError(
            f"an epoch of {dataset.num_samples} samples is less than one batch per reader "
            f"({batch_size} x {world_size} ranks x {num_streams} workers = "
            f"{samples_per_round}): lower --batch-size or --workers"
        )
    return EpochPlan(batch_size, world_size, num_streams, num_batches_per_worker)


def shards_for_reader(
    urls: list[str],
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
) -> list[str]:
    """Without resampling: shuffle with (seed, epoch), then split by rank, then by worker."""
    order = np.random.default_rng([seed, epoch]).permutation(len(urls))
    shuffled = [urls[i] for i in order]
    return shuffled[rank::world_size][worker::num_workers]


def resampled_shards(
    urls: list[str], weights: list[float], seed: int, epoch: int, rank: int, worker: int, rep: int
) -> Iterator[str]:
    """With resampling: len(urls) shards drawn with replacement, P(shard) ~ its weight."""
    rng = np.random.default_rng([seed, epoch, rank, worker, rep])
    probabilities = np.asarray(weights, dtype=np.float64)
    probabilities /= probabilities.sum()
    for index in rng.choice(len(urls), size=len(urls), p=probabilities):
        yield urls[int(index)]


def resume_skip_batches(step: int, worker: int, num_workers: int) -> int:
    """Batches that (effective) worker `worker` delivered before global step `step`:
    the steps t < step with t % num_workers == worker."""
    return max(0, -(-(step - worker) // num_workers))


# --------------------------------------------------------------------------- stages


@dataclass
class WorkerCounters:
    """One worker's counters for one epoch (shipped to the main process with each batch)."""

    worker: int = 0
    samples_read: int = 0
    samples_bad: int = 0
    samples_delivered: int = 0
    samples_resume_skipped: int = 0
    passes: int = 0
    stream_errors: int = 0
    # Samples a shard's manifest count promised but the shard did not hold (a tar cut at
    # a member boundary reads as a shorter, valid archive: only the count shows the loss).
    samples_missing: int = 0
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
    urls: Iterable[str], opener: storage.ShardOpener | None = None
) -> Callable[[], Iterator[dict[str, str]]]:
    """The pipeline's source: the worker's shards, in order (lazy: resampled draws). With
    an opener, each shard is opened ahead while the one before it is read."""
    if opener is None:
        return lambda: ({"url": url} for url in urls)

    def source() -> Iterator[dict[str, str]]:
        upcoming = iter(urls)
        url = next(upcoming, None)
        try:
            while url is not None:
                following = next(upcoming, None)
                if following is not None:
                    opener.open_ahead(following)
                yield {"url": url}  # webdataset opens it (opener.open) and reads it
                url = following
        finally:
            opener.discard_ahead()

    return source


def check_shard_counts(
    expected_count: Callable[[str], int | None], counters: WorkerCounters
) -> Callable[[Iterable[dict[str, Any]]], Iterator[dict[str, Any]]]:
    """Pass samples through; where a shard yields fewer samples than its manifest count,
    warn and count the missing ones (samples_missing). Shards without a count, and a
    shard that failed outright (already a stream error), are not checked."""
    warn = _RateLimitedWarning("short shard")

    def check(url: str | None, count: int) -> None:
        expected = expected_count(url) if url is not None else None
        if expected is not None and count < expected:
            counters.samples_missing += expected - count
            warn(
                f"{storage.redact_url(url or '?')} ended after {count} of its {expected} "
                "samples (truncated?)"
            )

    def stage(samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        url: str | None = None
        count = 0
        for sample in samples:
            if sample.get("__url__") != url:
                check(url, count)
                url, count = sample.get("__url__"), 0
            count += 1
            yield sample
        check(url, count)

    return stage


def keep_known_members(samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Drop every member that is not an image, caption or json (e.g. .pyd/.pth pickles)
    before anything could decode it."""
    for sample in samples:
        yield {k: v for k, v in sample.items() if k.startswith("__") or k in KEPT_EXTENSIONS}


def sample_rng(seed: int, epoch: int, rep: int, key: str) -> np.random.Generator:
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return np.random.default_rng([seed, epoch, rep, int.from_bytes(digest, "little")])


@dataclass(frozen=True)
class SampleProcessor:
    """Undecoded sample -> {key, image uint8 [H, W, 3], caption, rng}; raises if bad.

    The caption is tokenized per batch (`BatchBuilder`), with the sample's own generator
    (after the crop's draws), so masks are those of a per-sample tokenizer call."""

    image_size: int
    crop_scale: tuple[float, float] | None  # None: eval transform (centre crop)
    seed: int
    epoch: int

    def __call__(self, sample: dict[str, Any], rep: int) -> dict[str, Any]:
        key = sample["__key__"]
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if image_ext is None:
            raise ValueError("no image member")
        if "txt" not in sample:
            raise ValueError("no .txt caption member")
        caption = sample["txt"].decode("utf-8")  # strict: a non-UTF-8 caption is bad
        rng = sample_rng(self.seed, self.epoch, rep, key)
        with Image.open(io.BytesIO(sample[image_ext]), formats=PIL_FORMATS) as image:
            if self.crop_scale is None:
                pixels = transforms.eval_transform(image, self.image_size)
            else:
                pixels = transforms.train_transform(image, self.image_size, self.crop_scale, rng)
        return {"key": key, "image": pixels, "caption": caption, "rng": rng}


def decode_and_transform(
    samples: Iterable[dict[str, Any]],
    processor: SampleProcessor,
    rep: int,
    counters: WorkerCounters,
) -> Iterator[dict[str, Any]]:
    warn = _RateLimitedWarning("skipped bad sample")
    for sample in samples:
        counters.samples_read += 1
        try:
            yield processor(sample, rep)
        except Exception as exc:  # any decode failure: PIL, UTF-8, truncation, bombs
            counters.samples_bad += 1
            url = storage.redact_url(str(sample.get("__url__", "?")))
            warn(f"{sample.get('__key__')!r} in {url}: {type(exc).__name__}: {exc}")


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


def _shuffle_rng(*seed_parts: int) -> random.Random:
    return random.Random(int(np.random.SeedSequence(list(seed_parts)).generate_state(1)[0]))


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
    plan: EpochPlan | None  # train: the quota; eval: None (every sample once, last partial)
    start_step: int = 0

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
        # persistent worker keeps them for its later epochs.
        self.filesystems = storage.ShardFilesystems(spec.read_options)
        # Shared int64 [epoch, start_step], set by the loader before each pass: persistent
        # workers outlive the epoch their copy of `spec` was made for.
        self.position = position

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.position is not None:
            epoch, start_step = self.position.tolist()
            # This process's copy of the stream (a worker's own, or the loader's with no
            # workers): the rest of the pass reads self.spec.
            self.spec = dataclasses.replace(self.spec, epoch=epoch, start_step=start_step)
        spec = self.spec
        info = get_worker_info()
        loader_worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if spec.plan is not None:
            assert num_workers == spec.plan.num_workers, (num_workers, spec.plan)
        # Rotate worker roles on resume so the DataLoader's round robin continues in order.
        worker = (loader_worker + spec.start_step) % num_workers
        counters = WorkerCounters(worker=worker)
        # Filesystems are created lazily in this process (s3fs is not fork-safe).
        opener = storage.register_webdataset_opener(self.filesystems, counters.read)
        if spec.train:
            samples = self._train_samples(worker, counters, opener)
        else:
            samples = self._eval_samples(worker, num_workers, counters, opener)
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
            return self.buffers.acquire(loader_worker, batch_size, image_size, counters)

        for batch, slot in self._batches(samples, batch_size, new_images):
            counters.samples_delivered += len(batch["keys"])
            batch[STATS_KEY] = counters.as_dict()
            batch[BUFFER_KEY] = (loader_worker, slot)
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
            # The train quota is a whole number of batches: a partial one is a bug.
            assert not self.spec.train, f"partial train batch of {len(builder)}"
            yield builder.build(), slot

    def _pipeline(
        self,
        urls: Iterable[str],
        worker: int,
        rep: int,
        counters: WorkerCounters,
        opener: storage.ShardOpener,
    ) -> wds.DataPipeline:
        spec = self.spec
        processor = SampleProcessor(
            spec.config.image_size,
            spec.config.crop_scale if spec.train else None,
            spec.seed,
            spec.epoch,
        )
        handler = _stream_error_handler(counters)
        stages: list[Any] = [
            shard_urls(urls, opener),
            wds.tarfile_to_samples(handler=handler),
            check_shard_counts(spec.dataset.shard_size, counters),
            keep_known_members,
        ]
        if spec.train:
            stages.append(
                wds.shuffle(
                    spec.config.shuffle_buffer_samples,
                    spec.config.shuffle_initial_samples,
                    rng=_shuffle_rng(spec.seed, spec.epoch, spec.rank, worker, rep),
                )
            )
        stages.append(lambda src: decode_and_transform(src, processor, rep, counters))
        return wds.DataPipeline(*stages)

    def _train_samples(
        self, worker: int, counters: WorkerCounters, opener: storage.ShardOpener
    ) -> Iterator[dict[str, Any]]:
        """Exactly the worker's quota of samples, minus those a resume skips."""
        spec = self.spec
        assert spec.plan is not None
        quota = spec.plan.num_batches_per_worker * spec.plan.batch_size
        skip = (
            resume_skip_batches(spec.start_step, worker, spec.plan.num_workers)
            * spec.plan.batch_size
        )
        urls = spec.dataset.urls
        num_yielded = 0
        for rep in itertools.count():  # a pass over the worker's shards, repeated if short
            if spec.config.dataset_resampled:
                rep_urls: Iterable[str] = resampled_shards(
                    urls, spec.dataset.weights, spec.seed, spec.epoch, spec.rank, worker, rep
                )
            else:
                rep_urls = shards_for_reader(
                    urls,
                    spec.seed,
                    spec.epoch,
                    spec.rank,
                    spec.world_size,
                    worker,
                    spec.plan.num_workers,
                )
            counters.passes += 1
            yielded_in_pass = 0
            for sample in self._pipeline(rep_urls, worker, rep, counters, opener):
                yielded_in_pass += 1
                num_yielded += 1
                if num_yielded > skip:
                    yield sample
                else:
                    counters.samples_resume_skipped += 1
                if num_yielded == quota:
                    return
            if yielded_in_pass == 0:
                raise RuntimeError(
                    f"rank {spec.rank} data worker {worker}: a whole pass over its shards "
                    f"gave no readable sample ({counters.stream_errors} shard errors, "
                    f"{counters.samples_bad} bad samples); check the shards and the logs"
                )

    def _eval_samples(
        self,
        worker: int,
        num_workers: int,
        counters: WorkerCounters,
        opener: storage.ShardOpener,
    ) -> Iterator[dict[str, Any]]:
        spec = self.spec
        rank_urls = spec.dataset.urls[spec.rank :: spec.world_size]
        counters.passes += 1
        yield from self._pipeline(rank_urls[worker::num_workers], worker, 0, counters, opener)


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
    buffers, tokenizer and warm heaps) serve epoch after epoch: starting a worker costs
    ~50 ms of CPU (fork, fresh shared buffers, first-touch page faults), and at 64 GPUs x 8
    workers a worker's share of a PMC-OA epoch is only ~3,000 samples. They are kept only
    after a complete pass; a pass the consumer left early (a resume, a stop) takes the
    DataLoader with it, and the next pass starts fresh workers.
    """

    persistent_workers = False

    def __init__(self, spec: StreamSpec) -> None:
        self.spec = spec
        self.step = spec.start_step
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
            # Every random choice in the stream is seeded explicitly; a private generator
            # keeps the DataLoader from drawing its base seed from the global torch RNG,
            # which the trainer restores on resume for dropout (bit-identical resumes).
            generator=torch.Generator(),
        )
        return loader, buffers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.spec.plan is not None and self.step >= self.spec.plan.num_batches:
            return  # epoch already complete
        self.meter.worker_counters = {}
        # Read by every worker when its pass begins (after iter() below).
        self._position.copy_(torch.tensor([self.spec.epoch, self.step]))
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
            self.step += 1
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

    Resumable: `state_dict()` is the position (epoch, batches delivered this epoch);
    `load_state_dict()` continues there with the identical stream. Its workers persist
    from one complete epoch to the next.
    """

    persistent_workers = True

    @property
    def plan(self) -> EpochPlan:
        assert self.spec.plan is not None
        return self.spec.plan

    @property
    def epoch(self) -> int:
        return self.spec.epoch

    @property
    def num_batches(self) -> int:
        """Per epoch, for this rank (and every other)."""
        return self.plan.num_batches

    @property
    def num_samples(self) -> int:
        """Per epoch, over all ranks."""
        return self.plan.num_samples

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield from super().__iter__()
        assert self.step == self.num_batches, (self.step, self.plan)

    def set_epoch(self, epoch: int) -> None:
        self.spec = dataclasses.replace(self.spec, epoch=epoch, start_step=0)
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.spec.epoch,
            "step": self.step,
            "seed": self.spec.seed,
            "world_size": self.plan.world_size,
            "num_workers": self.plan.num_workers,
            "batch_size": self.plan.batch_size,
            "num_batches": self.plan.num_batches,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        mine = self.state_dict()
        changed = [
            f"{name} {state.get(name)} -> {mine[name]}"
            for name in ("seed", "world_size", "num_workers", "batch_size", "num_batches")
            if state.get(name) != mine[name]
        ]
        if changed:
            raise ValueError(
                "cannot continue the data stream where it stopped: it was saved with other "
                f"settings ({', '.join(changed)}). Resume with the same settings, or call "
                "set_epoch(epoch + 1) to start the next epoch afresh"
            )
        if not 0 <= state["step"] <= mine["num_batches"]:
            raise ValueError(f"saved step {state['step']} outside 0..{mine['num_batches']}")
        self.spec = dataclasses.replace(self.spec, epoch=state["epoch"], start_step=state["step"])
        self.step = state["step"]


class EvalLoader(_Loader):
    """Every val sample once across ranks; batch counts may differ between ranks."""

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
) -> TrainLoader:
    """The training loader of one rank. Reads the manifests (fsspec) and checks the shard
    count now, so a bad --train-data fails at start-up on every rank alike."""
    if config.train_data is None:
        raise ValueError("--train-data is required for training")
    _check_rank(rank, world_size)
    dataset = resolve_dataset(
        config.train_data, config.train_num_samples, config.train_data_upsampling_factors
    )
    plan = plan_train_epoch(
        dataset, config.batch_size, world_size, config.num_workers, config.dataset_resampled
    )
    spec = StreamSpec(dataset, config, tokenizer, rank, world_size, seed, epoch, True, plan)
    return TrainLoader(spec)


def build_eval_loader(
    config: DataConfig, tokenizer: CaptionTokenizer, rank: int, world_size: int, seed: int = 0
) -> EvalLoader:
    """Every val sample exactly once across ranks (shards split by rank, then worker), in
    a fixed order, centre crops, last batch partial. Ranks may get different batch counts:
    evaluation must not run a collective per batch."""
    if config.val_data is None:
        raise ValueError("--val-data is required for evaluation")
    _check_rank(rank, world_size)
    dataset = resolve_dataset(config.val_data, config.val_num_samples, flag="--val-data")
    spec = StreamSpec(dataset, config, tokenizer, rank, world_size, seed, 0, False, None)
    return EvalLoader(spec)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
