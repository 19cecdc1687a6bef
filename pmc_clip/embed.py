"""Embed a collection with a trained PMC-CLIP into Parquet parts, and search them.

    python -m pmc_clip.embed --input 'shards/pmc-oa-test-{000000..000016}.tar' \
        --output embeddings/ --model-source logs/pmc-clip-rn50
    python -m pmc_clip.embed --input figures/ --output embeddings/ --model-source export/
    python -m pmc_clip.embed --input pairs.jsonl --image-dir images/ --output embeddings/ ...
    python -m pmc_clip.embed --search embeddings/ --query "chest x-ray" --top-k 5

Inputs: our shards (a spec as --val-data takes; one part per shard), a folder of images
(searched recursively; image embeddings only), or a CSV/JSONL table of image paths and
captions under --image-dir (parts of --part-size rows). `--model-source` is anything
`pmc_clip.load` reads.

Output: `part-NNNNN.parquet` files with the columns key (string), caption (string, null
for a folder), image_embedding and text_embedding (fixed-size lists of float32,
L2-normalised), and `_embed.json`, the options they were made with. Parts are numbered
over the whole input and part i is embedded by rank i % world size (torchrun or SLURM:
pmc_clip.distributed; the ranks never communicate). A part is written under a staged
name and renamed when complete, so a rerun of the same command after a kill keeps every
finished part and embeds only the others, with any number of ranks; a rerun with other
options into the same --output is refused. Unreadable images are skipped with a warning.

`--search` encodes the query with the model the embeddings were made with (or
`--model-source`) and prints the top-k rows by cosine similarity (numpy, one pass over
the parts: a few million rows fit in memory; faiss is not needed at that size).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from pmc_clip import api, distributed, metrics, storage
from pmc_clip.config import EVAL_PREPROCESS_CHOICES
from pmc_clip.data.decode import PIL_FORMATS
from pmc_clip.embed_inputs import Item, Part, plan_parts
from pmc_clip.entry import EXIT_CODE_INTERRUPTED

# "_" first: pyarrow.dataset (and Spark) skip it when reading the folder as a dataset.
MANIFEST = "_embed.json"
MANIFEST_FORMAT = "pmc_clip-embeddings/1"
MODALITIES = ("image", "text")
EXIT_CODE_USAGE = 2
log = logging.getLogger(metrics.LOGGER_NAME)


# --------------------------------------------------------------------------- embedding


@dataclass(frozen=True)
class EmbedOptions:
    input: str
    output: str
    model_source: str
    modalities: tuple[str, ...]
    batch_size: int = 64
    part_size: int = 10_000
    workers: int = 4
    image_dir: str | None = None
    table_keys: tuple[str, str, str] = ("image", "caption", ",")  # image, caption, separator
    pmc_clip_beta: str | None = None
    model: str = api.RELEASED_MODEL
    tokenizer: str | None = None
    eval_preprocess: str | None = None

    def manifest(self, kind: str, num_parts: int, clip: api.LoadedModel) -> dict[str, Any]:
        """What the parts depend on (credentials redacted): a rerun must match it."""
        return {
            "format": MANIFEST_FORMAT,
            "input": storage.redact_url(self.input),
            "input_kind": kind,
            "image_dir": self.image_dir and storage.redact_url(self.image_dir),
            "table_keys": list(self.table_keys),
            "part_size": self.part_size,
            "num_parts": num_parts,
            "modalities": list(self.modalities),
            "model_source": clip.source,
            "pmc_clip_beta": self.pmc_clip_beta and storage.redact_url(self.pmc_clip_beta),
            "model": self.model,
            "tokenizer": self.tokenizer,
            "eval_preprocess": clip.preprocess.mode,
            "embed_dim": clip.model.config.embed_dim,
        }


def load_model(options: EmbedOptions | argparse.Namespace, device: torch.device) -> api.LoadedModel:
    return api.load(
        options.model_source,
        device,
        pmc_clip_beta=options.pmc_clip_beta,
        model=options.model,
        tokenizer=options.tokenizer,
        eval_preprocess=options.eval_preprocess,
    )


def embed(options: EmbedOptions, info: distributed.DistInfo, device: torch.device) -> int:
    """Embed this rank's parts that are not written yet; return how many it wrote."""
    kind, parts = plan_parts(
        options.input, options.image_dir, options.part_size, options.table_keys
    )
    if kind == "folder" and "text" in options.modalities:
        raise ValueError("a folder of images has no captions: pass --modalities image")
    clip = load_model(options, device)
    fs, output = storage.url_to_fs(options.output)
    fs.makedirs(output, exist_ok=True)
    _check_or_write_manifest(fs, output, options.manifest(kind, len(parts), clip))
    done = {os.path.basename(path) for path in fs.glob(storage.join(output, "part-*.parquet"))}
    mine = [p for p in parts if p.index % info.world_size == info.rank and p.name not in done]
    log.info(
        "%d parts, %d already written; rank %d embeds %d of them",
        len(parts),
        len(done),
        info.rank,
        len(mine),
    )
    with ThreadPoolExecutor(options.workers) as decoders:
        for part in mine:
            # What a run killed while writing this part left (only its owner writes it).
            for stale in fs.glob(storage.join(output, f".tmp-{part.name}-*")):
                fs.rm_file(stale)
            table = _embed_part(clip, part, options, decoders, progress=info.rank == 0)
            _write_part(fs, storage.join(output, part.name), table)
            log.info("%s: %d rows", part.name, table.num_rows)
    return len(mine)


