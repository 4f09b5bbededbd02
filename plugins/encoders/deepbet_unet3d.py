"""The encoder path of deepbet's pretrained 3D U-Net (brain extraction on T1 MRI), a real 3D encoder.

deepbet ships its networks only as TorchScript files (``<site-packages>/data/models/model.pt``
for the 256^3 network, ``bbox_model.pt`` for the 128^3 one). Running TorchScript code would tie
us to its traced shapes and hide the modules, so this plugin defines the same encoder as plain
``nn.Module``s (a ResNet-style stem and four stages of two residual blocks, InstanceNorm without
affine, ReLU) with identical parameter names, and copies the encoder tensors out of the archive.
The decoder half (``up*``, ``tp_conv*``, ``conv``) is not used.

deepbet is an optional dependency: ``pip install --no-deps deepbet==1.0.2`` (its declared GUI
dependencies are not needed).
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from medvlsam2.core.encoder import EncoderOutput, LoadReport, VolumeEncoder
from medvlsam2.core.errors import ConfigError, InputError, MedVLError
from medvlsam2.plugins.encoders._common import announce

INSTALL_HINT = "pip install --no-deps deepbet==1.0.2"
WIDTHS = (16, 32, 64, 128)
ENCODER_PREFIXES = ("init.", "down0.", "down1.", "down2.", "down3.")


def deepbet_weights(which: str = "model") -> Path:
    """Path of deepbet's TorchScript network ``which`` (``model`` or ``bbox_model``)."""
    spec = importlib.util.find_spec("deepbet")
    if spec is None or spec.origin is None:
        raise MedVLError(f"deepbet_unet3d needs the deepbet package: {INSTALL_HINT}")
    path = Path(spec.origin).resolve().parents[1] / "data" / "models" / f"{which}.pt"
    if not path.is_file():
        raise MedVLError(f"deepbet is installed but its weights are missing at {path}; reinstall: {INSTALL_HINT}")
    return path


def _norm(channels: int) -> nn.InstanceNorm3d:
    return nn.InstanceNorm3d(channels, affine=False, track_running_stats=False)


class ResBlock3d(nn.Module):
    """conv-IN-ReLU-conv-IN plus a (strided 1x1 conv-IN) shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv3d(cin, cout, 3, stride, 1, bias=False),
            _norm(cout),
            nn.ReLU(),
            nn.Conv3d(cout, cout, 3, 1, 1, bias=False),
            _norm(cout),
        )
        self.downsample = (
            nn.Sequential(nn.Conv3d(cin, cout, 1, stride, bias=False), _norm(cout))
            if stride != 1 or cin != cout
            else None
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.act(self.double_conv(x) + shortcut)


class Down(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.block1 = ResBlock3d(cin, cout, stride)
        self.block2 = ResBlock3d(cout, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(x))


@dataclass
class DeepbetUNet3DConfig:
    weights: str = "model"  # deepbet's "model" (256^3) or "bbox_model" (128^3) network
    pretrained: bool = True  # load deepbet's weights (False: same architecture, random init)
    out_stage: int = 3  # stage whose map becomes the tokens: 3 -> 128-d at 1/32, 2 -> 64-d at 1/16
    normalize: bool = True  # deepbet's input standardisation (per volume: 0.226 * z + 0.449)


class DeepbetUNet3DEncoder(VolumeEncoder):
    """deepbet's 3D encoder; ``features`` are the stem and every stage (strides 4, 4, 8, 16, 32)."""

    config_class = DeepbetUNet3DConfig

    def __init__(self, cfg: DeepbetUNet3DConfig) -> None:
        super().__init__()
        if cfg.weights not in ("model", "bbox_model"):
            raise ConfigError(f"deepbet_unet3d: weights must be 'model' or 'bbox_model', got '{cfg.weights}'")
        if cfg.out_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepbet_unet3d: out_stage must be 0..3, got {cfg.out_stage}")
        path = deepbet_weights(cfg.weights)  # also the optional-dependency check
        self.cfg = cfg
        self.init = nn.Sequential(
            nn.Conv3d(1, WIDTHS[0], 7, 2, 3, bias=False), _norm(WIDTHS[0]), nn.ReLU(), nn.MaxPool3d(3, 2, 1)
        )
        self.down0 = Down(WIDTHS[0], WIDTHS[0], 1)
        self.down1 = Down(WIDTHS[0], WIDTHS[1], 2)
        self.down2 = Down(WIDTHS[1], WIDTHS[2], 2)
        self.down3 = Down(WIDTHS[2], WIDTHS[3], 2)
        self.stages = [self.down0, self.down1, self.down2, self.down3][: cfg.out_stage + 1]
        self.out_dim = WIDTHS[cfg.out_stage]
        self.in_channels = 1
        stride = (4, 4, 8, 16, 32)[cfg.out_stage + 1]
        self.divisible_by = (stride, stride, stride)
        if cfg.pretrained:
            announce(f"deepbet_unet3d({cfg.weights})", self.load_pretrained(path))

    def forward(self, volume: torch.Tensor) -> EncoderOutput:
        self.check_input(volume)
        x = volume
        if self.cfg.normalize:
            flat = x.flatten(1)
            mean, std = flat.mean(1), flat.std(1).clamp_min(1e-6)
            x = 0.226 * (x - mean[:, None, None, None, None]) / std[:, None, None, None, None] + 0.449
        x = self.init(x)
        features = [x]
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        b, c = x.shape[:2]
        grid = tuple(x.shape[2:])
        return EncoderOutput(x.reshape(b, c, -1).transpose(1, 2), grid, features)

    def load_pretrained(self, path: str | Path) -> LoadReport:
        """Encoder tensors from a deepbet TorchScript archive or from a plain state dict."""
        path = Path(path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
        except RuntimeError:
            from medvlsam2.core.weights import read_state_dict

            state = read_state_dict(path)
        except (FileNotFoundError, ValueError) as err:
            raise InputError(f"deepbet_unet3d: cannot read weights {path}: {err}") from err
        state = {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIXES)}
        if not state:
            raise InputError(f"deepbet_unet3d: {path} holds no deepbet encoder tensors")
        result = self.load_state_dict(state, strict=False)
        return LoadReport(str(path), len(state) - len(result.unexpected_keys), list(result.missing_keys),
                          list(result.unexpected_keys))
