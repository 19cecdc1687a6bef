"""Fusion transformer (text states + image feature) and the MLM projection.

Pre-LN blocks with `nn.MultiheadAttention`, named as in PMC-CLIP (`resblocks.N.attn`,
`ln_1`, `mlp.c_fc`, `mlp.c_proj`, `ln_2`) so the released weights load. Tensors are
batch-first; parameter shapes do not depend on that.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class MLP(nn.Module):
    def __init__(self, width: int, hidden_width: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden_width)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(hidden_width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"fusion width {width} is not divisible by {num_heads} heads")
        self.attn = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        normed = self.ln_1(x)
        attended = self.attn(
            normed, normed, normed, key_padding_mask=key_padding_mask, need_weights=False
        )[0]
        x = x + attended
        return x + self.mlp(self.ln_2(x))


class FusionTransformer(nn.Module):
    def __init__(self, width: int, num_layers: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, num_heads, mlp_ratio) for _ in range(num_layers)
        )
        self.init_parameters(width, num_layers)

    def init_parameters(self, width: int, num_layers: int) -> None:
        # CLIP's transformer init: residual-branch outputs scaled down with depth.
        attn_std = width**-0.5
        proj_std = width**-0.5 * (2 * num_layers) ** -0.5
        fc_std = (2 * width) ** -0.5
        for block in self.resblocks:
            assert isinstance(block, ResidualAttentionBlock)
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """x: [B, L, width]; key_padding_mask: [B, L] bool, True = ignore, or None."""
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                # Recompute the block in backward: activations of only the block inputs stay.
                x = checkpoint(block, x, key_padding_mask, use_reentrant=False)
            else:
                x = block(x, key_padding_mask)
        return x
