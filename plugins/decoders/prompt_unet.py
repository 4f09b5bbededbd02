"""Non-SAM baseline: a 3D U-Net (MONAI's DynUNet blocks) conditioned on the same prompts.

Each object gets its own pass over the volume: points and boxes become extra input channels
(Gaussian blobs for positive and negative points, the filled 3D box), the text prompt embedding
modulates every level with FiLM, and the trunk's coarsest encoder feature map, when given and
enabled, is fused at the bottleneck. Same interface as ``sam2_volume``, so swapping decoders is
one line of YAML. Memory and time are linear in the number of voxels, hence in D.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from medvlsam2.core.decoder import DecoderOutput, MaskDecoder, Prompts, normalise_intensity
from medvlsam2.core.encoder import EncoderOutput
from medvlsam2.core.errors import ConfigError, InputError

_PROMPT_CHANNELS = 3  # positive points, negative points, box


@dataclass
class PromptUNetConfig:
    """Widths per level, prompt width, and how prompts become input channels."""

    prompt_dim: int = 256
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    #: Gaussian width (voxels) of point prompts drawn into the input.
    point_sigma: float = 2.0
    #: Channels of the trunk encoder's coarsest feature map to fuse at the bottleneck; None: unused.
    encoder_feature_channels: int | None = None
    norm: str = "instance"
    intensity_percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])


class PromptUNetDecoder(MaskDecoder):
    """Non-SAM baseline, a MONAI 3D U-Net conditioned on prompts (FiLM + point/box maps)."""

    config_class = PromptUNetConfig
    depth_scaling = "linear"

    def __init__(self, cfg: PromptUNetConfig | None = None) -> None:
        super().__init__()
        from monai.networks.blocks.dynunet_block import UnetOutBlock, UnetResBlock, UnetUpBlock

        cfg = cfg or PromptUNetConfig()
        if len(cfg.channels) < 2 or any(c <= 0 for c in cfg.channels):
            raise ConfigError("decoder.channels must list at least two positive widths")
        if cfg.point_sigma <= 0:
            raise ConfigError("decoder.point_sigma must be positive")
        self.cfg = cfg
        self.prompt_dim = int(cfg.prompt_dim)
        ch = list(cfg.channels)
        self.down = nn.ModuleList(
            UnetResBlock(3, 1 + _PROMPT_CHANNELS if i == 0 else ch[i - 1], c, 3, 1 if i == 0 else 2, cfg.norm)
            for i, c in enumerate(ch)
        )
        self.up = nn.ModuleList(UnetUpBlock(3, ch[i + 1], ch[i], 3, 1, 2, cfg.norm) for i in reversed(range(len(ch) - 1)))
        self.film = nn.ModuleList(nn.Linear(self.prompt_dim, 2 * c) for c in [*ch, *reversed(ch[:-1])])
        for lin in self.film:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.fuse = (
            nn.Conv3d(cfg.encoder_feature_channels, ch[-1], 1) if cfg.encoder_feature_channels else None
        )
        self.out = UnetOutBlock(3, ch[0], 1)
        self._multiple = 2 ** (len(ch) - 1)

    def prompt_maps(self, prompts: Prompts, shape: tuple[int, int, int]) -> torch.Tensor:
        """``(B, K, 3, D, H, W)``: positive points, negative points, filled box."""
        b, k = prompts.batch_size, prompts.num_objects
        device = self.out.conv.conv.weight.device
        maps = torch.zeros(b, k, _PROMPT_CHANNELS, *shape, device=device)
        axes = [torch.arange(n, device=device, dtype=torch.float32) for n in shape]
        if prompts.points is not None:
            grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (D, H, W, 3)
            pts = prompts.points.to(device).float()
            for bi in range(b):
                for ki in range(k):
                    for p, lab in zip(pts[bi, ki], prompts.point_labels[bi, ki].tolist()):
                        if lab < 0:
                            continue
                        blob = torch.exp(-((grid - p) ** 2).sum(-1) / (2 * self.cfg.point_sigma**2))
                        c = 0 if lab > 0 else 1
                        maps[bi, ki, c] = torch.maximum(maps[bi, ki, c], blob)
        if prompts.boxes is not None:
            for bi in range(b):
                for ki in range(k):
                    box = prompts.boxes[bi, ki]
                    if bool((box >= 0).all()):
                        lo = [int(round(v)) for v in box[:3].tolist()]
                        hi = [int(round(v)) + 1 for v in box[3:].tolist()]
                        maps[bi, ki, 2, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = 1.0
        return maps

    @staticmethod
    def _film(x: torch.Tensor, lin: nn.Linear, text: torch.Tensor | None) -> torch.Tensor:
        if text is None:
            return x
        gamma, beta = lin(text).view(x.shape[0], -1, 1, 1, 1).chunk(2, dim=1)
        return x * (1 + gamma) + beta

    def forward(
        self,
        volume: torch.Tensor,
        prompts: Prompts,
        encoder_output: EncoderOutput | None = None,
    ) -> DecoderOutput:
        """Mask logits ``(B, K, D, H, W)``; objects run as a batch of B*K prompted volumes."""
        self.check_prompts(volume, prompts)
        bsz, _, depth, h, w = volume.shape
        k = prompts.num_objects
        shape = (depth, h, w)
        image = normalise_intensity(volume[:, :1], self.cfg.intensity_percentiles)[:, None].expand(-1, k, -1, -1, -1, -1)
        x = torch.cat([image, self.prompt_maps(prompts, shape)], dim=2).flatten(0, 1)
        pad = [(-n) % self._multiple for n in shape]
        x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
        text = None
        if prompts.text_embeds is not None:
            if prompts.text_embeds.shape[-1] != self.prompt_dim:
                raise InputError(f"text_embeds have width {prompts.text_embeds.shape[-1]}, this decoder expects {self.prompt_dim}")
            text = prompts.text_embeds.reshape(bsz * k, -1).to(x.dtype)
        skips = []
        films = iter(self.film)
        for i, block in enumerate(self.down):
            x = self._film(block(x), next(films), text)
            if i < len(self.down) - 1:
                skips.append(x)
        if self.fuse is not None and encoder_output is not None and encoder_output.features:
            feat = encoder_output.features[-1]
            if feat.shape[1] != self.fuse.in_channels:
                raise InputError(
                    f"encoder feature map has {feat.shape[1]} channels, decoder.encoder_feature_channels is {self.fuse.in_channels}"
                )
            feat = F.interpolate(self.fuse(feat.to(x.dtype)), size=x.shape[-3:], mode="trilinear", align_corners=False)
            x = x + feat.repeat_interleave(k, dim=0)
        for block in self.up:
            x = self._film(block(x, skips.pop()), next(films), text)
        logits = self.out(x)[:, 0, :depth, :h, :w]
        return DecoderOutput(masks=logits.reshape(bsz, k, depth, h, w))
