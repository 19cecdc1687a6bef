"""Evaluation metrics: image<->text retrieval recall@K (+ MLM accuracy) and zero-shot
classification. The entry point is `pmc_clip.evaluate`; the trainer calls the same functions.

Retrieval at scale: every rank embeds its own part of the val shards; the embeddings are
all-gathered (N x D per modality: 100k pairs x 768 x 4 bytes = 300 MB) and put in a
canonical order (sorted by sample key), so the numbers do not depend on the world size;
then the similarity matrix is never built whole: query blocks of
`similarity_chunk_size` rows are scored against all N candidates (4096 x 100k x 4 bytes =
1.6 GB at most per block), the blocks are divided among the ranks, and the hit counts are
all-reduced. The rank of a query's true partner is its place in a stable sort by
score (exact ties, e.g. duplicate captions, are broken by position, never in its favour).

`--test-2000` evaluates on 2,000 pairs drawn *without* replacement (the original sampled
with replacement and dropped a last partial batch: 1,984 pairs) with a fixed seed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

from pmc_clip import metrics, transforms
from pmc_clip.model import PMCClip
from pmc_clip.precision import autocast_context
from pmc_clip.tokenize import IGNORE_INDEX, CaptionTokenizer

RECALL_AT = (1, 5, 10)
TEST_2000_PAIRS = 2000
ZEROSHOT_TEMPLATES = (
    "{}.",
    "an image of {}.",
    "a figure showing {}.",
    "a microscopy image of {}.",
    "a medical image showing {}.",
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


@dataclass
class Embeddings:
    keys: list[str]
    image: torch.Tensor  # [N, D] L2-normalised, float32, CPU
    text: torch.Tensor  # [N, D]
    mlm_correct: int = 0
    mlm_total: int = 0


@torch.no_grad()
def embed(
    model: PMCClip, batches: Any, device: torch.device, *, precision: str, progress: bool = False
) -> Embeddings:
    """Embed this rank's val batches. `model` is the bare PMCClip (not DDP: evaluation
    ranks see different batch counts and must not meet in the model's collectives).
    `progress`: a tqdm bar on stderr, drawn only when stderr is a terminal."""
    was_training = model.training
    model.eval()
    keys: list[str] = []
    image_parts, text_parts = [], []
    mlm_correct = mlm_total = 0
    masked_contrastive = model.config.contrastive_text == "masked"
    for batch in metrics.progress_bar(batches, "embedding", enabled=progress):
        images = transforms.normalize_images(batch["images"].to(device, non_blocking=True))
        input_ids = batch["input_ids"].to(device, non_blocking=True)
        attention_mask = batch["attention_mask"].to(device, non_blocking=True)
        mlm_input_ids = batch.get("mlm_input_ids")
        with autocast_context(device, precision):
            if mlm_input_ids is None:
                outputs = model(images, input_ids, attention_mask)
            else:
                outputs = model(images, input_ids, attention_mask, mlm_input_ids.to(device))
                labels = batch["mlm_labels"].to(device)
                predicted = outputs["mlm_logits"].argmax(-1)
                selected = labels != IGNORE_INDEX
                mlm_correct += int((predicted[selected] == labels[selected]).sum())
                mlm_total += int(selected.sum())
            text = outputs["text_features"]
            if masked_contrastive and mlm_input_ids is not None:
                # Retrieval always scores the caption as written, never a masked one.
                text = F.normalize(model.encode_text(input_ids, attention_mask), dim=-1)
        keys += list(batch["keys"])
        image_parts.append(outputs["image_features"].float().cpu())
        text_parts.append(text.float().cpu())
    model.train(was_training)
    dim = model.config.embed_dim
    return Embeddings(
        keys,
        torch.cat(image_parts) if image_parts else torch.empty(0, dim),
        torch.cat(text_parts) if text_parts else torch.empty(0, dim),
        mlm_correct,
        mlm_total,
    )


def gather_embeddings(local: Embeddings, world_size: int, device: torch.device) -> Embeddings:
    """All ranks' embeddings on every rank, sorted by key (a canonical order)."""
    if world_size > 1:
        keys_per_rank: list[Any] = [None] * world_size
        dist.all_gather_object(keys_per_rank, local.keys)
        counts = [len(k) for k in keys_per_rank]
        image = _all_gather_varlen(local.image, counts, device)
        text = _all_gather_varlen(local.text, counts, device)
        keys = [key for rank_keys in keys_per_rank for key in rank_keys]
        mlm = torch.tensor([local.mlm_correct, local.mlm_total], device=device)
        dist.all_reduce(mlm)
        mlm_correct, mlm_total = (int(v) for v in mlm.tolist())
    else:
        keys, image, text = local.keys, local.image, local.text
        mlm_correct, mlm_total = local.mlm_correct, local.mlm_total
    if len(set(keys)) != len(keys):
        raise ValueError("val samples with duplicate keys: each pair must have a unique key")
    order = sorted(range(len(keys)), key=keys.__getitem__)
    index = torch.tensor(order, dtype=torch.long)
    return Embeddings([keys[i] for i in order], image[index], text[index], mlm_correct, mlm_total)


