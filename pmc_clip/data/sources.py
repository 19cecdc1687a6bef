"""Where the samples are: a shard spec (`--train-data`/`--val-data`) resolved into shard
URLs with their sample counts (sizes.json or manifest.json beside the shards, else the
shards' indexes), and the start-up checks that make a bad spec fail before any worker
starts: every shard exists and is indexed (training), every val shard is a plain `.tar`
and no key names two val samples (evaluation).
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
from dataclasses import dataclass
from typing import Any

import fsspec

from pmc_clip import shard_index, storage
from pmc_clip.config import DataConfig
from pmc_clip.data.epoch_plan import TrainShards
from pmc_clip.data.shard_cache import check_cache_limit
from pmc_clip.shard_index import INDEX_TOOL
from pmc_clip.sharding.format import LISTING_FILES, listed_counts


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
    for name in LISTING_FILES:
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
            pairs = listed_counts(name, document)
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
    *,
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
        check_cache_limit(
            limit_bytes=config.cache_limit_bytes, largest_file_bytes=max(shard_bytes.values())
        )
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
