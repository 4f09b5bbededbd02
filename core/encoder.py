"""The volume-encoder contract: ``(B, C, D, H, W)`` volume in, tokens ``(B, N, C_out)`` out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from medvlsam2.core.errors import InputError


@dataclass
class EncoderOutput:
    """Tokens in raster order of ``grid`` (depth-major), plus optional feature maps.

    ``features`` holds feature maps ``(B, C_i, d_i, h_i, w_i)`` for decoders that want them
    (e.g. a U-Net style baseline decoder), coarsest last.
    """

    tokens: torch.Tensor
    grid: tuple[int, int, int]
    features: list[torch.Tensor] = field(default_factory=list)


@dataclass
class LoadReport:
    """What a pretrained-weight load matched; printed so nothing is silently dropped."""

    path: str
    loaded: int
    missing: list[str]
    unexpected: list[str]

    def __str__(self) -> str:
        return (
            f"loaded {self.loaded} tensors from {self.path}; "
            f"missing {len(self.missing)}, unexpected {len(self.unexpected)}"
        )


class VolumeEncoder(nn.Module):
    """Base class of encoder plugins.

    Subclasses set ``out_dim`` and ``in_channels`` in ``__init__`` and may set
    ``divisible_by`` (the ``(D, H, W)`` multiples the input must have) and ``max_size``.
    """

    config_class: ClassVar[type | None] = None
    out_dim: int
    in_channels: int = 1
    divisible_by: tuple[int, int, int] = (1, 1, 1)

    def check_input(self, volume: torch.Tensor) -> None:
        """Raise ``InputError`` naming the problem when ``volume`` cannot be encoded."""
        name = type(self).__name__
        if volume.ndim != 5:
            raise InputError(
                f"{name}: expected a volume of shape (B, C, D, H, W), got {tuple(volume.shape)}"
            )
        if volume.shape[1] != self.in_channels:
            raise InputError(
                f"{name}: expected {self.in_channels} channel(s), got {volume.shape[1]} "
                f"(volume shape {tuple(volume.shape)})"
            )
        bad = [
            f"{axis}={size} (multiple of {m})"
            for axis, size, m in zip("DHW", volume.shape[2:], self.divisible_by)
            if size % m
        ]
        if bad:
            raise InputError(f"{name}: volume size not accepted: {', '.join(bad)}")

    def load_pretrained(self, path: str | Path) -> LoadReport:
        """Load a local state dict (safetensors or ``torch.load(weights_only=True)``)."""
        from medvlsam2.core.weights import load_state_dict_into

        return load_state_dict_into(self, path)
