"""ModelConfig: the architecture of a PMCClip, read from a JSON file.

Original-vs-corrected switches (the defaults are the corrected behaviour):
- `mask_padding` (default true): BERT and the fusion transformer ignore [PAD] positions.
  The original passed no attention mask, so pads were attended; set false to reproduce
  the released weights' outputs exactly.
- `contrastive_text` (default "unmasked"): with MLM on, the contrastive text feature comes
  from the unmasked caption (what evaluation sees) and the masked caption only feeds the
  MLM head. The original encoded only the masked caption and used it for both ("masked":
  one BERT pass instead of two, but contrastive training on corrupted captions).
- `attnpool_heads`: 32 for RN50 (width * 32 // 64), as in the training code that produced
  the released weights. PMC-CLIP's quick-start notebook builds the pool with 8 heads, which
  changes the outputs of the same weights; set 8 only to reproduce that notebook.

The bundled `RN50_fusion4_original` (and `tiny_original`) set the first two switches to the
original's; the trainer builds it for `--resume PMC_CLIP:beta --model RN50_fusion4`
(pmc_clip.checkpoint.released_model_name).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONTRASTIVE_TEXT_CHOICES = ("unmasked", "masked")


@dataclass(frozen=True)
class ModelConfig:
    embed_dim: int
    vision_layers: tuple[int, int, int, int]
    vision_width: int
    text_config: dict[str, Any]  # BertConfig keyword arguments (architecture of the text tower)
    image_size: int = 224
    attnpool_heads: int | None = None  # None: vision_width * 32 // 64 (head width 64)
    context_length: int = 77
    fusion_layers: int = 4
    fusion_heads: int = 8
    fusion_mlp_ratio: float = 4.0
    mlm: bool = True
    mask_padding: bool = True
    contrastive_text: str = "unmasked"
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if len(self.vision_layers) != 4 or min(self.vision_layers) < 1:
            raise ValueError(f"vision_layers needs 4 positive block counts: {self.vision_layers}")
        if self.contrastive_text not in CONTRASTIVE_TEXT_CHOICES:
            raise ValueError(
                f"contrastive_text must be one of {CONTRASTIVE_TEXT_CHOICES}, "
                f"got {self.contrastive_text!r}"
            )
        text_width = self.text_config.get("hidden_size")
        if self.mlm and text_width != self.embed_dim:
            raise ValueError(
                f"the fusion transformer mixes text states (text_config.hidden_size={text_width}) "
                f"with image features (embed_dim={self.embed_dim}): they must be equal"
            )
        if "vocab_size" not in self.text_config:
            raise ValueError("text_config must set vocab_size (the tokenizer's vocabulary size)")
        if self.fusion_layers < 1 and self.mlm:
            raise ValueError("mlm needs fusion_layers >= 1")

    @property
    def num_attnpool_heads(self) -> int:
        return self.attnpool_heads or self.vision_width * 32 // 64

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        values = dict(values)
        if "vision_layers" in values:
            values["vision_layers"] = tuple(values["vision_layers"])
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        with open(path) as file:
            return cls.from_dict(json.load(file))

    def replace(self, **overrides: Any) -> ModelConfig:
        return ModelConfig.from_dict({**dataclasses.asdict(self), **overrides})

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["vision_layers"] = list(self.vision_layers)
        return values
