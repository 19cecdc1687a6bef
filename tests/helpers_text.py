"""Local tiny BERT pieces for tests: a WordPiece vocab, a fast tokenizer, a BertConfig.

Nothing here touches the network. The special tokens use PubMedBERT's ids
([PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4) so id-dependent code is exercised as in
production.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import BertTokenizerFast, PreTrainedTokenizerBase

from pmc_clip.tokenize import CaptionTokenizer

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [
    "the", "a", "of", "and", "in", "with", "figure", "image", "panel", "shows", "scale", "bar",
    "cell", "cells", "tissue", "tumor", "ct", "mri", "x", "ray", "chest", "brain", "liver",
    "lung", "heart", "kidney", "stained", "arrow", "arrows", "indicate", "lesion", "mass",
    "left", "right", "upper", "lower", "axial", "sagittal", "section", "patient", "control",
    "group", "mice", "protein", "expression", "level", "fluorescence", "microscopy", "um",
    "mm", "10", "20", "50", "100", "(", ")", ",", ".", "-", ":", ";", "%",
    "hist", "immuno", "cardio", "radio", "graph", "logy",
]  # fmt: skip
CONTINUATIONS = ["##ology", "##ic", "##al", "##s", "##ed", "##ing", "##ity", "##o", "##graph"]
CAPTIONS = [
    "Chest X-ray of the patient with a mass in the left upper lobe.",
    "Histological section of liver tissue stained with H&E; scale bar 50 um.",
    "Immunofluorescence microscopy shows protein expression in cells (arrows).",
    "Axial CT image of the brain: lesion indicated by the arrow.",
    "Cardiology panel: heart and lung of control mice, 10 mm.",
    "Sagittal MRI of the kidney, tumor group, 20% fluorescence level.",
    "Radiographic images of the lower chest with arrows indicating the lesions.",
    "Figure",
    "",
]


def write_vocab(directory: Path) -> Path:
    """Write a small WordPiece vocab.txt (specials at PubMedBERT's ids) and return it."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab_file = directory / "vocab.txt"
    tokens = SPECIAL_TOKENS + WORDS + CONTINUATIONS + list("abcdefghijklmnopqrstuvwxyz&")
    tokens += [f"##{letter}" for letter in "abcdefghijklmnopqrstuvwxyz"]
    unique_tokens = list(dict.fromkeys(tokens))
    vocab_file.write_text("\n".join(unique_tokens) + "\n")
    return vocab_file


def build_tokenizer(directory: Path) -> BertTokenizerFast:
    """A lower-casing fast WordPiece tokenizer saved to `directory` (loadable by path)."""
    tokenizer = BertTokenizerFast(vocab=str(write_vocab(directory)), do_lower_case=True)
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def tiny_text_config(vocab_size: int, hidden_size: int = 64) -> dict[str, Any]:
    """BertConfig kwargs of a 2-layer BERT for CPU tests; dropout off for determinism."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 4 * hidden_size,
        "max_position_embeddings": 77,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "pad_token_id": 0,
    }


def make_batch(
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    seed: int,
    image_size: int = 64,
    mlm_probability: float = 0.3,
) -> dict[str, torch.Tensor]:
    """A seeded batch as the data pipeline delivers it: images plus tokenized captions."""
    rng = np.random.default_rng(seed)
    caption_tokenizer = CaptionTokenizer(tokenizer, mlm_probability=mlm_probability)
    captions = [CAPTIONS[i % (len(CAPTIONS) - 1)] for i in range(batch_size)]  # no empty one
    samples = [caption_tokenizer(caption, rng) for caption in captions]
    batch = {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
    generator = torch.Generator().manual_seed(seed)
    batch["images"] = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    return batch


def save_released_checkpoint(model: torch.nn.Module, path: Path) -> None:
    """`model`'s weights in the released PMC_CLIP:beta checkpoint's layout: DDP's `module.`
    prefixes, the stale position_ids buffer, numpy scalars, optimizer and scaler state."""
    state_dict = {f"module.{k}": v for k, v in model.state_dict().items()}
    state_dict["module.text_encoder.embeddings.position_ids"] = torch.arange(77)[None]
    torch.save(
        {
            "epoch": np.int64(100),
            "name": "PMC_CLIP:beta",
            "state_dict": state_dict,
            "optimizer": {"state": {}, "param_groups": [{"lr": np.float64(1e-4)}]},
            "scaler": {"scale": np.float32(65536.0), "growth_tracker": np.int32(0)},
        },
        path,
    )
