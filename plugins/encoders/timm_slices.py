"""Any ``timm`` 2D backbone applied slice by slice, so every timm model can be benchmarked in 3D.

The backbone is built with ``features_only=True`` (feature maps of any CNN or ViT family) and
``in_chans`` set to the volume's channels. Pretrained weights come from a local file only and
go through timm's own loader, which adapts the first convolution to ``in_chans`` and applies
the model's checkpoint filter, so a stock timm/ImageNet checkpoint loads as published.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medvlsam2.core.encoder import LoadReport
from medvlsam2.core.errors import ConfigError
from medvlsam2.plugins.encoders._common import (
    SliceEncoder,
    SliceOptions,
    announce,
    imagenet_normalize,
    resize_slices,
)


@dataclass
class TimmSliceConfig(SliceOptions):
    model_name: str = "resnet18"
    out_indices: list[int] = field(default_factory=lambda: [-1])  # feature levels; tokens = last
    image_size: int | None = None  # resize slices to this square size (None: keep H, W)
    normalize: bool = False  # ImageNet mean/std for inputs in [0, 1] (for ImageNet weights)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {img_size: 64} for ViTs
    pretrained: str | None = None  # local timm checkpoint (.safetensors / .pth / .bin)


class TimmSliceEncoder(SliceEncoder):
    """``timm.create_model(model_name, features_only=True)`` over the slices of a volume."""

    config_class = TimmSliceConfig

    def __init__(self, cfg: TimmSliceConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = self._create(None)
        info = self.backbone.feature_info
        multiple = 1 if cfg.image_size else max(info.reduction())
        self.setup_slices(cfg, info.channels()[-1], hw_multiple=multiple)
        if cfg.pretrained:
            announce(f"timm_slices({cfg.model_name})", self.load_pretrained(cfg.pretrained))

    def _create(self, state: dict[str, torch.Tensor] | None) -> torch.nn.Module:
        import timm

        cfg = self.cfg
        if not timm.is_model(cfg.model_name):
            from medvlsam2.core.errors import did_you_mean

            raise ConfigError(
                f"timm_slices: unknown timm model '{cfg.model_name}'"
                f"{did_you_mean(cfg.model_name, timm.list_models())}"
            )
        kwargs: dict[str, Any] = dict(cfg.model_kwargs)
        if state is not None:
            # timm's own loader, fed a dict we read safely: no download can happen.
            kwargs["pretrained_cfg_overlay"] = {"state_dict": state}
        return timm.create_model(
            cfg.model_name,
            pretrained=state is not None,
            in_chans=cfg.in_channels,
            features_only=True,
            out_indices=tuple(cfg.out_indices),
            **kwargs,
        )

    def encode_slices(self, slices: torch.Tensor) -> list[torch.Tensor]:
        x = resize_slices(slices, self.cfg.image_size)
        if self.cfg.normalize:
            if x.shape[1] != 3:
                raise ConfigError("timm_slices: normalize=true needs 3 input channels (ImageNet RGB)")
            x = imagenet_normalize(x)
        return list(self.backbone(x))

    def load_pretrained(self, path: str | Path) -> LoadReport:
        """Build a twin with timm's loader (strict, channel-adapted) and copy its weights in."""
        from medvlsam2.core.errors import InputError
        from medvlsam2.core.weights import read_state_dict

        state = read_state_dict(path)
        try:
            twin = self._create(state)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise InputError(f"timm_slices: {path} does not fit '{self.cfg.model_name}': {first}") from err
        result = self.backbone.load_state_dict(twin.state_dict(), strict=True)
        return LoadReport(str(path), len(twin.state_dict()), list(result.missing_keys), list(result.unexpected_keys))
