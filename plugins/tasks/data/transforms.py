"""Volume loading, preprocessing presets and the way back to the file's own grid.

``preprocess`` turns a NIfTI / NRRD / ``.npy`` file (or an array) into the model's
``(1, D, H, W)`` tensor with MONAI transforms and returns a ``PreprocessRecord``. The record
keeps MONAI's ``applied_operations`` and both affines, so ``restore`` maps a predicted mask back
onto the original grid and affine, and points / boxes move between the file's voxel indices
``(i, j, k)`` (as nibabel indexes the array and ITK-SNAP shows it) and model indices ``(d, h, w)``.

Bad volumes raise ``InputError`` naming the file: missing, truncated or corrupt files; NaN/Inf;
2D images and 4D series; and constant (empty) volumes, which are refused rather than warned
about because intensity normalisation of a constant image has nothing to scale and the model
would see an all-zero input.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medvlsam2.core.errors import ConfigError, InputError

if TYPE_CHECKING:
    import torch
    from monai.data import MetaTensor

log = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".npy", ".mha", ".mhd")
INTENSITY_MODES = ("ct", "mri", "minmax", "none")
RESIZE_MODES = ("resize", "pad_crop", "none")
LARGE_INPUT_FACTOR = 4.0


@dataclass
class PreprocessConfig:
    """One preprocessing preset; every field can be overridden from YAML (``data.preprocess``)."""

    intensity: str = "ct"
    window: tuple[float, float] = (-1000.0, 1000.0)
    percentiles: tuple[float, float] = (0.5, 99.5)
    axcodes: str | None = "RAS"
    pixdim: tuple[float, float, float] | None = None
    crop_foreground: bool = False
    foreground_threshold: float = 0.0
    crop_margin: int = 0
    spatial_size: tuple[int, int, int] | None = (32, 256, 256)
    resize_mode: str = "resize"
    anti_aliasing: bool = False
    slice_axis: int = 2
    array_spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        if self.intensity not in INTENSITY_MODES:
            raise ConfigError(
                f"preprocess.intensity: '{self.intensity}' is not one of {', '.join(INTENSITY_MODES)}"
            )
        if self.resize_mode not in RESIZE_MODES:
            raise ConfigError(
                f"preprocess.resize_mode: '{self.resize_mode}' is not one of {', '.join(RESIZE_MODES)}"
            )
        if not isinstance(self.anti_aliasing, bool):
            raise ConfigError(f"preprocess.anti_aliasing: expected true or false, got {self.anti_aliasing!r}")
        if self.slice_axis not in (0, 1, 2):
            raise ConfigError(f"preprocess.slice_axis: expected 0, 1 or 2, got {self.slice_axis}")
        if self.spatial_size is not None and (len(self.spatial_size) != 3 or min(self.spatial_size) < 1):
            raise ConfigError(
                f"preprocess.spatial_size: expected three positive sizes (D, H, W), got {self.spatial_size}"
            )
        if self.window[0] >= self.window[1]:
            raise ConfigError(f"preprocess.window: lower bound must be below upper bound, got {self.window}")


PRESETS: dict[str, PreprocessConfig] = {
    # CT in Hounsfield units: clip to [-1000, 1000] HU and scale to [0, 1].
    "ct": PreprocessConfig(intensity="ct"),
    # MRI has no absolute scale: robust percentile normalisation to [0, 1].
    "mri": PreprocessConfig(intensity="mri", crop_foreground=True),
    # M3D's released .npy volumes are already (1, D, H, W), normalised and resized.
    "m3d_npy": PreprocessConfig(
        intensity="none", axcodes=None, slice_axis=0, spatial_size=None, resize_mode="none"
    ),
}


def get_preset(name: str | PreprocessConfig, **overrides: Any) -> PreprocessConfig:
    """A preset by name (``ct``, ``mri``, ``m3d_npy``) with field overrides."""
    from medvlsam2.core.errors import did_you_mean

    if isinstance(name, PreprocessConfig):
        base = name
    elif name in PRESETS:
        base = PRESETS[name]
    else:
        raise ConfigError(
            f"unknown preprocessing preset '{name}'{did_you_mean(name, PRESETS)}; presets: {', '.join(PRESETS)}"
        )
    known = {f.name for f in fields(PreprocessConfig)}
    for key in overrides:
        if key not in known:
            raise ConfigError(f"preprocess: unknown key '{key}'{did_you_mean(key, known)}")
    cfg = replace(base, **overrides)
    return cfg


# -- loading ---------------------------------------------------------------------------------
def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def read_volume(path: str | Path, *, check: bool = True) -> MetaTensor:
    """A 3D volume as a ``MetaTensor`` in the file's own index order, with its affine (RAS).

    NIfTI and NRRD go through MONAI ``LoadImage``; ``.npy`` is read with ``allow_pickle=False``
    and gets an identity affine. ``check`` refuses NaN/Inf and non-3D arrays.
    """
    import torch
    from monai.data import MetaTensor

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: volume file not found")
    suffix = _suffix(path)
    if suffix not in VOLUME_SUFFIXES:
        raise InputError(
            f"{path}: unsupported volume format '{suffix}'; expected one of {', '.join(VOLUME_SUFFIXES)}"
        )
    try:
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False)
            volume = MetaTensor(torch.as_tensor(np.asarray(array)), affine=torch.eye(4, dtype=torch.float64))
        else:
            from monai.transforms import LoadImage

            volume = LoadImage(image_only=True, dtype=None)(str(path))
    except InputError:
        raise
    except Exception as err:  # readers raise anything from EOFError to zlib.error on a bad file
        kind = "NRRD" if suffix in (".nrrd", ".nhdr") else "NIfTI" if suffix.startswith(".nii") else suffix
        raise InputError(
            f"{path}: cannot read {kind} file (truncated or corrupt?): {type(err).__name__}: {err}"
        ) from err
    if check:
        volume = _as_3d(volume, str(path))
        check_finite(volume, str(path))
    return volume


def _as_3d(volume: Any, where: str) -> Any:
    """Drop singleton channel / time axes; anything else than 3D is an ``InputError``."""
    shape = tuple(volume.shape)
    if len(shape) == 4 and shape[0] == 1:
        volume = volume[0]
    elif len(shape) == 4 and shape[-1] == 1:
        volume = volume[..., 0]
    if volume.ndim != 3:
        what = (
            "a 2D image" if len(shape) == 2 or (len(shape) == 3 and 1 in shape) else f"a {len(shape)}D array"
        )
        if len(shape) == 4:
            what = f"a 4D series with {shape[-1]} volumes"
        raise InputError(f"{where}: expected a 3D volume, got {what} of shape {shape}")
    if min(volume.shape) < 2:
        raise InputError(f"{where}: expected a 3D volume, got a 2D image of shape {shape}")
    return volume


def check_finite(volume: Any, where: str) -> None:
    """Refuse NaN / Inf voxels, naming how many."""
    import torch

    data = torch.as_tensor(volume)
    if data.is_floating_point():
        bad = int((~torch.isfinite(data)).sum())
        if bad:
            raise InputError(f"{where}: volume contains {bad} NaN/Inf voxel(s)")


def check_volume(path: str | Path) -> tuple[int, int, int]:
    """Read ``path`` and refuse it as ``preprocess`` would; its shape ``(i, j, k)``.

    Lets ``predict`` fail on a bad file or prompt before it spends time loading a model.
    """
    volume = read_volume(path)
    _check_not_constant(volume, str(path))
    return tuple(int(s) for s in volume.shape)  # type: ignore[return-value]


def _check_not_constant(volume: Any, where: str) -> None:
    import torch

    data = torch.as_tensor(volume)
    if data.numel() and bool(data.max() == data.min()):
        raise InputError(
            f"{where}: volume is constant (every voxel = {float(data.flatten()[0]):g}); nothing to segment"
        )


# -- preprocessing ---------------------------------------------------------------------------
@dataclass
class PreprocessRecord:
    """What ``preprocess`` did, enough to go back: shapes, affines and MONAI's applied operations."""

    source: str
    original_shape: tuple[int, int, int]
    original_affine: np.ndarray
    model_affine: np.ndarray
    grid_shape: tuple[int, int, int]
    permutation: tuple[int, int, int]
    applied_operations: list[dict[str, Any]] = field(repr=False)
    config: PreprocessConfig = field(default_factory=PreprocessConfig)

    @property
    def model_shape(self) -> tuple[int, int, int]:
        """``(D, H, W)`` of the model input."""
        return tuple(int(self.grid_shape[a]) for a in self.permutation)  # type: ignore[return-value]

    def file_to_model(self, points: Any) -> np.ndarray:
        """Continuous ``(N, 3)`` file voxel coordinates ``(i, j, k)`` -> model ``(d, h, w)``."""
        pts = _as_points(points)
        grid = _apply(np.linalg.inv(self.model_affine) @ self.original_affine, pts)
        return grid[:, list(self.permutation)]

    def model_to_file(self, points: Any) -> np.ndarray:
        """Continuous ``(N, 3)`` model coordinates ``(d, h, w)`` -> file ``(i, j, k)``."""
        pts = _as_points(points)
        grid = np.empty_like(pts)
        grid[:, list(self.permutation)] = pts
        return _apply(np.linalg.inv(self.original_affine) @ self.model_affine, grid)


