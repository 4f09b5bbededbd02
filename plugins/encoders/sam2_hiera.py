"""SAM2's image encoder (Hiera trunk + FPN neck) applied per slice, as SAM2 treats video frames.

Built from the ``sam2`` package's own configs through ``plugins/decoders/sam2_build.py``
(Hydra isolated, CPU), so the encoder is the very module the SAM2 decoder uses and a SAM2 /
SAM2.1 / MedSAM2 checkpoint loads into both with the same keys (``image_encoder.*``).
Tokens are the neck's stride-16 ``vision_features`` (256-d); ``features`` holds the FPN levels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from medvlsam2.core.encoder import LoadReport
from medvlsam2.core.errors import ConfigError
from medvlsam2.plugins.encoders._common import (
    ChannelAdapter,
    SliceEncoder,
    SliceOptions,
    announce,
    imagenet_normalize,
    resize_slices,
)

PREFIX = "image_encoder."


@dataclass
class SAM2HieraConfig(SliceOptions):
    config: str = "sam2.1_hiera_t"  # any config shipped in the sam2 package (t, s, b+, l)
    image_size: int | None = 1024  # slices are resized to this; None: use H, W (multiples of 32)
    normalize: bool = True  # ImageNet mean/std on [0, 1] inputs, as SAM2 was trained
    pretrained: str | None = None  # local SAM2 / SAM2.1 / MedSAM2 checkpoint


class SAM2HieraEncoder(SliceEncoder):
    """Per-slice SAM2 image encoder; 1-channel volumes are repeated to SAM2's RGB input."""

    config_class = SAM2HieraConfig

    def __init__(self, cfg: SAM2HieraConfig) -> None:
        super().__init__()
        from medvlsam2.plugins.decoders.sam2_build import build_sam2_model

        if cfg.image_size is not None and cfg.image_size % 32:
            raise ConfigError(f"sam2_hiera: image_size must be a multiple of 32, got {cfg.image_size}")
        self.cfg = cfg
        sam2, _ = build_sam2_model(cfg.config, image_size=cfg.image_size or 1024)
        self.image_encoder = sam2.image_encoder
        del sam2
        self.adapter = ChannelAdapter(cfg.in_channels, 3)
        self.setup_slices(cfg, self.image_encoder.neck.d_model, hw_multiple=1 if cfg.image_size else 32)
        if cfg.pretrained:
            announce(f"sam2_hiera({cfg.config})", self.load_pretrained(cfg.pretrained))

    def encode_slices(self, slices: torch.Tensor) -> list[torch.Tensor]:
        x = resize_slices(self.adapter(slices), self.cfg.image_size)
        if self.cfg.normalize:
            x = imagenet_normalize(x)
        return list(self.image_encoder(x)["backbone_fpn"])

    def load_pretrained(self, path: str | Path) -> LoadReport:
        """The ``image_encoder.*`` tensors of a SAM2 checkpoint (the rest belongs to the decoder)."""
        from medvlsam2.core.weights import read_state_dict

        state = read_state_dict(path)
        if any(k.startswith(PREFIX) for k in state):
            state = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
        own = self.image_encoder.state_dict()
        mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        usable = {k: v for k, v in state.items() if k not in mismatched}
        result = self.image_encoder.load_state_dict(usable, strict=False)
        return LoadReport(
            str(path),
            len(usable) - len(result.unexpected_keys),
            list(result.missing_keys),
            list(result.unexpected_keys) + [f"{k} (shape)" for k in mismatched],
        )