def _all_gather_varlen(
    tensor: torch.Tensor, counts: list[int], device: torch.device
) -> torch.Tensor:
    """all_gather needs equal shapes: pad every rank's rows to the largest count."""
    max_count = max(counts)
    padded = torch.zeros(max_count, tensor.shape[1], dtype=tensor.dtype, device=device)
    padded[: tensor.shape[0]] = tensor.to(device)
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n].cpu() for g, n in zip(gathered, counts, strict=True)])


def select_test_2000(embeddings: Embeddings, seed: int) -> Embeddings:
    num_pairs = len(embeddings.keys)
    if num_pairs < TEST_2000_PAIRS:
        raise ValueError(f"--test-2000 needs at least 2000 val pairs, the val set has {num_pairs}")
    chosen = np.sort(np.random.default_rng(seed).choice(num_pairs, TEST_2000_PAIRS, replace=False))
    index = torch.from_numpy(chosen)
    return Embeddings(
        [embeddings.keys[i] for i in chosen],
        embeddings.image[index],
        embeddings.text[index],
        embeddings.mlm_correct,
        embeddings.mlm_total,
    )


def retrieval_metrics(
    *,
    image: torch.Tensor,
    text: torch.Tensor,
    chunk_size: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Recall@K both ways for paired rows (image i <-> text i); see the module doc."""
    device = device or torch.device("cpu")
    num_pairs = image.shape[0]
    hits = torch.zeros(2, len(RECALL_AT), dtype=torch.float64, device=device)
    if num_pairs == 0:
        raise ValueError("retrieval evaluation got no val pairs")
    image, text = image.to(device), text.to(device)
    ks = torch.tensor(RECALL_AT, device=device)
    for direction, (queries, candidates) in enumerate(((image, text), (text, image))):
        for block, start in enumerate(range(0, num_pairs, chunk_size)):
            if block % world_size != rank:
                continue
            scores = queries[start : start + chunk_size] @ candidates.T  # [chunk, N]
            rows = torch.arange(scores.shape[0], device=device)
            partner = (rows + start).unsqueeze(1)
            positive = scores[rows, partner.squeeze(1)].unsqueeze(1)
            # Rank of the partner in a stable sort by score: candidates scoring higher,
            # plus equal scorers that come first (duplicate captions tie exactly).
            columns = torch.arange(num_pairs, device=device).unsqueeze(0)
            ahead = (scores > positive) | ((scores == positive) & (columns < partner))
            ranks = ahead.sum(dim=1)  # 0 = the partner scored highest
            hits[direction] += (ranks.unsqueeze(1) < ks).sum(dim=0).double()
    if world_size > 1:
        dist.all_reduce(hits)
    recall = (hits / num_pairs * 100).cpu()
    metrics = {}
    for direction, name in enumerate(("image_to_text", "text_to_image")):
        for j, k in enumerate(RECALL_AT):
            metrics[f"{name}_R@{k}"] = float(recall[direction, j])
    metrics["mean_recall"] = float(recall.mean())
    metrics["num_pairs"] = float(num_pairs)
    return metrics


def evaluate_retrieval(
    model: PMCClip,
    batches: Any,
    *,
    device: torch.device,
    precision: str,
    rank: int,
    world_size: int,
    chunk_size: int,
    test_2000_seed: int | None = None,
) -> dict[str, float]:
    """Embed on all ranks, gather, score in blocks. Every rank must call it."""
    local = embed(model, batches, device, precision=precision, progress=rank == 0)
    embeddings = gather_embeddings(local, world_size, device)
    if test_2000_seed is not None:
        embeddings = select_test_2000(embeddings, test_2000_seed)
    metrics = retrieval_metrics(
        image=embeddings.image,
        text=embeddings.text,
        chunk_size=chunk_size,
        rank=rank,
        world_size=world_size,
        device=device,
    )
    if embeddings.mlm_total:
        metrics["mlm_accuracy"] = 100.0 * embeddings.mlm_correct / embeddings.mlm_total
    return metrics


# --------------------------------------------------------------------------- zero-shot


def read_image_folder(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(image path, class index)]) of a folder-per-class dataset."""
    if not os.path.isdir(root):
        raise ValueError(
            f"--zeroshot-data {root!r} is not a folder (expected one folder per class)"
        )
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if len(classes) < 2:
        raise ValueError(
            f"--zeroshot-data {root!r} needs at least 2 class folders, found {classes}"
        )
    items = [
        (os.path.join(root, name, file), index)
        for index, name in enumerate(classes)
        for file in sorted(os.listdir(os.path.join(root, name)))
        if file.lower().endswith(IMAGE_SUFFIXES)
    ]
    return classes, items


def macro_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over classes of the one-vs-rest ROC AUC (Mann-Whitney U, ties count half);
    classes with no positive or no negative example are left out of the mean."""
    aucs = []
    for c in range(scores.shape[1]):
        positive = labels == c
        num_pos, num_neg = int(positive.sum()), int((~positive).sum())
        if num_pos == 0 or num_neg == 0:
            continue
        s = scores[:, c].double()
        greater = (s[positive].unsqueeze(1) > s[~positive].unsqueeze(0)).double().sum()
        ties = (s[positive].unsqueeze(1) == s[~positive].unsqueeze(0)).double().sum()
        aucs.append(float((greater + 0.5 * ties) / (num_pos * num_neg)))
    return float(np.mean(aucs)) * 100 if aucs else float("nan")


@torch.no_grad()
def class_text_features(
    encode_texts: Callable[[list[str]], torch.Tensor],
    class_names: Sequence[str],
    templates: Sequence[str] = ZEROSHOT_TEMPLATES,
) -> torch.Tensor:
    """[C, D] zero-shot classifier: each class's prompts (`template.format(name)`) encoded,
    L2-normalised, averaged and normalised again (CLIP's prompt ensembling)."""
    return torch.stack(
        [
            F.normalize(
                F.normalize(encode_texts([t.format(name) for t in templates]).float(), dim=-1).mean(
                    0
                ),
                dim=-1,
            )
            for name in class_names
        ]
    )


def zero_shot_classification(
    model: PMCClip,
    tokenizer: CaptionTokenizer,
    *,
    root: str,
    device: torch.device,
    precision: str,
    batch_size: int = 64,
    templates: Sequence[str] = ZEROSHOT_TEMPLATES,
    preprocess: str = "fast",
) -> dict[str, float]:
    """Accuracy and macro AUC (%) of classifying images by their similarity to prompts
    built from the class folder names ('_' read as a space). Images are centre-cropped
    at the model's own input size (`preprocess`: see transforms.eval_transform)."""
    classes, items = read_image_folder(root)
    image_size = model.config.image_size
    was_training = model.training
    model.eval()
    rng = np.random.default_rng(0)  # unused by unmasked tokenisation; the API takes one

    def encode_texts(texts: list[str]) -> torch.Tensor:
        tokens = [tokenizer(text, rng) for text in texts]
        ids = torch.stack([t["input_ids"] for t in tokens]).to(device)
        mask = torch.stack([t["attention_mask"] for t in tokens]).to(device)
        return model.encode_text(ids, mask)

    with autocast_context(device, precision):
        names = [name.replace("_", " ") for name in classes]
        classifier = class_text_features(encode_texts, names, templates)  # [C, D]
        logits, labels = [], []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            images = torch.stack(
                [
                    _load_eval_image(path, image_size=image_size, preprocess=preprocess)
                    for path, _ in chunk
                ]
            )
            images = transforms.normalize_images(images.to(device))
            features = F.normalize(model.encode_image(images).float(), dim=-1)
            logits.append((features @ classifier.T).cpu())
            labels += [label for _, label in chunk]
    model.train(was_training)
    scores = torch.cat(logits).softmax(dim=-1)
    targets = torch.tensor(labels)
    accuracy = float((scores.argmax(-1) == targets).double().mean()) * 100
    return {
        "accuracy": accuracy,
        "macro_auc": macro_auc(scores, targets),
        "num_images": float(len(items)),
        "num_classes": float(len(classes)),
    }


def _load_eval_image(path: str, *, image_size: int, preprocess: str) -> torch.Tensor:
    with Image.open(path) as image:
        return transforms.eval_pixels(image, image_size, preprocess)