def _as_points(points: Any) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim == 1:
        pts = pts[None]
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise InputError(f"points: expected (N, 3) voxel indices, got shape {pts.shape}")
    return pts


def _apply(matrix: np.ndarray, pts: np.ndarray) -> np.ndarray:
    homogeneous = np.concatenate([pts, np.ones((len(pts), 1))], axis=1)
    return (homogeneous @ matrix.T)[:, :3]


def _spatial_transforms(cfg: PreprocessConfig, grid_size: tuple[int, int, int] | None) -> list[Any]:
    import monai.transforms as mt

    ops: list[Any] = []
    if cfg.axcodes:
        ops.append(mt.Orientation(axcodes=cfg.axcodes, labels=None))
    if cfg.pixdim:
        ops.append(mt.Spacing(pixdim=cfg.pixdim, mode="bilinear"))
    if cfg.crop_foreground:
        threshold = cfg.foreground_threshold
        ops.append(
            mt.CropForeground(select_fn=lambda x: x > threshold, margin=cfg.crop_margin, allow_smaller=True)
        )
    if grid_size is not None and cfg.resize_mode == "resize":
        # anti_aliasing: a Gaussian (sigma (factor - 1) / 2) along each downsampled axis first,
        # so a voxel of the model grid averages the slab it stands for instead of sampling the
        # two nearest file slices. Labels are still sampled at voxel centres.
        ops.append(mt.Resize(spatial_size=grid_size, mode="trilinear", anti_aliasing=cfg.anti_aliasing))
    elif grid_size is not None and cfg.resize_mode == "pad_crop":
        ops.append(mt.ResizeWithPadOrCrop(spatial_size=grid_size))
    return ops


