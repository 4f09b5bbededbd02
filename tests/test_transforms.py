"""Preprocessing goes to the model grid and back: original grid and affine, voxels in place."""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medvlsam2.core.errors import ConfigError, InputError
from medvlsam2.plugins.tasks.data.transforms import (
    box_to_file,
    box_to_model,
    get_preset,
    points_to_file,
    points_to_model,
    preprocess,
    read_volume,
    restore,
)

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)

# Not RAS (axes permuted and flipped: i -> -A, j -> +S, k -> -R) and anisotropic (0.8 / 1.5 / 3 mm).
AFFINE = np.array(
    [
        [0.0, 0.0, -3.0, 40.0],
        [-0.8, 0.0, 0.0, 12.0],
        [0.0, 1.5, 0.0, -20.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
SHAPE = (40, 24, 12)
BOX = (slice(8, 20), slice(4, 14), slice(3, 8))


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    data = rng.normal(-800.0, 20.0, SHAPE).astype(np.float32)
    data[BOX] = 400.0
    path = tmp_path_factory.mktemp("vol") / "ct.nii.gz"
    nib.save(nib.Nifti1Image(data, AFFINE), str(path))
    return path


def truth() -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[BOX] = 1
    return mask


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


PRESET = get_preset("ct", spatial_size=(16, 32, 32), pixdim=(1.0, 1.0, 2.0))


def test_model_input_shape_and_range(ct_file: Path) -> None:
    x, record = preprocess(ct_file, PRESET)
    assert x.shape == (1, 16, 32, 32) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert record.original_shape == SHAPE
    np.testing.assert_allclose(record.original_affine, AFFINE)


def test_restore_gives_original_grid_and_voxels(ct_file: Path, tmp_path: Path) -> None:
    x, record = preprocess(ct_file, PRESET)
    model_mask = (x[0] > 0.5).to(torch.uint8)  # the bright box, drawn on the model grid
    assert model_mask.sum() > 0
    back = restore(model_mask, record)
    assert back.shape == SHAPE and back.dtype == np.uint8
    assert dice(back.astype(bool), truth().astype(bool)) > 0.85
    centre = np.argwhere(back).mean(0)
    np.testing.assert_allclose(centre, np.argwhere(truth()).mean(0), atol=1.0)
    out = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(back, record.original_affine), str(out))
    reread = nib.load(str(out))
    np.testing.assert_allclose(reread.affine, nib.load(str(ct_file)).affine)
    # The record survives a second restore (MONAI's inverse must not consume it).
    np.testing.assert_array_equal(restore(model_mask, record), back)


def test_restore_multi_channel_and_orientation(ct_file: Path) -> None:
    x, record = preprocess(ct_file, PRESET)
    # RAS model grid with the slice axis (S) first: d grows towards superior. The file's j is +S.
    model = np.zeros(record.model_shape, dtype=np.uint8)
    model[: record.model_shape[0] // 2] = 1  # inferior half of the model volume
    stacked = restore(np.stack([model, 1 - model]), record)
    assert stacked.shape == (2, *SHAPE)
    lower = stacked[0]
    assert lower[:, : SHAPE[1] // 2 - 1, :].all() and not lower[:, SHAPE[1] // 2 + 1 :, :].any()


def test_point_lands_on_file_voxel(ct_file: Path) -> None:
    x, record = preprocess(ct_file, get_preset("ct", spatial_size=(16, 32, 32)))
    point = np.array([[14, 9, 5]])
    d, h, w = points_to_model(point, record)[0]
    assert float(x[0, d, h, w]) > 0.6  # inside the bright box (400 HU -> 0.7) on the model grid
    model = np.zeros(record.model_shape, dtype=np.uint8)
    model[max(d - 1, 0) : d + 2, max(h - 1, 0) : h + 2, max(w - 1, 0) : w + 2] = 1
    assert restore(model, record)[tuple(point[0])] == 1


def test_point_mapping_round_trips(ct_file: Path) -> None:
    # Model grid = the reoriented file grid (no resampling): the mapping is an exact permutation/flip.
    same = get_preset("ct", spatial_size=(24, 12, 40), resize_mode="pad_crop")
    _, record = preprocess(ct_file, same)
    rng = np.random.default_rng(1)
    points = np.stack([rng.integers(0, s, 50) for s in SHAPE], axis=1)
    model = points_to_model(points, record)
    np.testing.assert_array_equal(points_to_file(model, record), points)
    # A resampled grid round-trips to within half a model voxel (in file voxels).
    _, record = preprocess(ct_file, PRESET)
    back = points_to_file(points_to_model(points, record), record)
    scale = np.abs(np.linalg.inv(record.original_affine) @ record.model_affine)[:3, :3].max(axis=1)
    assert np.all(np.abs(back - points) <= np.ceil(scale / 2 + 1e-6))


def test_boxes_map_both_ways(ct_file: Path) -> None:
    x, record = preprocess(ct_file, PRESET)
    box = [8, 4, 3, 19, 13, 7]
    model_box = box_to_model(box, record)
    d0, h0, w0, d1, h1, w1 = model_box
    inside = x[0, d0 : d1 + 1, h0 : h1 + 1, w0 : w1 + 1]
    assert float(inside.mean()) > 0.6  # mostly the bright box (0.7), background is 0.1
    back = box_to_file(model_box, record)
    assert np.all(np.abs(back - np.asarray(box)) <= 2)
    with pytest.raises(InputError, match="min corner"):
        box_to_model([9, 4, 3, 8, 13, 7], record)
    with pytest.raises(InputError, match="outside the volume"):
        points_to_model([[0, 0, 99]], record)


def test_m3d_npy_preset_keeps_layout(tmp_path: Path) -> None:
    volume = np.random.rand(1, 4, 8, 8).astype(np.float32)
    np.save(tmp_path / "a.npy", volume)
    x, record = preprocess(tmp_path / "a.npy", "m3d_npy")
    np.testing.assert_allclose(x.numpy(), volume)
    assert points_to_model([[1, 2, 3]], record).tolist() == [[1, 2, 3]]


def test_unknown_preset_and_key() -> None:
    with pytest.raises(ConfigError, match="did you mean 'mri'"):
        get_preset("mr")
    with pytest.raises(ConfigError, match="did you mean 'window'"):
        get_preset("ct", windw=(0, 1))


def test_anti_aliasing_averages_each_slab_and_restore_is_unchanged(tmp_path: Path) -> None:
    # One bright slice in four along the slice axis: resizing 48 slices to 12 samples between
    # the file's slices 1 and 2, 5 and 6, ... and misses every bright one; anti-aliasing first
    # smooths along that axis, so each model slice carries about the slab's mean (0.25).
    volume = np.zeros((16, 16, 48), dtype=np.float32)
    volume[:, :, ::4] = 1.0
    path = _write(tmp_path / "stripes.nii.gz", volume)
    plain, record = preprocess(path, get_preset("ct", intensity="none", spatial_size=(12, 16, 16)))
    smooth, smooth_record = preprocess(
        path, get_preset("ct", intensity="none", spatial_size=(12, 16, 16), anti_aliasing=True)
    )
    assert plain.shape == smooth.shape == (1, 12, 16, 16)
    assert float(plain.max()) < 0.05
    per_slice = smooth[0].mean(dim=(1, 2))
    assert torch.all((per_slice > 0.15) & (per_slice < 0.35)), per_slice
    # The grid, the affine and the way back are those of plain resizing.
    np.testing.assert_allclose(smooth_record.model_affine, record.model_affine)
    mask = np.zeros((12, 16, 16), dtype=np.uint8)
    mask[3:7, 4:10, 5:12] = 1
    np.testing.assert_array_equal(restore(mask, smooth_record), restore(mask, record))
    with pytest.raises(ConfigError, match="preprocess.anti_aliasing"):
        get_preset("ct", anti_aliasing="yes")


# -- bad inputs: one InputError naming the file -----------------------------------------------
def _write(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope.nii.gz: volume file not found"):
        preprocess(tmp_path / "nope.nii.gz")


def test_truncated_and_corrupt_nifti(tmp_path: Path) -> None:
    good = _write(tmp_path / "good.nii.gz", np.random.rand(8, 8, 8).astype(np.float32))
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(InputError, match=r"truncated.nii.gz: cannot read NIfTI file"):
        preprocess(truncated)
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(gzip.compress(b"not a nifti header" * 30))
    with pytest.raises(InputError, match=r"corrupt.nii.gz: cannot read NIfTI file"):
        read_volume(corrupt)


def test_corrupt_nrrd(tmp_path: Path) -> None:
    bad = tmp_path / "bad.nrrd"
    bad.write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n\nshort")
    with pytest.raises(InputError, match=r"bad.nrrd: cannot read NRRD file"):
        preprocess(bad)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((16, 16), "got a 2D image"),
        ((16, 16, 1), "got a 2D image"),
        ((8, 8, 8, 3), "got a 4D series with 3 volumes"),
    ],
)
def test_wrong_dimensionality(tmp_path: Path, shape: tuple[int, ...], message: str) -> None:
    path = _write(tmp_path / "x.nii.gz", np.random.rand(*shape).astype(np.float32))
    with pytest.raises(InputError, match=rf"x.nii.gz: expected a 3D volume, {message}"):
        preprocess(path)


def test_nan_and_constant(tmp_path: Path) -> None:
    data = np.random.rand(8, 8, 8).astype(np.float32)
    data[1, 2, 3] = np.nan
    data[2, 2, 2] = np.inf
    with pytest.raises(InputError, match=r"nan.nii.gz: volume contains 2 NaN/Inf voxel"):
        preprocess(_write(tmp_path / "nan.nii.gz", data))
    with pytest.raises(InputError, match=r"flat.nii.gz: volume is constant"):
        preprocess(_write(tmp_path / "flat.nii.gz", np.full((8, 8, 8), 7.0, np.float32)))


def test_mri_volume_with_almost_every_voxel_equal_keeps_its_field_of_view(tmp_path: Path) -> None:
    """The 0.5-99.5 percentile range of such a volume is empty; scaling falls back to min-max
    instead of mapping every voxel to 0 and cropping the foreground to nothing."""
    data = np.full((40, 40, 20), 100, np.int16)
    data[18:21, 18:21, 9:11] = 0  # 18 of 32000 voxels differ
    volume, record = preprocess(_write(tmp_path / "almost_flat.nii.gz", data), get_preset("mri", spatial_size=(20, 40, 40)))
    assert volume.shape == (1, 20, 40, 40) and record.grid_shape == (40, 40, 20)
    assert float(volume.max()) == 1.0 and float(volume.min()) == 0.0
    assert restore(np.ones((1, 20, 40, 40), np.uint8), record).shape == (1, 40, 40, 20)


def test_a_crop_with_nothing_above_the_threshold_is_skipped_and_restore_inverts_what_ran(tmp_path: Path) -> None:
    data = np.random.default_rng(0).random((12, 10, 8)).astype(np.float32)
    cfg = get_preset("mri", spatial_size=(8, 12, 10), foreground_threshold=2.0)  # scaled voxels are <= 1
    volume, record = preprocess(_write(tmp_path / "dim.nii.gz", data), cfg)
    assert volume.shape == (1, 8, 12, 10) and record.grid_shape == (12, 10, 8)
    assert record.config.crop_foreground is False
    back = restore(np.ones((1, 8, 12, 10), np.uint8), record)
    assert back.shape == (1, 12, 10, 8) and int(back.sum()) == 12 * 10 * 8
