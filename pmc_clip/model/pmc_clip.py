"""PMCClip: ModifiedResNet image tower, BERT text tower, fusion transformer, MLM head.

Forward (training):
    image_features = normalize(visual(images))                              [B, E]
    text_features  = normalize(BERT(input_ids)[:, 0] @ text_projection)     [B, E]
    mlm_logits     = fusion([BERT(mlm_input_ids), img_special_token,
                             image_features])[:, :L] @ mlm_projection       [B, L, V]
(mlm_logits are raw scores; the original returned their log-softmax and used nll_loss,
which equals cross_entropy on the raw scores.)

Which caption feeds the contrastive text feature when MLM is on: the original PMC-CLIP
encoded only the *masked* caption and used its [CLS] state both for the contrastive loss
and (through the fusion module) for MLM, so contrastive training saw corrupted captions
that evaluation never shows. By default (`contrastive_text="unmasked"`) the contrastive
feature comes from the unmasked caption and the masked caption feeds only the MLM head;
both captions go through BERT in one batched call (2B rows). `contrastive_text="masked"`
reproduces the original (one BERT pass of B rows, cheaper, different objective).

Other original-vs-corrected switches (see config.py): `mask_padding` (the original passed
no attention mask, so BERT and the fusion attended to [PAD]) and `attnpool_heads`.

Parameters saved by the original but never used in its forward (`positional_embedding`,
`ln_final`, and BERT's pooler) are kept only so the released checkpoint loads. They are
frozen (requires_grad=False), so DDP ignores them and needs no find_unused_parameters, and
an optimizer built from trainable parameters skips them.

This module never touches torch.distributed: the losses gather across ranks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pmc_clip.model.config import ModelConfig
from pmc_clip.model.fusion import FusionTransformer
from pmc_clip.model.image import build_image_encoder
from pmc_clip.model.text import build_text_encoder

INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100)  # CLIP's cap on the temperature (exp = 100)
CLS_POSITION = 0  # BERT puts [CLS] first; its last hidden state is the text feature


class PMCClip(nn.Module):
    def __init__(self, config: ModelConfig, text_encoder: str | None = None) -> None:
        """Build from `config`; `text_encoder` (hub id or local dir) loads pretrained BERT."""
        super().__init__()
        self.config = config
        text_width = int(config.text_config["hidden_size"])
        vocab_size = int(config.text_config["vocab_size"])

        self.visual = build_image_encoder(config)
        self.text_encoder = build_text_encoder(
            config.text_config, config.context_length, pretrained=text_encoder
        )
        self.text_projection = nn.Parameter(torch.empty(text_width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))
        # Unused by the forward; kept frozen for checkpoint compatibility (see docstring).
        self.positional_embedding = nn.Parameter(
            torch.zeros(config.context_length, text_width), requires_grad=False
        )
        self.ln_final = nn.LayerNorm(text_width)
        self.ln_final.requires_grad_(False)

        self.fusion_module: FusionTransformer | None = None
        self.mlm_projection: nn.Parameter | None = None
        self.img_special_token: nn.Parameter | None = None
        if config.mlm:
            self.img_special_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
            self.fusion_module = FusionTransformer(
                text_width, config.fusion_layers, config.fusion_heads, config.fusion_mlp_ratio
            )
            self.mlm_projection = nn.Parameter(torch.empty(text_width, vocab_size))
        self.init_parameters(text_width)

    def init_parameters(self, text_width: int) -> None:
        nn.init.normal_(self.text_projection, std=text_width**-0.5)
        if self.mlm_projection is not None:
            nn.init.normal_(self.mlm_projection, std=text_width**-0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute BERT and fusion blocks in backward (trades compute for activations)."""
        # transformers 5 renamed gradient_checkpointing_* (deprecated there, gone in 6);
        # setup.cfg still allows transformers 4.
        encoder = self.text_encoder
        if enable and hasattr(encoder, "activation_checkpointing_enable"):
            encoder.activation_checkpointing_enable({"use_reentrant": False})
        elif enable:
            encoder.gradient_checkpointing_enable({"use_reentrant": False})
        elif hasattr(encoder, "activation_checkpointing_disable"):
            encoder.activation_checkpointing_disable()
        else:
            encoder.gradient_checkpointing_disable()
        if self.fusion_module is not None:
            self.fusion_module.grad_checkpointing = enable

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised image features [B, embed_dim]."""
        return self.visual(images)

    def _text_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask if self.config.mask_padding else None
        return self.text_encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state

    def _project_text(self, text_states: torch.Tensor) -> torch.Tensor:
        return text_states[:, CLS_POSITION] @ self.text_projection

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unnormalised text features [B, embed_dim] from the [CLS] state."""
        return self._project_text(self._text_states(input_ids, attention_mask))

    def mlm_logits(
        self,
        text_states: torch.Tensor,
        attention_mask: torch.Tensor,
        image_features: torch.Tensor,
    ) -> torch.Tensor:
        """MLM logits [B, L, vocab] from the fusion of text states with the image feature."""
        assert self.fusion_module is not None and self.mlm_projection is not None
        assert self.img_special_token is not None
        batch_size = text_states.shape[0]
        fusion_input = torch.cat(
            [
                text_states,
                self.img_special_token.expand(batch_size, -1, -1).to(text_states.dtype),
                image_features.unsqueeze(1).to(text_states.dtype),
            ],
            dim=1,
        )
        key_padding_mask = None
        if self.config.mask_padding:
            image_slots = attention_mask.new_ones(batch_size, 2)
            key_padding_mask = torch.cat([attention_mask, image_slots], dim=1) == 0
        fused = self.fusion_module(fusion_input, key_padding_mask)
        return fused[:, : text_states.shape[1]] @ self.mlm_projection

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mlm_input_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        image_features = F.normalize(self.encode_image(images), dim=-1)
        outputs = {
            "image_features": image_features,
            # Clamped in the forward (not in-place after the step) so the module is the
            # single place that enforces CLIP's temperature cap.
            "logit_scale": self.logit_scale.clamp(0, MAX_LOGIT_SCALE).exp(),
        }
        if mlm_input_ids is None:
            outputs["text_features"] = F.normalize(
                self.encode_text(input_ids, attention_mask), dim=-1
            )
            return outputs
        if not self.config.mlm:
            raise ValueError("mlm_input_ids given but this model was built with mlm=false")

        if self.config.contrastive_text == "masked":
            mlm_states = self._text_states(mlm_input_ids, attention_mask)
            text_features = self._project_text(mlm_states)
        else:
            # One BERT call over [unmasked; masked] keeps the GPU busy with 2B rows instead
            # of two half-size launches; results are identical to two separate calls.
            both_states = self._text_states(
                torch.cat([input_ids, mlm_input_ids]), torch.cat([attention_mask, attention_mask])
            )
            clean_states, mlm_states = both_states.chunk(2)
            text_features = self._project_text(clean_states)
        outputs["text_features"] = F.normalize(text_features, dim=-1)
        outputs["mlm_logits"] = self.mlm_logits(mlm_states, attention_mask, image_features)
        return outputs