def _intensity(cfg: PreprocessConfig) -> Any:
    import monai.transforms as mt

    if cfg.intensity == "ct":
        lo, hi = cfg.window
        return mt.ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
    if cfg.intensity == "mri":
        lo, hi = cfg.percentiles
        return mt.ScaleIntensityRangePercentiles(lower=lo, upper=hi, b_min=0.0, b_max=1.0, clip=True)
    if cfg.intensity == "minmax":
        return mt.ScaleIntensity(minv=0.0, maxv=1.0)
    return None


def _permutation(slice_axis: int) -> tuple[int, int, int]:
    """Grid axes in model order: the slice axis first, the other two in file order."""
    return (slice_axis, *[a for a in range(3) if a != slice_axis])  # type: ignore[return-value]


def _grid_size(cfg: PreprocessConfig) -> tuple[int, int, int] | None:
    """``cfg.spatial_size`` (model order D, H, W) in the file's axis order, or None."""
    if cfg.spatial_size is None or cfg.resize_mode == "none":
        return None
    size = [0, 0, 0]
    for model_axis, grid_axis in enumerate(_permutation(cfg.slice_axis)):
        size[grid_axis] = int(cfg.spatial_size[model_axis])
    return tuple(size)  # type: ignore[return-value]


def _to_metatensor(source: str | Path | np.ndarray | Any, cfg: PreprocessConfig) -> tuple[MetaTensor, str]:
    import torch
    from monai.data import MetaTensor

    if isinstance(source, (str, Path)):
        return read_volume(source), str(source)
    where = "array"
    data = torch.as_tensor(np.asarray(source) if isinstance(source, np.ndarray) else source)
    data = _as_3d(data, where)
    check_finite(data, where)
    if isinstance(source, MetaTensor) and source.ndim == 3:
        return source, where
    affine = torch.diag(torch.tensor([*cfg.array_spacing, 1.0], dtype=torch.float64))
    return MetaTensor(data, affine=affine), where


