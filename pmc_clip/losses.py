"""Contrastive (CLIP) loss across ranks, MLM loss, and their weighted sum.

Distributed semantics (what DDP's gradient averaging turns into the right gradient):
- Features are all-gathered *with* gradient: the backward of the gather sums, over ranks,
  the gradient every rank computed for this rank's slice (a reduce-scatter; on backends
  without reduce-scatter, an all-reduce followed by taking the slice).
- `local_loss=True`: each rank builds only its B x (B * world) logits (its rows against
  all columns, labels offset by rank * B): memory O(B * B * world) per rank instead of
  O((B * world)^2). The per-rank loss is the mean over local rows, so the mean of the
  per-rank losses is the global loss, and DDP's average of gradients is its gradient.
- `local_loss=False`: every rank builds the full (B * world)^2 logits and the same global
  loss; the gather's summed backward multiplies by world, DDP's average divides it back.
- The combination "local loss, gather without gradient" (OpenCLIP's default pitfall,
  issue #616) gives a wrong gradient, so a gather without gradient is not offered.
- MLM: the per-rank loss is sum(local CE) * world / (masked tokens on all ranks), so that,
  averaged over ranks, it is the mean over every masked token of the global batch.
All ranks must use the same per-rank batch size (the data pipeline guarantees it).

Rank, world size and process group are passed in; nothing reads global state. The logged
value of a per-rank loss is the global loss only after an all-reduce mean.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pmc_clip.config import LossConfig
from pmc_clip.tokenize import IGNORE_INDEX


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, features: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        world_size = dist.get_world_size(group)
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.batch_size = features.shape[0]
        gathered = [torch.empty_like(features) for _ in range(world_size)]
        dist.all_gather(gathered, features.contiguous(), group=group)
        return torch.cat(gathered)

    @staticmethod
    def backward(ctx: Any, grad_gathered: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad_gathered = grad_gathered.contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            # Each rank receives only the sum of its own slice: 1/world of an all-reduce's bytes.
            grad = grad_gathered.new_empty(ctx.batch_size, *grad_gathered.shape[1:])
            dist.reduce_scatter_tensor(grad, grad_gathered, group=ctx.group)
            return grad, None
        # gloo (CPU tests) has no reduce-scatter: all-reduce, then keep this rank's slice.
        dist.all_reduce(grad_gathered, group=ctx.group)
        start = ctx.rank * ctx.batch_size
        return grad_gathered[start : start + ctx.batch_size].clone(), None


def gather_features(features: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """All-gather [B, D] -> [B * world, D] in rank order, differentiable (see module doc).

    group=None means torch.distributed's default group.
    """
    result = _AllGatherWithGrad.apply(features, group)
    assert isinstance(result, torch.Tensor)
    return result


class ClipLoss:
    """Symmetric InfoNCE over image/text features, optionally across ranks."""

    def __init__(
        self,
        *,
        rank: int = 0,
        world_size: int = 1,
        local_loss: bool = True,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}"
            )
        if world_size > 1:
            if not dist.is_available() or not dist.is_initialized():
                raise ValueError(
                    f"world_size={world_size} needs torch.distributed initialised "
                    "(init_process_group) before the loss is built"
                )
            if dist.get_world_size(group) != world_size or dist.get_rank(group) != rank:
                raise ValueError(
                    f"rank/world_size ({rank}/{world_size}) disagree with the process group "
                    f"({dist.get_rank(group)}/{dist.get_world_size(group)})"
                )
        self.rank = rank
        self.world_size = world_size
        self.local_loss = local_loss
        self.group = group

    def logits(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits_per_image, logits_per_text, labels) for this rank's rows."""
        batch_size = image_features.shape[0]
        # Logits in fp32 even under autocast: bf16 softmax over thousands of columns loses
        # the small differences the contrastive loss learns from.
        with torch.autocast(device_type=image_features.device.type, enabled=False):
            image_features = image_features.float()
            text_features = text_features.float()
            logit_scale = logit_scale.float()
            if self.world_size == 1:
                logits_per_image = logit_scale * image_features @ text_features.T
                logits_per_text = logits_per_image.T
                labels = torch.arange(batch_size, device=image_features.device)
                return logits_per_image, logits_per_text, labels
            all_image_features = gather_features(image_features, self.group)
            all_text_features = gather_features(text_features, self.group)
            if self.local_loss:
                logits_per_image = logit_scale * image_features @ all_text_features.T
                logits_per_text = logit_scale * text_features @ all_image_features.T
                labels = torch.arange(batch_size, device=image_features.device)
                labels = labels + self.rank * batch_size
            else:
                logits_per_image = logit_scale * all_image_features @ all_text_features.T
                logits_per_text = logits_per_image.T
                labels = torch.arange(batch_size * self.world_size, device=image_features.device)
        return logits_per_image, logits_per_text, labels

    def __call__(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        logits_per_image, logits_per_text, labels = self.logits(
            image_features, text_features, logit_scale
        )
        return (
            F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)
        ) / 2


def mlm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    world_size: int = 1,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Cross entropy over masked positions (labels != -100), normalised globally.

    logits [..., V], labels [...]. With world_size > 1 the number of masked tokens is
    all-reduced (one scalar, no host sync) so ranks with more masked tokens weigh more.
    """
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    num_masked = (labels != IGNORE_INDEX).sum()
    if world_size > 1:
        dist.all_reduce(num_masked, group=group)
    # A batch without masked tokens contributes 0 (still a graph, so DDP sees every grad).
    return per_token * world_size / num_masked.clamp(min=1)


class PMCClipLoss:
    """total = clip_weight * contrastive + mlm_weight * MLM (MLM only when logits given).

    clip_loss: the contrastive loss with its rank, world size and group (the MLM loss
    normalises over the same ranks); default: single process.
    """

    def __init__(
        self,
        clip_loss: ClipLoss | None = None,
        *,
        clip_weight: float = LossConfig.clip_weight,
        mlm_weight: float = LossConfig.mlm_weight,
    ) -> None:
        if clip_weight < 0 or mlm_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got {clip_weight}, {mlm_weight}")
        self.clip_loss = clip_loss or ClipLoss()
        self.clip_weight = clip_weight
        self.mlm_weight = mlm_weight

    def __call__(
        self, outputs: dict[str, torch.Tensor], mlm_labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """outputs: PMCClip.forward's dict. Returns loss, contrastive_loss[, mlm_loss]."""
        contrastive = self.clip_loss(
            outputs["image_features"], outputs["text_features"], outputs["logit_scale"]
        )
        losses = {"contrastive_loss": contrastive}
        has_logits = "mlm_logits" in outputs
        if has_logits != (mlm_labels is not None):
            raise ValueError(
                "MLM logits and mlm_labels come together: pass mlm_input_ids to the model "
                "and mlm_labels to the loss, or neither"
            )
        total = self.clip_weight * contrastive
        if mlm_labels is not None:
            masked_lm = mlm_loss(
                outputs["mlm_logits"],
                mlm_labels,
                self.clip_loss.world_size,
                self.clip_loss.group,
            )
            losses["mlm_loss"] = masked_lm
            total = total + self.mlm_weight * masked_lm
        losses["loss"] = total
        return losses
