"""The text tower: a Hugging Face BertModel, pretrained or randomly initialised.

- `pretrained` (hub id or local directory): `BertModel.from_pretrained`; its config must
  agree with the model config's `text_config` on the sizes the rest of the model uses.
- `pretrained=None`: a randomly initialised BertModel built from `text_config` (tests,
  and the skeleton that a released PMC-CLIP checkpoint is loaded into, no download).

The pooler is kept because the released checkpoint contains it, but PMC-CLIP's text
feature is the last hidden state at [CLS], so the pooler never reaches a loss: it is
frozen so that DDP does not need find_unused_parameters=True.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import BertConfig, BertModel

PUBMEDBERT = "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract-fulltext"
# Sizes the rest of PMCClip is built from; a pretrained encoder must match them.
CHECKED_TEXT_CONFIG_KEYS = ("hidden_size", "vocab_size")


def build_text_encoder(
    text_config: dict[str, Any], context_length: int, pretrained: str | None = None
) -> BertModel:
    if pretrained is None:
        encoder = BertModel(BertConfig(**text_config), add_pooling_layer=True)
    else:
        if pretrained.startswith((".", "/", "~")) and not os.path.isdir(
            os.path.expanduser(pretrained)
        ):
            raise ValueError(f"text encoder directory {pretrained!r} does not exist")
        encoder = BertModel.from_pretrained(os.path.expanduser(pretrained))
        expected = BertConfig(**text_config)
        for key in CHECKED_TEXT_CONFIG_KEYS:
            if getattr(encoder.config, key) != getattr(expected, key):
                raise ValueError(
                    f"pretrained text encoder {pretrained!r} has {key}="
                    f"{getattr(encoder.config, key)} but the model config's text_config says "
                    f"{getattr(expected, key)}; use a model config matching this encoder"
                )
    if encoder.config.max_position_embeddings < context_length:
        raise ValueError(
            f"text encoder has {encoder.config.max_position_embeddings} positions, fewer than "
            f"context_length={context_length}"
        )
    assert encoder.pooler is not None
    encoder.pooler.requires_grad_(False)
    return encoder
