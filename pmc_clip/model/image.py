"""CLIP's ModifiedResNet image tower with attention pooling.

Layout (and therefore state_dict keys) follows OpenAI CLIP / PMC-CLIP so the released
weights load: a 3-conv stem with an average pool, anti-aliased strided bottlenecks (an
avgpool before every stride-2 conv), and a QKV attention pool over the 7x7 grid plus a
mean token, projected to `output_dim`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pmc_clip.model.config import ModelConfig

BOTTLENECK_EXPANSION = 4
RESNET_DOWNSAMPLING = 32  # the stem and the three strided stages halve the grid 5 times


class Bottleneck(nn.Module):
    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * BOTTLENECK_EXPANSION
        # All convs have stride 1; a stride > 1 is an avgpool after conv2 (anti-aliasing).
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool: nn.Module = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample: nn.Sequential | None = None
        if stride > 1 or in_channels != out_channels:
            # Key names "-1", "0", "1" are CLIP's (the avgpool has no parameters).
            self.downsample = nn.Sequential()
            self.downsample.add_module("-1", nn.AvgPool2d(stride))
            self.downsample.add_module("0", nn.Conv2d(in_channels, out_channels, 1, bias=False))
            self.downsample.add_module("1", nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """Multi-head attention pooling: the mean token attends over itself and the grid.

    Only the mean token's output is used, so only its query is computed: one query
    instead of HW+1 (the same result as CLIP's full self-attention followed by x[0]).
    """

    def __init__(self, grid_size: int, embed_dim: int, num_heads: int, output_dim: int) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"attention-pool width {embed_dim} is not divisible by {num_heads}")
        self.grid_size = grid_size
        self.num_heads = num_heads
        self.positional_embedding = nn.Parameter(
            torch.randn(grid_size**2 + 1, embed_dim) / embed_dim**0.5
        )
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_size, channels, height, width = x.shape
        if (height, width) != (self.grid_size, self.grid_size):
            raise ValueError(
                f"feature grid {height}x{width} does not match the attention pool's "
                f"{self.grid_size}x{self.grid_size}: feed images of the configured image_size "
                f"({self.grid_size * RESNET_DOWNSAMPLING} px)"
            )
        tokens = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)  # [B, HW+1, C]
        tokens = tokens + self.positional_embedding.to(tokens.dtype)
        head_dim = channels // self.num_heads

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (self.num_heads, head_dim)).transpose(1, 2)  # [B, h, L, d]

        query = split_heads(self.q_proj(tokens[:, :1]))
        key = split_heads(self.k_proj(tokens))
        value = split_heads(self.v_proj(tokens))
        pooled = F.scaled_dot_product_attention(query, key, value)  # [B, h, 1, d]
        return self.c_proj(pooled.reshape(batch_size, channels))


class ModifiedResNet(nn.Module):
    def __init__(
        self,
        layers: tuple[int, int, int, int],
        output_dim: int,
        attnpool_heads: int,
        image_size: int = 224,
        width: int = 64,
    ) -> None:
        super().__init__()
        if image_size % RESNET_DOWNSAMPLING:
            raise ValueError(f"image_size must be a multiple of 32, got {image_size}")
        self.image_size = image_size
        self.output_dim = output_dim
        # 3-conv stem.
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)

        in_channels = width
        stages = []
        for stage_index, num_blocks in enumerate(layers):
            planes = width * 2**stage_index
            stride = 1 if stage_index == 0 else 2
            blocks = [Bottleneck(in_channels, planes, stride)]
            in_channels = planes * BOTTLENECK_EXPANSION
            blocks += [Bottleneck(in_channels, planes) for _ in range(1, num_blocks)]
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.attnpool = AttentionPool2d(
            image_size // RESNET_DOWNSAMPLING, in_channels, attnpool_heads, output_dim
        )
        self.init_parameters()

    def init_parameters(self) -> None:
        std = self.attnpool.c_proj.in_features**-0.5
        for proj in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj):
            nn.init.normal_(proj.weight, std=std)
        nn.init.normal_(self.attnpool.c_proj.weight, std=std)
        # Zero-init the last BN of each residual branch: every block starts as identity.
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for name, param in stage.named_parameters():
                if name.endswith("bn3.weight"):
                    nn.init.zeros_(param)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(images)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.avgpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)


def build_image_encoder(config: ModelConfig) -> ModifiedResNet:
    """The image tower of a PMC-CLIP of `config` (PMCClip.visual, and the exported tower)."""
    return ModifiedResNet(
        layers=config.vision_layers,
        output_dim=config.embed_dim,
        attnpool_heads=config.num_attnpool_heads,
        image_size=config.image_size,
        width=config.vision_width,
    )