def preprocess(
    source: str | Path | np.ndarray | torch.Tensor, cfg: PreprocessConfig | str = "ct"
) -> tuple[torch.Tensor, PreprocessRecord]:
    """A volume -> model input ``(1, D, H, W)`` float tensor and the record to undo it.

    Arrays carry no affine: ``cfg.array_spacing`` gives their voxel size (identity otherwise).
    """
    import monai.transforms as mt
    import torch

    if isinstance(cfg, str):
        cfg = get_preset(cfg)
    volume, where = _to_metatensor(source, cfg)
    _check_not_constant(volume, where)
    original_affine = np.asarray(volume.affine, dtype=np.float64)
    original_shape = tuple(int(s) for s in volume.shape)
    perm = _permutation(cfg.slice_axis)
    grid_size = _grid_size(cfg)
    image = volume.float().unsqueeze(0)
    intensity = _intensity(cfg)
    if intensity is not None:
        scaled = intensity(image)
        if cfg.intensity == "mri" and not bool((scaled > 0).any()):
            # Nearly every voxel shares one value, so the percentile range is empty: scale by
            # the volume's full range instead of mapping everything to 0.
            log.info("%s: percentile range is empty (almost every voxel is equal); scaled by min-max instead", where)
            scaled = mt.ScaleIntensity(minv=0.0, maxv=1.0)(image)
        image = scaled
    if cfg.crop_foreground and not bool((image > cfg.foreground_threshold).any()):
        # Nothing above the threshold would crop to an empty volume: keep the whole field of
        # view, and record the config as applied so that ``restore`` inverts the same steps.
        cfg = replace(cfg, crop_foreground=False)
    spatial = mt.Compose(_spatial_transforms(cfg, grid_size))
    out = spatial(image)
    if grid_size is not None and cfg.resize_mode == "resize":
        factor = math.prod(original_shape) / max(1, math.prod(grid_size))
        if factor > LARGE_INPUT_FACTOR:
            log.info(
                "%s: volume %s resized to the model's input %s",
                where,
                original_shape,
                tuple(cfg.spatial_size),
            )
    record = PreprocessRecord(
        source=where,
        original_shape=original_shape,  # type: ignore[arg-type]
        original_affine=original_affine,
        model_affine=np.asarray(out.affine, dtype=np.float64),
        grid_shape=tuple(int(s) for s in out.shape[1:]),  # type: ignore[arg-type]
        permutation=perm,
        applied_operations=list(out.applied_operations),
        config=cfg,
    )
    tensor = torch.as_tensor(out.as_tensor() if hasattr(out, "as_tensor") else out).permute(
        0, *[p + 1 for p in perm]
    )
    return tensor.contiguous().float(), record