def _check_or_write_manifest(fs: Any, output: str, manifest: dict[str, Any]) -> None:
    """Every rank computes the same manifest: the first to find none writes it (staged and
    renamed, identical bytes whoever wins); one that differs refuses the run."""
    path = storage.join(output, MANIFEST)
    if fs.exists(path):
        with fs.open(path) as file:
            written = json.load(file)
        if written != manifest:
            changed = sorted(k for k in manifest if written.get(k) != manifest[k])
            raise ValueError(
                f"the embeddings in this --output were made with other options "
                f"({', '.join(changed)} differ): rerun the same command to resume, or "
                "write to a new --output"
            )
        return
    staged = storage.staging_path(fs, path)
    with open(staged, "w") as file:
        json.dump(manifest, file, indent=1)
    storage.publish(fs, staged, path)


def _embed_part(
    clip: api.LoadedModel,
    part: Part,
    options: EmbedOptions,
    decoders: ThreadPoolExecutor,
    progress: bool,
) -> pa.Table:
    keys: list[str] = []
    captions: list[str | None] = []
    image_parts: list[np.ndarray] = []
    text_parts: list[np.ndarray] = []
    num_batches = None if part.num_items is None else -(-part.num_items // options.batch_size)
    batches = _batched(part.items(), options.batch_size)
    for batch in metrics.progress_bar(batches, part.name, enabled=progress, total=num_batches):
        decoded = list(decoders.map(lambda item: _pixels(clip, item), batch))
        kept = [
            (item, pixels)
            for item, pixels in zip(batch, decoded, strict=True)
            if pixels is not None
        ]
        if not kept:
            continue
        if "text" in options.modalities:
            missing = [item.key for item, _ in kept if item.caption is None]
            if missing:
                raise ValueError(f"{part.name}: sample {missing[0]!r} has no caption to embed")
            texts = [str(item.caption) for item, _ in kept]
            text_parts.append(clip.encode_texts(texts).numpy())
        if "image" in options.modalities:
            pixels = torch.stack([pixels for _, pixels in kept])
            image_parts.append(clip.encode_images(pixels).numpy())
        keys += [item.key for item, _ in kept]
        captions += [item.caption for item, _ in kept]
    columns: dict[str, pa.Array] = {
        "key": pa.array(keys, pa.string()),
        "caption": pa.array(captions, pa.string()),
    }
    dim = clip.model.config.embed_dim
    for name, chunks in (("image_embedding", image_parts), ("text_embedding", text_parts)):
        if name.split("_")[0] in options.modalities:
            flat = np.concatenate(chunks).reshape(-1) if chunks else np.empty(0, np.float32)
            columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim)
    return pa.table(columns)


def _pixels(clip: api.LoadedModel, item: Item) -> torch.Tensor | None:
    """uint8 [3, S, S] pixels of the item's image, None (with a warning) if unreadable."""
    try:
        if isinstance(item.image, bytes):
            data, formats = item.image, PIL_FORMATS
        else:
            fs, path = storage.url_to_fs(item.image)
            with fs.open(path, "rb") as file:
                data, formats = file.read(), None
        with Image.open(io.BytesIO(data), formats=formats) as image:
            return clip.preprocess.pixels(image)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        log.warning("%r skipped: %s: %s", item.key, type(e).__name__, e)
        return None


