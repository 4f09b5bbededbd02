"""Build SAM2 models from the ``sam2`` package's own Hydra configs, on CPU, without global Hydra state.

``import sam2`` initialises Hydra globally, and ``sam2.build_sam.build_sam2`` composes its config
from that global state. Both would clash with a user's (or Lightning's) own Hydra context, so
every import of ``sam2`` and every compose here runs inside :func:`isolated_sam2_hydra`, which
saves whatever Hydra state exists, initialises the ``sam2`` config module, and restores the saved
state afterwards, whether or not the build succeeds.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from medvlsam2.core.encoder import LoadReport
from medvlsam2.core.errors import ConfigError

if TYPE_CHECKING:
    from sam2.modeling.sam2_base import SAM2Base

_SIZES = {"t": "t", "tiny": "t", "s": "s", "small": "s", "b+": "b+", "base_plus": "b+", "l": "l", "large": "l"}

#: Short names -> config files inside the ``sam2`` package.
SAM2_CONFIGS: dict[str, str] = {
    **{f"sam2_hiera_{s}": f"configs/sam2/sam2_hiera_{s}.yaml" for s in ("t", "s", "b+", "l")},
    **{f"sam2.1_hiera_{s}": f"configs/sam2.1/sam2.1_hiera_{s}.yaml" for s in ("t", "s", "b+", "l")},
}


def resolve_sam2_config(name: str) -> str:
    """``sam2.1_hiera_t`` / ``sam2.1_hiera_tiny`` / ``configs/sam2.1/sam2.1_hiera_t.yaml`` -> the config file."""
    key = name.strip()
    if key.endswith(".yaml"):
        key = Path(key).stem
    version, sep, size = key.rpartition("_hiera_")
    if sep and size in _SIZES:
        key = f"{version}_hiera_{_SIZES[size]}"
    if key not in SAM2_CONFIGS:
        raise ConfigError(f"unknown SAM2 config '{name}'; choose one of: {', '.join(SAM2_CONFIGS)}")
    return SAM2_CONFIGS[key]


@contextmanager
def isolated_sam2_hydra() -> Iterator[None]:
    """Hydra initialised on the ``sam2`` config module for the block only; prior state restored."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("sam2", version_base="1.2"):
            yield
    finally:
        restore_gh_from_backup(backup)


@contextmanager
def _quiet_sam2() -> Iterator[None]:
    """Silence the missing ``_C`` extension notice; its hole filling is off here anyway."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*cannot import name '_C'.*")
        warnings.filterwarnings("ignore", message=".*Skipping the post-processing step.*")
        yield


def build_sam2_model(
    config: str = "sam2.1_hiera_t",
    image_size: int = 256,
    checkpoint: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> tuple[SAM2Base, LoadReport | None]:
    """A ``SAM2Base`` on CPU in train mode from the package's config, at ``image_size`` pixels.

    ``overrides`` are extra Hydra overrides (``"++model.num_maskmem=4"``). ``checkpoint`` is a
    local SAM2 / SAM2.1 / MedSAM2 ``.pt`` (or ``.safetensors``) state dict, loaded non-strictly
    with a report of missing and unexpected keys; ``None`` keeps the random init.
    """
    if image_size % 32:
        raise ConfigError(f"SAM2 image_size must be a multiple of 32 (Hiera's stride), got {image_size}")
    config_file = resolve_sam2_config(config)
    extra = [f"++model.image_size={int(image_size)}", *overrides]
    with isolated_sam2_hydra(), _quiet_sam2():
        from sam2.build_sam import build_sam2

        model = build_sam2(
            config_file,
            ckpt_path=None,
            device="cpu",
            mode="train",
            hydra_overrides_extra=extra,
            apply_postprocessing=False,
        )
    report = load_sam2_checkpoint(model, checkpoint) if checkpoint is not None else None
    return model, report


def load_sam2_checkpoint(model: torch.nn.Module, path: str | Path) -> LoadReport:
    """Load an official SAM2 / SAM2.1 / MedSAM2 state dict (``{"model": ...}`` or flat) non-strictly.

    Tensors whose shape differs (e.g. position embeddings of another ``image_size``) are reported
    as unexpected instead of failing the load.
    """
    from medvlsam2.core.weights import read_state_dict

    state = read_state_dict(path)
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    usable = {k: v for k, v in state.items() if k not in mismatched}
    result = model.load_state_dict(usable, strict=False)
    return LoadReport(
        path=str(path),
        loaded=len(usable) - len(result.unexpected_keys),
        missing=list(result.missing_keys),
        unexpected=list(result.unexpected_keys) + [f"{k} (shape)" for k in mismatched],
    )


def init_object_score_present(model: torch.nn.Module, logit: float = 2.0) -> None:
    """Start a fresh object-score head at "object present" (zero last layer, positive bias).

    SAM2 blanks every mask whose object score is not positive, so a random head would hide the
    masks of about half the slices, and their gradients, until it has learned presence.
    """
    head = getattr(getattr(model, "sam_mask_decoder", None), "pred_obj_score_head", None)
    if head is None:
        return
    last = head.layers[-1] if hasattr(head, "layers") else head
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(logit)
