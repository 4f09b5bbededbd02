"""A 3D ViT (MONAI ``ViT``) with 3D patches, laid out so M3D-CLIP vision weights load as they are.

M3D-CLIP / M3D-LaMed build MONAI's ``ViT`` with ``pos_embed="perceptron"``, a class token,
img 32x256x256 and patch 4x16x16. Their keys (``vision_encoder.blocks.0.attn.qkv.weight`` ...)
map onto ours (``vit.blocks.0.attn.qkv.weight``) by replacing the prefix; see docs/models.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medvlsam2.core.encoder import EncoderOutput, LoadReport, VolumeEncoder
from medvlsam2.core.errors import ConfigError, InputError
from medvlsam2.plugins.encoders._common import announce

#: Prefixes under which published checkpoints keep the vision tower (M3D-CLIP, M3D-LaMed).
KNOWN_PREFIXES = (
    "vision_encoder.",
    "model.vision_tower.vision_tower.",
    "vision_tower.vision_tower.",
    "vision_tower.",
    "vit.",
)
#: Parameters MONAI creates but never uses without cross-attention (absent from M3D checkpoints).
UNUSED_KEYS = ("norm_cross_attn",)


@dataclass
class ViT3DConfig:
    in_channels: int = 1
    img_size: list[int] = field(default_factory=lambda: [32, 256, 256])
    patch_size: list[int] = field(default_factory=lambda: [4, 16, 16])
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    proj_type: str = "perceptron"  # M3D uses "perceptron"; MONAI's default is "conv"
    cls_token: bool = True  # M3D's tower has one; it is dropped from the output tokens
    dropout: float = 0.0
    qkv_bias: bool = False
    interpolate_pos: bool = True  # other volume sizes: resample the position grid trilinearly
    pretrained: str | None = None


class ViT3DEncoder(VolumeEncoder):
    """MONAI 3D ViT; tokens are the final-norm patch embeddings in (d, h, w) raster order."""

    config_class = ViT3DConfig

    def __init__(self, cfg: ViT3DConfig) -> None:
        super().__init__()
        from monai.networks.nets import ViT

        if len(cfg.img_size) != 3 or len(cfg.patch_size) != 3:
            raise ConfigError("vit3d: img_size and patch_size need three entries (D, H, W)")
        bad = [f"{i}/{p}" for i, p in zip(cfg.img_size, cfg.patch_size) if i % p]
        if bad:
            raise ConfigError(f"vit3d: img_size must be a multiple of patch_size, got {', '.join(bad)}")
        self.cfg = cfg
        self.vit = ViT(
            in_channels=cfg.in_channels,
            img_size=tuple(cfg.img_size),
            patch_size=tuple(cfg.patch_size),
            hidden_size=cfg.hidden_size,
            mlp_dim=cfg.mlp_dim,
            num_layers=cfg.num_layers,
            num_heads=cfg.num_heads,
            proj_type=cfg.proj_type,
            classification=False,
            dropout_rate=cfg.dropout,
            spatial_dims=3,
            qkv_bias=cfg.qkv_bias,
        )
        if cfg.cls_token:
            self.vit.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.out_dim = cfg.hidden_size
        self.in_channels = cfg.in_channels
        self.patch_size = tuple(cfg.patch_size)
        self.base_grid = tuple(i // p for i, p in zip(cfg.img_size, cfg.patch_size))
        self.divisible_by = self.patch_size if cfg.interpolate_pos else tuple(cfg.img_size)
        if cfg.pretrained:
            announce("vit3d", self.load_pretrained(cfg.pretrained))

    def check_input(self, volume: torch.Tensor) -> None:
        super().check_input(volume)
        if not self.cfg.interpolate_pos and tuple(volume.shape[2:]) != tuple(self.cfg.img_size):
            raise InputError(
                f"ViT3DEncoder: volume size {tuple(volume.shape[2:])} differs from img_size "
                f"{tuple(self.cfg.img_size)} and interpolate_pos is false"
            )

    def _pos_embed(self, grid: tuple[int, int, int]) -> torch.Tensor:
        pos = self.vit.patch_embedding.position_embeddings  # (1, N, C)
        if grid == self.base_grid:
            return pos
        return resample_pos(pos, self.base_grid, grid)

    def forward(self, volume: torch.Tensor) -> EncoderOutput:
        self.check_input(volume)
        grid = tuple(s // p for s, p in zip(volume.shape[2:], self.patch_size))
        pe = self.vit.patch_embedding
        x = pe.patch_embeddings(volume)
        if pe.proj_type == "conv":
            x = x.flatten(2).transpose(-1, -2)
        x = pe.dropout(x + self._pos_embed(grid))
        if self.cfg.cls_token:
            x = torch.cat([self.vit.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for block in self.vit.blocks:
            x = block(x)
        x = self.vit.norm(x)
        tokens = x[:, 1:] if self.cfg.cls_token else x
        return EncoderOutput(tokens, grid, [])

    def load_pretrained(self, path: str | Path) -> LoadReport:
        """Load M3D-CLIP / M3D-LaMed / our own weights; the position grid is resampled if needed."""
        from medvlsam2.core.weights import read_state_dict

        state = read_state_dict(path)
        prefix = next((p for p in KNOWN_PREFIXES if any(k.startswith(p) for k in state)), "")
        if prefix:
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        key = "patch_embedding.position_embeddings"
        ours = self.vit.patch_embedding.position_embeddings
        if key in state and state[key].shape != ours.shape:
            src_grid = _grid_for(state[key].shape[1], self.base_grid)
            state[key] = resample_pos(state[key], src_grid, self.base_grid)
        result = self.vit.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not any(u in k for u in UNUSED_KEYS)]
        return LoadReport(str(path), len(state) - len(result.unexpected_keys), missing, list(result.unexpected_keys))


def resample_pos(pos: torch.Tensor, src: tuple[int, ...], dst: tuple[int, ...]) -> torch.Tensor:
    """Trilinear resampling of a ``(1, d*h*w, C)`` position table from grid ``src`` to ``dst``."""
    c = pos.shape[-1]
    grid = pos.reshape(1, *src, c).permute(0, 4, 1, 2, 3)
    grid = F.interpolate(grid, size=tuple(dst), mode="trilinear", align_corners=False)
    return grid.permute(0, 2, 3, 4, 1).reshape(1, -1, c)


def _grid_for(n: int, like: tuple[int, int, int]) -> tuple[int, int, int]:
    """The source grid of a checkpoint's position table: M3D's 8x16x16, else same aspect as ours."""
    for grid in ((8, 16, 16), like):
        if grid[0] * grid[1] * grid[2] == n:
            return grid
    raise InputError(f"vit3d: cannot infer the patch grid of a position table with {n} entries")
