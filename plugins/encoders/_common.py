"""Shared machinery of the encoder plugins: load reports, and the per-slice wrapper.

A per-slice encoder applies a 2D backbone to the D slices of a volume.
The slices of a batch are encoded together as one ``(B*D, C, H, W)`` batch (optionally in
chunks to bound memory), the last feature map becomes the tokens, and a depth position
encoding tells the tokens of different slices apart, which a 2D backbone cannot do.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medvlsam2.core.encoder import EncoderOutput, LoadReport, VolumeEncoder
from medvlsam2.core.errors import ConfigError, InputError

DEPTH_POS = ("sinusoidal", "learned", "none")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
log = logging.getLogger("medvlsam2")


def announce(name: str, report: LoadReport) -> LoadReport:
    """Log a weight load; warn (never stay silent) when tensors were missing or unexpected."""
    if report.missing or report.unexpected:
        warnings.warn(
            f"{name}: {report}; missing e.g. {report.missing[:3]}, unexpected e.g. {report.unexpected[:3]}",
            stacklevel=2,
        )
    else:
        log.info("%s: %s", name, report)
    return report


@dataclass
class SliceOptions:
    """Options every per-slice encoder shares (its config dataclass inherits them)."""

    in_channels: int = 1
    depth_pos: str = "sinusoidal"  # sinusoidal | learned | none
    max_depth: int = 512  # table size of the learned depth encoding
    depth_pool: int = 1  # average this many consecutive slices into one token slab
    token_pool: int = 1  # average-pool each slice's token map by this factor
    slice_chunk: int = 0  # encode at most this many slices at once (0: all)


def sinusoid(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sinusoids ``(len(positions), dim)`` for integer positions."""
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / max(half, 1))
    angles = positions.float()[:, None] * freq[None]
    table = torch.cat([angles.sin(), angles.cos()], dim=1)
    return F.pad(table, (0, dim - table.shape[1]))


class ChannelAdapter(nn.Module):
    """Maps the volume's channels onto the backbone's: repeat one channel, else a learned 1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.proj: nn.Conv2d | None = None
        if in_channels not in (1, out_channels):
            self.proj = nn.Conv2d(in_channels, out_channels, 1, bias=False)
            nn.init.constant_(self.proj.weight, 1.0 / in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.proj is not None:
            return self.proj(x)
        if self.in_channels == 1 and self.out_channels != 1:
            return x.expand(-1, self.out_channels, -1, -1)
        return x


class SliceEncoder(VolumeEncoder):
    """A ``VolumeEncoder`` built from a 2D backbone; subclasses implement ``encode_slices``."""

    def setup_slices(self, opts: SliceOptions, token_dim: int, hw_multiple: int = 1) -> None:
        """Validate the shared options and create the depth encoding for ``token_dim`` tokens.

        ``hw_multiple`` is what the backbone needs of H and W; D must be a multiple of ``depth_pool``.
        """
        if opts.depth_pos not in DEPTH_POS:
            raise ConfigError(f"depth_pos must be one of {', '.join(DEPTH_POS)}, got '{opts.depth_pos}'")
        for key in ("depth_pool", "token_pool", "in_channels", "max_depth"):
            if getattr(opts, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(opts, key)}")
        if opts.slice_chunk < 0:
            raise ConfigError(f"slice_chunk must be >= 0, got {opts.slice_chunk}")
        self.opts = opts
        self.out_dim = token_dim
        self.in_channels = opts.in_channels
        self.divisible_by = (opts.depth_pool, hw_multiple, hw_multiple)
        self.depth_table: nn.Parameter | None = None
        self.depth_gain: nn.Parameter | None = None
        if opts.depth_pos == "learned":
            # Zero at start: pretrained slice features are untouched until depth is learned.
            self.depth_table = nn.Parameter(torch.zeros(opts.max_depth, token_dim))
        elif opts.depth_pos == "sinusoidal":
            self.depth_gain = nn.Parameter(torch.ones(()))

    def train(self, mode: bool = True) -> SliceEncoder:
        """Frozen BatchNorm layers stay in eval mode, so a frozen pretrained backbone cannot drift."""
        super().train(mode)
        if mode:
            for module in self.modules():
                frozen = not any(p.requires_grad for p in module.parameters(recurse=False))
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and frozen:
                    module.eval()
        return self

    def encode_slices(self, slices: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover
        """``(N, C, H, W)`` -> feature maps ``(N, C_i, h_i, w_i)``, token map last."""
        raise NotImplementedError

    def _depth_encoding(self, depth: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        if self.depth_table is not None:
            if depth > self.opts.max_depth:
                raise InputError(
                    f"{type(self).__name__}: {depth} slab(s) exceed max_depth={self.opts.max_depth} "
                    "of the learned depth encoding"
                )
            return self.depth_table[:depth].to(dtype)
        if self.depth_gain is not None:
            table = sinusoid(torch.arange(depth), self.out_dim).to(device=device, dtype=dtype)
            return self.depth_gain.to(dtype) * table
        return None

    def forward(self, volume: torch.Tensor) -> EncoderOutput:
        self.check_input(volume)
        b, c, d, h, w = volume.shape
        slices = volume.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w)
        chunk = self.opts.slice_chunk or len(slices)
        parts = [self.encode_slices(slices[i : i + chunk]) for i in range(0, len(slices), chunk)]
        maps = [torch.cat([p[level] for p in parts]) for level in range(len(parts[0]))]
        features = [m.reshape(b, d, *m.shape[1:]).transpose(1, 2) for m in maps]  # (B, C_i, D, h, w)
        tokens = maps[-1]
        if self.opts.token_pool > 1:
            tokens = F.avg_pool2d(tokens, self.opts.token_pool, ceil_mode=True)
        tokens = tokens.reshape(b, d, *tokens.shape[1:])  # (B, D, C, h, w)
        if self.opts.depth_pool > 1:
            k = self.opts.depth_pool
            tokens = tokens.reshape(b, d // k, k, *tokens.shape[2:]).mean(2)
        dd, ch, hh, ww = tokens.shape[1:]
        tokens = tokens.permute(0, 1, 3, 4, 2)  # (B, d, h, w, C)
        depth_pe = self._depth_encoding(dd, tokens.device, tokens.dtype)
        if depth_pe is not None:
            tokens = tokens + depth_pe[None, :, None, None, :]
        return EncoderOutput(tokens.reshape(b, dd * hh * ww, ch), (dd, hh, ww), features)


def resize_slices(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Bilinear resize of ``(N, C, H, W)`` slices to ``size`` x ``size`` (no-op when equal or None)."""
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def imagenet_normalize(x: torch.Tensor) -> torch.Tensor:
    """``[0, 1]`` RGB -> ImageNet mean/std, the statistics SAM2 and timm backbones were trained on."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype)[None, :, None, None]
    return (x - mean) / std
