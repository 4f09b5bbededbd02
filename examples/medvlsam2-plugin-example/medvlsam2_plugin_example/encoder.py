"""A small 3D CNN encoder: four strided conv blocks, tokens = the last feature map."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medvlsam2.core.encoder import EncoderOutput, VolumeEncoder


@dataclass
class SimpleCNN3DConfig:
    in_channels: int = 1
    widths: tuple[int, ...] = (16, 32, 64, 128)
    pretrained: str | None = None


class SimpleCNN3DEncoder(VolumeEncoder):
    """Strided 3D convolutions (stride 2 per block); input sides must divide by 2**blocks."""

    config_class = SimpleCNN3DConfig

    def __init__(self, cfg: SimpleCNN3DConfig) -> None:
        super().__init__()
        self.in_channels = cfg.in_channels
        self.out_dim = cfg.widths[-1]
        factor = 2 ** len(cfg.widths)
        self.divisible_by = (factor, factor, factor)
        blocks, channels = [], cfg.in_channels
        for width in cfg.widths:
            blocks.append(
                nn.Sequential(
                    nn.Conv3d(channels, width, 3, stride=2, padding=1),
                    nn.InstanceNorm3d(width, affine=True),
                    nn.GELU(),
                )
            )
            channels = width
        self.blocks = nn.ModuleList(blocks)
        if cfg.pretrained:
            print(self.load_pretrained(cfg.pretrained))

    def forward(self, volume: torch.Tensor) -> EncoderOutput:
        self.check_input(volume)
        features, x = [], volume
        for block in self.blocks:
            x = block(x)
            features.append(x)
        grid = tuple(x.shape[2:])
        tokens = x.flatten(2).transpose(1, 2)
        return EncoderOutput(tokens=tokens, grid=grid, features=features)