def _batched(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def _write_part(fs: Any, path: str, table: pa.Table) -> None:
    staged = storage.staging_path(fs, path)
    pq.write_table(table, staged)
    storage.publish(fs, staged, path)


# --------------------------------------------------------------------------- search


def search(
    output: str, query: str, top_k: int, clip: api.LoadedModel
) -> list[tuple[float, str, str | None]]:
    """The top_k (cosine, key, caption) of the written image embeddings for `query`."""
    fs, folder = storage.url_to_fs(output)
    paths = sorted(fs.glob(storage.join(folder, "part-*.parquet")))
    if not paths:
        raise ValueError(f"{storage.redact_url(output)} holds no part-*.parquet embeddings")
    keys: list[str] = []
    captions: list[str | None] = []
    blocks = []
    for path in paths:
        with fs.open(path, "rb") as file:
            table = pq.read_table(file, columns=["key", "caption", "image_embedding"])
        column = table.column("image_embedding").combine_chunks()
        blocks.append(column.flatten().to_numpy().reshape(len(table), column.type.list_size))
        keys += table.column("key").to_pylist()
        captions += table.column("caption").to_pylist()
    embeddings = np.concatenate(blocks)
    query_embedding = clip.encode_texts([query]).numpy()[0]
    if query_embedding.shape[0] != embeddings.shape[1]:
        raise ValueError(
            f"the model embeds in {query_embedding.shape[0]} dimensions, the parts in "
            f"{embeddings.shape[1]}: pass the --model-source they were made with"
        )
    scores = embeddings @ query_embedding
    order = np.argsort(-scores, kind="stable")[:top_k]
    return [(float(scores[i]), keys[i], captions[i]) for i in order]


def _recorded_model(output: str) -> dict[str, Any]:
    fs, folder = storage.url_to_fs(output)
    path = storage.join(folder, MANIFEST)
    if not fs.exists(path):
        raise ValueError(f"{storage.redact_url(output)} has no {MANIFEST}: not an embed output")
    with fs.open(path) as file:
        manifest: dict[str, Any] = json.load(file)
    return manifest


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pmc_clip.embed", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    parser.add_argument("--input", help="shard spec, image folder, or .csv/.jsonl table")
    parser.add_argument("--output", help="folder (or fsspec URL) for the Parquet parts")
    parser.add_argument("--search", metavar="OUTPUT", help="search the embeddings in OUTPUT")
    parser.add_argument("--query", help="with --search: the text to search for")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--model-source", help="what pmc_clip.load reads (run dir, export, ...)")
    parser.add_argument("--pmc-clip-beta", help="with --model-source PMC_CLIP:beta: its path/URL")
    parser.add_argument("--model", default=api.RELEASED_MODEL, help="PMC_CLIP:beta's architecture")
    parser.add_argument("--tokenizer", help="a tokenizer replacing the source's")
    parser.add_argument("--eval-preprocess", choices=EVAL_PREPROCESS_CHOICES)
    parser.add_argument("--image-dir", help="folder the table's image paths are under")
    parser.add_argument("--csv-img-key", default="image")
    parser.add_argument("--csv-caption-key", default="caption")
    parser.add_argument("--csv-separator", default=",")
    parser.add_argument("--modalities", nargs="+", choices=MODALITIES)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--part-size", type=int, default=10_000, help="rows per part (tables)")
    parser.add_argument("--workers", type=int, default=4, help="image decoding threads")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    return parser


def _options(args: argparse.Namespace) -> EmbedOptions:
    if not args.input or not args.output or not args.model_source:
        raise ValueError("--input, --output and --model-source are required (or --search)")
    for flag in ("batch_size", "part_size", "workers"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    folder = os.path.isdir(args.input)
    return EmbedOptions(
        input=args.input,
        output=args.output,
        model_source=args.model_source,
        modalities=tuple(args.modalities or (("image",) if folder else MODALITIES)),
        batch_size=args.batch_size,
        part_size=args.part_size,
        workers=args.workers,
        image_dir=args.image_dir,
        table_keys=(args.csv_img_key, args.csv_caption_key, args.csv_separator),
        pmc_clip_beta=args.pmc_clip_beta,
        model=args.model,
        tokenizer=args.tokenizer,
        eval_preprocess=args.eval_preprocess,
    )


def run(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    info = distributed.detect()
    device = distributed.select_device(info, args.device)
    if args.search is None:
        metrics.setup_logging(None, info.rank)
        embed(_options(args), info, device)
        return 0
    if not args.query or args.top_k < 1:
        raise ValueError("--search needs --query TEXT and --top-k >= 1")
    recorded = _recorded_model(args.search)
    if args.model_source is None:  # the model the embeddings were made with
        for name in ("model_source", "pmc_clip_beta", "model", "tokenizer", "eval_preprocess"):
            if getattr(args, name) is None:
                setattr(args, name, recorded.get(name))
    for score, key, caption in search(
        args.search, args.query, args.top_k, load_model(args, device)
    ):
        print(f"{score:.4f}\t{key}\t{caption or ''}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    metrics.install_secret_filter(arguments)
    try:
        return run(arguments)
    except (ValueError, storage.StorageError) as e:
        print(metrics.mask_secrets(f"pmc_clip.embed: error: {e}"), file=sys.stderr)
        return EXIT_CODE_USAGE if isinstance(e, ValueError) else 1
    except KeyboardInterrupt:
        message = "interrupted (Ctrl-C); the finished parts are kept: rerun the command to resume"
        print(f"pmc_clip.embed: {message}", file=sys.stderr)
        return EXIT_CODE_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