def _nearest(operations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Applied operations set up for inverting a label map with freshly built transforms.

    Object ids are reset: the transforms are rebuilt from the config, so MONAI matches them by
    class. ``Resize`` gets ``nearest-exact`` (voxel-centre aligned, as its affine update assumes);
    plain ``nearest`` in torch's interpolate is shifted by half a voxel.
    """
    from monai.transforms.utils import convert_applied_interp_mode, reset_ops_id

    converted = reset_ops_id(convert_applied_interp_mode(operations, mode="nearest", align_corners=None))

    def fix(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                fix(item)
        elif isinstance(node, dict):
            info = node.get("extra_info")
            if node.get("class") == "Resize" and isinstance(info, dict) and info.get("mode") == "nearest":
                info["mode"] = "nearest-exact"
            for value in node.values():
                fix(value)

    fix(converted)
    return converted


def restore(mask: Any, record: PreprocessRecord) -> np.ndarray:
    """A model-grid mask ``(D, H, W)`` or ``(K, D, H, W)`` -> the original file's grid.

    Returns ``(X, Y, Z)`` (or ``(K, X, Y, Z)``) in the file's own index order, to be written
    with ``record.original_affine``. Labels are resampled with nearest neighbour.
    """
    import monai.transforms as mt
    import torch
    from monai.data import MetaTensor

    data = torch.as_tensor(np.asarray(mask) if isinstance(mask, np.ndarray) else mask).detach().cpu()
    squeeze = data.ndim == 3
    if squeeze:
        data = data[None]
    if data.ndim != 4 or tuple(data.shape[1:]) != record.model_shape:
        raise InputError(
            f"restore: expected a mask of shape (K, *{record.model_shape}), got {tuple(data.shape)}"
        )
    dtype = data.dtype
    inverse_perm = [0, *[int(np.argsort(record.permutation)[i]) + 1 for i in range(3)]]
    grid = data.permute(*inverse_perm).float()
    meta_tensor = MetaTensor(grid, affine=torch.as_tensor(record.model_affine))
    meta_tensor.applied_operations = _nearest(record.applied_operations)
    spatial = mt.Compose(_spatial_transforms(record.config, _grid_size(record.config)))
    with torch.no_grad():
        back = spatial.inverse(meta_tensor) if len(spatial.transforms) else meta_tensor
    out = torch.as_tensor(back.as_tensor() if hasattr(back, "as_tensor") else back)
    if tuple(out.shape[1:]) != record.original_shape:
        raise InputError(
            f"restore: inverse gave shape {tuple(out.shape[1:])}, expected {record.original_shape}"
        )
    if not dtype.is_floating_point:
        out = out.round().to(dtype)
    array = out.numpy()
    return array[0] if squeeze else array


# -- points and boxes ------------------------------------------------------------------------
def _clip(indices: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    return np.clip(indices, 0, np.asarray(shape) - 1)


def check_points(points: Any, shape: Sequence[int], where: str = "points") -> np.ndarray:
    """Integer ``(N, 3)`` voxel indices inside ``shape``; outside points are an ``InputError``."""
    pts = _as_points(points)
    if not np.all(np.isfinite(pts)):
        raise InputError(f"{where}: coordinates must be finite numbers")
    idx = np.rint(pts).astype(int)
    outside = np.any((idx < 0) | (idx >= np.asarray(shape)), axis=1)
    if outside.any():
        bad = tuple(int(v) for v in idx[int(np.argmax(outside))])
        raise InputError(
            f"{where}: point {bad} is outside the volume of shape {tuple(int(s) for s in shape)}"
        )
    return idx


def points_to_model(points: Any, record: PreprocessRecord) -> np.ndarray:
    """File voxel indices ``(i, j, k)`` -> integer model indices ``(d, h, w)`` (nearest voxel)."""
    idx = check_points(points, record.original_shape)
    return _clip(np.rint(record.file_to_model(idx)).astype(int), record.model_shape)


def points_to_file(points: Any, record: PreprocessRecord) -> np.ndarray:
    """Model indices ``(d, h, w)`` -> integer file voxel indices ``(i, j, k)``."""
    idx = check_points(points, record.model_shape, where="model points")
    return _clip(np.rint(record.model_to_file(idx)).astype(int), record.original_shape)


def _box_corners(box: np.ndarray) -> np.ndarray:
    lo, hi = box[:3] - 0.5, box[3:] + 0.5
    return np.array(
        [[(lo, hi)[a][0], (lo, hi)[b][1], (lo, hi)[c][2]] for a in (0, 1) for b in (0, 1) for c in (0, 1)]
    )


def _map_box(
    box: Any, mapper: Any, shape_in: Sequence[int], shape_out: Sequence[int], where: str
) -> np.ndarray:
    arr = np.asarray(box, dtype=np.float64).reshape(-1)
    if arr.shape != (6,):
        raise InputError(f"{where}: expected 6 numbers (i0, j0, k0, i1, j1, k1), got {arr.size}")
    if np.any(arr[:3] > arr[3:]):
        raise InputError(f"{where}: min corner {tuple(arr[:3])} exceeds max corner {tuple(arr[3:])}")
    check_points(arr.reshape(2, 3), shape_in, where=where)
    mapped = mapper(_box_corners(arr))
    lo = np.ceil(mapped.min(axis=0) + 0.5 - 1e-6).astype(int)
    hi = np.floor(mapped.max(axis=0) - 0.5 + 1e-6).astype(int)
    # A box thinner than one target voxel along an axis (one slice of a finer file) covers no
    # target voxel centre there: take the voxel nearest its centre, not the one above it.
    thin = hi < lo
    centre = np.rint(mapped.mean(axis=0)).astype(int)
    lo, hi = np.where(thin, centre, lo), np.where(thin, centre, hi)
    return np.concatenate([_clip(lo, shape_out), _clip(hi, shape_out)])


def box_to_model(box: Any, record: PreprocessRecord) -> np.ndarray:
    """An inclusive file-index box ``(i0, j0, k0, i1, j1, k1)`` -> model ``(d0, h0, w0, d1, h1, w1)``."""
    return _map_box(box, record.file_to_model, record.original_shape, record.model_shape, "box")


def box_to_file(box: Any, record: PreprocessRecord) -> np.ndarray:
    """An inclusive model-index box -> the file's ``(i0, j0, k0, i1, j1, k1)``."""
    return _map_box(box, record.model_to_file, record.model_shape, record.original_shape, "model box")
