"""Segmentation tasks: semantic (class names), referring (free text) and interactive (points / boxes).

All three end in the mask decoder and share the loss (``core.losses.SegmentationLoss``), the
scoring path (Dice and normalised surface Dice from ``plugins.tasks.metrics``, by default on
the original file grid with its spacing) and the ``infer`` entry point used by
``medvlsam2 predict`` and the web app.

* ``semantic_seg`` puts K class names in one prompt; the answer names each class followed by
  ``[SEG]``, so one LLM pass yields K prompt embeddings and K masks. At inference the answer is
  forced (it is the prompt's answer prefix), so a mask is never missing.
* ``referring_seg`` generates an answer to a question; when the answer has no ``[SEG]``, one is
  appended and the ``[SEG]`` state comes from a teacher-forced pass (``forced_seg_rate``).
* With ``answer_boxes`` (semantic and referring) the answer writes each object's 3D box before
  its ``[SEG]``, in grounding's text form, and the decoder is prompted with that box too: the
  LLM says where, the decoder draws the mask (trained on the target's box, inferred from the
  box the LLM writes).
* ``interactive_seg`` prompts the decoder with simulated clicks and jittered boxes (and, with
  ``use_text``, a forced ``[SEG]`` from "Segment the {names}.").

Per-case scores are computed in ``predict_step`` so a split's predictions stay small.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

import numpy as np
import torch

from medvlsam2.core.decoder import DecoderOutput, Prompts
from medvlsam2.core.errors import ConfigError, InputError
from medvlsam2.core.llm import IMAGE_TOKEN, SEG_TOKEN
from medvlsam2.core.losses import SegLossConfig, SegmentationLoss
from medvlsam2.plugins.tasks.base import MedVLTask, TaskConfig, join_names
from medvlsam2.plugins.tasks.grounding import box_to_text, parse_box_text
from medvlsam2.plugins.tasks.grounding import mask_box as normalised_box

log = logging.getLogger(__name__)

METRIC_GRIDS = ("original", "model")
TRAIN_PROMPTS = ("points", "box", "points+box")


# -- configs ---------------------------------------------------------------------------------
@dataclass
class SegTaskConfig(TaskConfig):
    """Options shared by the segmentation tasks."""

    #: Weights of the Dice / BCE / focal / IoU-prediction / object-score terms.
    loss: SegLossConfig = field(default_factory=SegLossConfig)
    #: Weight of the mask loss in the task loss.
    seg_weight: float = 1.0
    #: Probability above which a voxel counts as foreground when scoring.
    threshold: float = 0.5
    #: "original": score on the file's own grid and spacing (masks restored); "model": on the model grid.
    metrics_grid: str = "original"
    #: Tolerance of the normalised surface Dice, in mm.
    nsd_tolerance_mm: float = 1.0
    #: Also report the 95th-percentile Hausdorff distance (mm).
    hd95: bool = False
    #: Label names this task trains and scores on; empty = every named label.
    classes: list[str] = field(default_factory=list)
    #: Each training box side moves by up to this fraction of the object's extent.
    box_jitter: float = 0.1


@dataclass
class TextSegConfig(SegTaskConfig):
    """Options of the tasks whose masks are prompted by the LLM's [SEG] tokens."""

    #: Weight of the LLM's answer loss.
    lm_weight: float = 1.0
    #: The answer writes each object's 3D box before its [SEG] (grounding's text form,
    #: ``[d0, h0, w0, d1, h1, w1]`` normalised to the model grid), and the decoder is prompted
    #: with that box as well as the [SEG] embedding: the LLM says where, the decoder draws the
    #: mask inside. Training writes the target's box (the decoder gets it jittered by
    #: ``box_jitter``); inference uses the box the LLM writes, and an object whose answer holds
    #: no box is prompted by its [SEG] alone (``box_failure_rate``). Needs a decoder that takes boxes.
    answer_boxes: bool = False
    #: Longest generated box at inference (``answer_boxes``).
    box_tokens: int = 40


@dataclass
class SemanticSegConfig(TextSegConfig):
    #: Most class names (hence [SEG] tokens) in one prompt; evaluation chunks longer lists.
    max_classes: int = 4
    #: With ``answer_boxes``: at inference each class's answer is forced up to the opening "["
    #: of its box, so the LLM always writes a box (it chooses the numbers). Without it the LLM
    #: may end the answer or write [SEG] without a box, and the class is prompted by its [SEG]
    #: alone; forcing also means an absent class still gets a box.
    force_box: bool = False


@dataclass
class ReferringSegConfig(TextSegConfig):
    #: Longest generated answer at evaluation.
    max_new_tokens: int = 64


@dataclass
class InteractiveSegConfig(SegTaskConfig):
    #: Add the object's name as text ("Segment the {names}." with a forced [SEG]); needs an LLM.
    use_text: bool = False
    #: Objects (label classes) prompted per volume in one decoder pass.
    max_objects: int = 1
    #: Prompt kinds drawn per training object.
    train_prompts: list[str] = field(default_factory=lambda: list(TRAIN_PROMPTS))
    #: Training clicks per object: 1..max_positive inside, 0..max_negative outside.
    max_positive: int = 3
    max_negative: int = 2
    #: Negative clicks lie outside the object within this many voxels of it.
    negative_margin: int = 3
    #: Click counts at which evaluation reports Dice (clicks at the largest error region).
    eval_clicks: list[int] = field(default_factory=lambda: [1, 3, 5])


# -- prompt text -----------------------------------------------------------------------------
def seg_list(names: Sequence[str], boxes: Sequence[str | None] | None = None) -> str:
    """``["a", "b"]`` -> ``"a [SEG], b [SEG]"``: one [SEG] per object, in order; with ``boxes``
    (box texts, None for none) each [SEG] follows its object's box: ``"a [0.1, ...] [SEG], b [SEG]"``."""
    boxes = list(boxes) if boxes is not None else [None] * len(names)
    if len(boxes) != len(names):
        raise InputError(f"got {len(names)} object names but {len(boxes)} boxes")
    return ", ".join(f"{n} {b} {SEG_TOKEN}" if b else f"{n} {SEG_TOKEN}" for n, b in zip(names, boxes))


def box_text(mask: np.ndarray) -> str | None:
    """A model-grid mask's box as answer text (grounding's normalised form); None when empty."""
    box = normalised_box(mask)
    return None if box is None else box_to_text(box)


def text_box_voxels(text: str, shape: Sequence[int]) -> np.ndarray | None:
    """The first box written in ``text`` (normalised corners) as inclusive voxel bounds on a grid
    of ``shape``; None when the text holds no valid box."""
    box = parse_box_text(text)
    if box is None:
        return None
    size = np.asarray(shape, dtype=np.float64)
    lo = np.clip(np.rint(box[:3] * size), 0, size - 1)
    hi = np.clip(np.rint(box[3:] * size) - 1, lo, size - 1)
    return np.concatenate([lo, hi]).astype(np.int64)


def metric_key(name: str) -> str:
    """A class name as a metric-name part: ``"left thalamus"`` -> ``"left_thalamus"``."""
    return re.sub(r"[^0-9A-Za-z_.+-]+", "_", str(name)).strip("_") or "class"


# -- click and box simulation ----------------------------------------------------------------
def _interior_distance(mask: np.ndarray) -> np.ndarray:
    """Distance of each voxel of ``mask`` to the nearest voxel outside it (array borders count)."""
    from scipy.ndimage import distance_transform_edt

    padded = np.pad(mask.astype(bool), 1)
    return distance_transform_edt(padded)[1:-1, 1:-1, 1:-1]


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Tight inclusive box ``(d0, h0, w0, d1, h1, w1)`` of a non-empty mask."""
    idx = np.argwhere(mask)
    if not len(idx):
        raise InputError("cannot draw a box around an empty mask")
    return np.concatenate([idx.min(0), idx.max(0)]).astype(np.int64)


def jitter_box(mask: np.ndarray, rng: np.random.Generator, jitter: float) -> np.ndarray:
    """The mask's box with each side moved by up to ``jitter`` x the extent, kept in the volume."""
    box = mask_box(mask).astype(np.float64)
    extent = box[3:] - box[:3] + 1
    moved = box + rng.uniform(-jitter, jitter, size=6) * np.concatenate([extent, extent])
    lo = np.clip(np.rint(moved[:3]), 0, np.asarray(mask.shape) - 1)
    hi = np.clip(np.rint(moved[3:]), 0, np.asarray(mask.shape) - 1)
    return np.concatenate([np.minimum(lo, hi), np.maximum(lo, hi)]).astype(np.int64)


def simulate_clicks(
    mask: np.ndarray, rng: np.random.Generator, num_positive: int, num_negative: int, margin: int
) -> tuple[np.ndarray, np.ndarray]:
    """Training clicks ``(N, 3)`` and labels ``(N,)`` for one object.

    Positives are interior voxels drawn with probability proportional to their distance from
    the edge (users click inside, not on the boundary); negatives are background voxels within
    ``margin`` voxels of the object (where a user corrects a leak).
    """
    from scipy.ndimage import distance_transform_edt

    mask = mask.astype(bool)
    box = mask_box(mask)
    pad = margin + 1
    lo = np.maximum(box[:3] - pad, 0)
    hi = np.minimum(box[3:] + pad + 1, mask.shape)
    crop = mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    inside = _interior_distance(crop)
    fg = np.flatnonzero(crop)
    weight = inside.flat[fg]
    pos = rng.choice(fg, size=num_positive, replace=len(fg) < num_positive, p=weight / weight.sum())
    points = [np.stack(np.unravel_index(pos, crop.shape), 1)]
    labels = [np.ones(num_positive, dtype=np.int64)]
    if num_negative > 0:
        ring = np.flatnonzero((~crop) & (distance_transform_edt(~crop) <= margin))
        if len(ring):
            neg = rng.choice(ring, size=num_negative, replace=len(ring) < num_negative)
            points.append(np.stack(np.unravel_index(neg, crop.shape), 1))
            labels.append(np.zeros(num_negative, dtype=np.int64))
    return np.concatenate(points) + lo, np.concatenate(labels)


def next_click(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, int] | None:
    """The evaluation click: the centre of the largest error region, or None without errors.

    False negatives and false positives are split into connected components separately; the
    click goes to the voxel of the largest component farthest from its edge. It is positive
    (label 1) in a missed region and negative (label 0) in a leaked one.
    """
    from scipy.ndimage import label as components

    pred, target = pred.astype(bool), target.astype(bool)
    best: tuple[int, np.ndarray, int] | None = None
    for region, click_label in ((target & ~pred, 1), (pred & ~target, 0)):
        if not region.any():
            continue
        labelled, count = components(region)
        sizes = np.bincount(labelled.ravel())[1:]
        largest = int(np.argmax(sizes))
        if best is None or sizes[largest] > best[0]:
            best = (int(sizes[largest]), labelled == largest + 1, click_label)
    if best is None:
        return None
    _, region, click_label = best
    centre = np.unravel_index(int(np.argmax(_interior_distance(region))), region.shape)
    return np.asarray(centre, dtype=np.int64), click_label


# -- grids and scoring -----------------------------------------------------------------------
def file_spacing(record: Any) -> list[float]:
    """Voxel size (mm) of the original file, in its own index order."""
    return [float(v) for v in np.linalg.norm(np.asarray(record.original_affine)[:3, :3], axis=0)]


def model_spacing(record: Any) -> list[float]:
    """Voxel size (mm) of the model grid, in ``(d, h, w)`` order."""
    grid = np.linalg.norm(np.asarray(record.model_affine)[:3, :3], axis=0)
    return [float(grid[a]) for a in record.permutation]


def _as_label_map(label: Any) -> np.ndarray:
    """A label file as an integer map; one channel per class (M3D-Seg) becomes values c + 1."""
    array = np.asarray(label)
    if array.ndim == 4:
        array = np.where(array.any(0), array.argmax(0) + 1, 0)
    return np.rint(array).astype(np.int64)


def object_scores(output: DecoderOutput, probs: torch.Tensor, threshold: float) -> list[float]:
    """Per object: sigmoid of the best slice's object score when the decoder has one, else the
    mean probability inside the predicted mask (0 for an empty mask)."""
    if output.object_score is not None:
        return [float(v) for v in output.object_score[0].amax(-1).sigmoid().tolist()]
    fg = probs > threshold
    inside = (probs * fg).flatten(1).sum(1) / fg.flatten(1).sum(1).clamp_min(1)
    return [float(v) for v in inside.tolist()]


def _masked(output: DecoderOutput, valid: torch.Tensor) -> DecoderOutput:
    """Only the filled object slots, as one batch of N objects ``(1, N, ...)``."""

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[valid][None]

    return DecoderOutput(
        masks=output.masks[valid][None], iou_pred=pick(output.iou_pred), object_score=pick(output.object_score), boxes=pick(output.boxes)
    )


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _check_volume(volume: torch.Tensor) -> None:
    if not isinstance(volume, torch.Tensor) or volume.ndim != 5 or volume.shape[:2] != (1, 1):
        shape = tuple(volume.shape) if isinstance(volume, torch.Tensor) else type(volume).__name__
        raise InputError(f"infer: expected one volume of shape (1, 1, D, H, W), got {shape}")


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _on(prompts: Prompts | None, device: torch.device) -> Prompts:
    """``prompts`` (or none) with every tensor on ``device``."""
    if prompts is None:
        return Prompts()

    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device)

    return replace(prompts, **{f.name: move(getattr(prompts, f.name)) for f in fields(prompts)})


# -- the shared base -------------------------------------------------------------------------
class _SegmentationTask(MedVLTask):
    """Data, targets, losses and scoring shared by the three segmentation tasks."""

    config_class: ClassVar[type] = SegTaskConfig
    main_metric: ClassVar[str] = "mean_dice"
    #: Whether the task needs the LLM (and a decoder that accepts text prompts).
    needs_text: ClassVar[bool] = True
    #: Prompt kinds whose templates must hold a field (e.g. the [SEG] list of forced answers).
    required_fields: ClassVar[dict[str, str]] = {}

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self._labels: dict[tuple[Any, ...], np.ndarray] = {}

    @classmethod
    def check_config(cls, cfg: Any, path: str = "task") -> None:
        super().check_config(cfg, path)
        if cfg.metrics_grid not in METRIC_GRIDS:
            raise ConfigError(f"config: {path}.metrics_grid: '{cfg.metrics_grid}' is not one of {', '.join(METRIC_GRIDS)}")
        if not 0.0 < cfg.threshold < 1.0:
            raise ConfigError(f"config: {path}.threshold: expected a probability in (0, 1), got {cfg.threshold}")
        if cfg.seg_weight < 0 or getattr(cfg, "lm_weight", 0.0) < 0:
            raise ConfigError(f"config: {path}: loss weights must be non-negative")
        if cfg.nsd_tolerance_mm < 0:
            raise ConfigError(f"config: {path}.nsd_tolerance_mm: must be non-negative")
        if not 0.0 <= cfg.box_jitter < 1.0:
            raise ConfigError(f"config: {path}.box_jitter: expected a fraction in [0, 1), got {cfg.box_jitter}")
        if getattr(cfg, "answer_boxes", False) and cfg.box_tokens < 1:
            raise ConfigError(f"config: {path}.box_tokens: expected at least 1, got {cfg.box_tokens}")
        if getattr(cfg, "force_box", False) and not cfg.answer_boxes:
            raise ConfigError(f"config: {path}.force_box: forces the box an answer writes, so it needs answer_boxes: true")
        for kind, needed in cls.required_fields.items():
            for template in (cfg.prompts or {}).get(kind) or []:
                if "{" + needed + "}" not in template:
                    raise ConfigError(f"config: {path}.prompts.{kind}: template {template!r} must contain {{{needed}}}")

    def configure_losses(self) -> None:
        self.seg_loss = SegmentationLoss(self.cfg.loss)

    def configure_heads(self, model: Any) -> None:
        name = type(self).__name__
        if getattr(model, "decoder", None) is None:
            raise ConfigError(f"config: model.decoder: {name} needs a mask decoder")
        if self.uses_text and getattr(model, "trunk", None) is None:
            raise ConfigError(f"config: model.llm: {name} needs the LLM (its [SEG] tokens prompt the decoder)")
        if self.uses_text and "text" not in model.decoder.accepts:
            raise ConfigError(f"config: model.decoder: {type(model.decoder).__name__} takes no text prompts, which {name} needs")
        if getattr(self.cfg, "answer_boxes", False) and "boxes" not in model.decoder.accepts:
            raise ConfigError(
                f"config: model.decoder: {type(model.decoder).__name__} takes no box prompts, which {name}.answer_boxes needs"
            )

    @property
    def uses_text(self) -> bool:
        return self.needs_text

    # -- data --------------------------------------------------------------------------------
    def samples(self, split: str) -> Sequence[dict[str, Any]]:
        """Samples with a label file (the others can be neither trained nor scored)."""
        records = self.records(split)
        kept = [r for r in records if r.get("label")]
        if len(kept) < len(records):
            log.warning("%s: %d %s sample(s) without a label left out", type(self).__name__, len(records) - len(kept), split)
        return kept

    def object_names(self, sample: dict[str, Any]) -> dict[int, str]:
        """Label value -> name of the objects a sample can prompt."""
        names = {int(k): str(v) for k, v in (sample.get("labels") or {}).items()}
        if not names and "mask_id" in sample:
            return {1: "target"}
        return names

    def prepare_label(self, label: np.ndarray) -> np.ndarray:
        """Hook: the label map a task scores against (referring binarises it)."""
        return label

    def model_label(self, sample: dict[str, Any], record: Any) -> np.ndarray:
        """The sample's label map on the model grid ``(D, H, W)`` (cached with the volumes)."""
        key = (sample["label"], sample.get("mask_id"), sample["image"])
        if key in self._labels:
            return self._labels[key]
        label = self.prepare_label(self.label_on_model_grid(sample, record))
        if self.cfg.cache_volumes:
            self._labels[key] = label
        return label

    def file_label(self, sample: dict[str, Any], record: Any) -> np.ndarray:
        """The sample's label map on the original file grid, checked against the image's shape."""
        from medvlsam2.plugins.tasks.data.base import load_volume

        label = self.prepare_label(_as_label_map(load_volume(sample, "label")))
        if tuple(label.shape) != tuple(record.original_shape):
            raise InputError(
                f"{sample.get('source', sample['label'])}: label shape {tuple(label.shape)} differs from the image's {tuple(record.original_shape)}"
            )
        return label

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        volume, records = self.stack_volumes(samples)
        labels = [self.model_label(s, r) for s, r in zip(samples, records)]
        names = [self.object_names(s) for s in samples]
        present = []
        wanted = set(getattr(self.cfg, "classes", None) or [])
        for label, named in zip(labels, names):
            values = set(np.unique(label).tolist()) - {0}
            if wanted:
                values = {v for v in values if named.get(v) in wanted}
            present.append([v for v in sorted(values) if v in named] if named else sorted(values))
        return {
            "volume": volume,
            "label": labels,
            "present": present,
            "label_names": names,
            "records": records,
            "samples": samples,
            "ids": [s["id"] for s in samples],
            "spacing": [model_spacing(r) for r in records],
        }

    def _name(self, names: dict[int, str], value: int) -> str:
        return names.get(value, f"label {value}")

    @staticmethod
    def targets(labels: Sequence[np.ndarray], values: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
        """Binary targets ``(B, K, D, H, W)``; K = the most objects of any sample, the rest zero."""
        k = max((len(v) for v in values), default=0)
        out = torch.zeros(len(labels), k, *labels[0].shape, device=device)
        for i, (label, vals) in enumerate(zip(labels, values)):
            for j, v in enumerate(vals):
                out[i, j] = torch.from_numpy(label == v).to(device)
        return out

    def _rng(self) -> np.random.Generator:
        """A numpy generator drawn from torch's stream, which the engine seeds per epoch."""
        return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))

    # -- text -> [SEG] embeddings ------------------------------------------------------------
    def fill(self, kind: str, **fields: str) -> str:
        template = self.template(kind)
        try:
            return template.format(**fields)
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(
                f"config: prompts.{kind}: template {template!r} cannot be filled ({err}); fields: {', '.join(fields)}"
            ) from err

    @staticmethod
    def _clean(name: str) -> str:
        if SEG_TOKEN in name or IMAGE_TOKEN in name:
            raise InputError(f"object name {name!r} contains a special token ({SEG_TOKEN} or {IMAGE_TOKEN})")
        return name

    def forced_seg(
        self, model: Any, volume: torch.Tensor, names: Sequence[Sequence[str]],
        boxes: Sequence[Sequence[str | None]] | None = None,
    ) -> tuple[Any, list[str]]:
        """Teacher-forced pass whose answer is the forced ``[SEG]`` list (each after its box
        text, when ``boxes`` are given): K embeddings per sample."""
        prompts = [self.fill("prompt", names=join_names([self._clean(n) for n in ns])) for ns in names]
        boxes = boxes if boxes is not None else [None] * len(names)
        answers = [self.fill("answer", segs=seg_list(ns, bs)) for ns, bs in zip(names, boxes)]
        batch = model.trunk.tokenize(prompts, answer_prefix=answers)
        return model.trunk(volume, batch.input_ids, batch.attention_mask), answers

    def _training_boxes(self, rng: np.random.Generator, masks: Sequence[Sequence[np.ndarray]], device: torch.device) -> Prompts:
        """With ``answer_boxes``: each non-empty target's jittered box as a decoder prompt (an
        empty target gets none, as its answer writes none); otherwise no prompts."""
        if not getattr(self.cfg, "answer_boxes", False):
            return Prompts()
        objects = [[{"box": jitter_box(m, rng, self.cfg.box_jitter)} if m.any() else {} for m in row] for row in masks]
        return _object_prompts(objects, device)

    @staticmethod
    def _text_boxes(texts: Sequence[Sequence[str | None]], shape: Sequence[int], device: torch.device) -> Prompts:
        """Decoder box prompts ``(B, K, 6)`` from the box each object's text writes (a -1 row
        where it writes none; no boxes at all when none does)."""
        objects = [[{"box": text_box_voxels(t, shape) if t else None} for t in row] for row in texts]
        return _object_prompts(objects, device)

    # -- scoring -----------------------------------------------------------------------------
    def metric_targets(
        self, sample: dict[str, Any], record: Any, values: Sequence[int]
    ) -> tuple[np.ndarray, list[float]]:
        """Binary targets ``(K, ...)`` and spacing on the grid chosen by ``metrics_grid``."""
        if self.cfg.metrics_grid == "model":
            label, spacing = self.model_label(sample, record), model_spacing(record)
        else:
            label, spacing = self.file_label(sample, record), file_spacing(record)
        return np.stack([label == v for v in values]).astype(np.uint8), spacing

    def score(
        self, pred: np.ndarray, record: Any, targets: np.ndarray, spacing: Sequence[float], names: Sequence[str]
    ) -> dict[str, Any]:
        """Dice / NSD (/ HD95) per object of a binary model-grid prediction ``(K, D, H, W)``."""
        from medvlsam2.plugins.tasks.data.transforms import restore
        from medvlsam2.plugins.tasks.metrics import segmentation_metrics

        pred = pred.astype(np.uint8)
        if self.cfg.metrics_grid == "original":
            pred = restore(pred, record)
        return segmentation_metrics(
            pred, targets, spacing=spacing, class_names=list(names),
            tolerance_mm=self.cfg.nsd_tolerance_mm, hd95=self.cfg.hd95,
        )

    def _metric_names(self) -> tuple[str, ...]:
        return ("dice", "nsd", "hd95") if self.cfg.hd95 else ("dice", "nsd")

    # -- shared training tail ----------------------------------------------------------------
    def _seg_terms(self, output: DecoderOutput, target: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = self.seg_loss(_masked(output, valid), target[valid][None])
        return {("seg_loss" if k == "loss" else k): v for k, v in terms.items()}


# -- semantic --------------------------------------------------------------------------------
class SemanticSegTask(_SegmentationTask):
    """Class names -> K [SEG] tokens -> K masks in one pass; Dice, surface Dice."""

    config_class: ClassVar[type] = SemanticSegConfig
    trains: ClassVar[tuple[str, ...]] = ("projector", "lora", "seg_projector", "decoder")
    infer_prompts: ClassVar[frozenset[str]] = frozenset({"text", "points", "box"})
    default_prompts: ClassVar[dict[str, list[str]]] = {
        "prompt": [
            "Segment the {names}.",
            "Can you segment the {names} in this image?",
            "Please output the segmentation masks of the {names}.",
            "Where are the {names}? Please respond with segmentation masks.",
        ],
        "answer": ["{segs}.", "Sure, {segs}.", "Here they are: {segs}."],
    }
    required_fields: ClassVar[dict[str, str]] = {"answer": "segs"}

    @classmethod
    def check_config(cls, cfg: Any, path: str = "task") -> None:
        super().check_config(cfg, path)
        if cfg.max_classes < 1:
            raise ConfigError(f"config: {path}.max_classes: expected at least 1, got {cfg.max_classes}")

    def object_names(self, sample: dict[str, Any]) -> dict[int, str]:
        names = super().object_names(sample)
        if not names:
            raise InputError(f"{sample.get('source', sample['id'])}: semantic_seg needs label names ('labels' in the dataset file)")
        return names

    def _choose(self, rng: np.random.Generator, present: list[int], named: dict[int, str]) -> list[int]:
        """A random subset of the classes present (1..max_classes, random order); when none is
        present, one absent class with an empty target, so the model learns empty masks too."""
        pool = present or sorted(named)
        count = int(rng.integers(1, min(self.cfg.max_classes, len(pool)) + 1)) if present else 1
        return [int(v) for v in rng.choice(pool, size=count, replace=False)]

    def training_step(self, model: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        rng = self._rng()
        values = [self._choose(rng, p, n) for p, n in zip(batch["present"], batch["label_names"])]
        names = [[self._clean(self._name(n, v)) for v in vs] for vs, n in zip(values, batch["label_names"])]
        masks = [[label == v for v in vs] for label, vs in zip(batch["label"], values)]
        boxes = [[box_text(m) for m in row] for row in masks] if self.cfg.answer_boxes else [None] * len(names)
        prompts = [self.fill("prompt", names=join_names(ns)) for ns in names]
        answers = [self.fill("answer", segs=seg_list(ns, bs)) for ns, bs in zip(names, boxes)]
        volume = batch["volume"]
        text = model.trunk.tokenize(prompts, answers)
        out = model.trunk(volume, text.input_ids, text.attention_mask, text.labels)
        counts = out.seg_mask.sum(1).tolist()
        if counts != [len(v) for v in values]:
            raise InputError(f"semantic_seg: answers hold {counts} [SEG] tokens, expected {[len(v) for v in values]}")
        target = self.targets(batch["label"], values, volume.device)
        prompts_dec = self._training_boxes(rng, masks, volume.device)
        prompts_dec.text_embeds = out.seg_embeds
        prompts_dec.valid = out.seg_mask  # samples with fewer classes pad the rest
        output = model.decoder(volume, prompts_dec, out.encoder_output)
        terms = self._seg_terms(output, target, out.seg_mask)
        terms["lm_loss"] = out.loss
        terms["loss"] = self.cfg.lm_weight * out.loss + self.cfg.seg_weight * terms["seg_loss"]
        return terms

    def _write_boxes(self, model: Any, volume: torch.Tensor, names: Sequence[str]) -> list[str | None]:
        """Each name's box as the LLM writes it (``answer_boxes``): one prompt per name, the
        answer forced up to the name (and with ``force_box`` the box's "[") and generated from
        there; None where it writes no valid box."""
        head = self.template("answer").split("{segs}")[0]
        prompts = [self.fill("prompt", names=n) for n in names]
        # without force_box, no trailing space: the answers trained on tokenise the space with the "["
        bracket = " [" if self.cfg.force_box else ""
        gen = model.trunk.generate(
            volume.expand(len(names), *volume.shape[1:]), prompts,
            answer_prefix=[f"{head}{n}{bracket}" for n in names], max_new_tokens=self.cfg.box_tokens,
        )
        boxes = [parse_box_text(bracket.strip() + t.split(SEG_TOKEN)[0]) for t in gen.text]
        return [None if b is None else box_to_text(b) for b in boxes]

    def _segment(self, model: Any, volume: torch.Tensor, names: Sequence[str], prompts: Prompts | None = None) -> dict[str, Any]:
        """Masks for ``names`` with their [SEG]s forced, in chunks of ``max_classes``; with
        ``answer_boxes`` each [SEG] follows the box the LLM wrote, which prompts the decoder too
        (a user's points or box replace it)."""
        probs, scores, texts, missing = [], [], [], 0
        step = self.cfg.max_classes
        written = self._write_boxes(model, volume, names) if self.cfg.answer_boxes else None
        for start in range(0, len(names), step):
            chunk = list(names[start : start + step])
            boxes = written[start : start + step] if written else None
            out, answers = self.forced_seg(model, volume, [chunk], [boxes] if boxes else None)
            extra = _on(prompts, volume.device)
            if prompts is None and boxes:
                extra = self._text_boxes([boxes], volume.shape[-3:], volume.device)
                missing += sum(b is None for b in boxes)
            dec = model.decoder(
                volume,
                replace(extra, text_embeds=out.seg_embeds),
                out.encoder_output,
            )
            p = dec.masks[0].float().sigmoid()
            probs.append(p)
            scores += object_scores(dec, p, self.cfg.threshold)
            texts.append(answers[0])
        return {
            "masks": torch.cat(probs).cpu().numpy(), "text": " ".join(texts), "names": list(names), "scores": scores,
            "boxes_missing": missing,
        }

    def predict_step(self, model: Any, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """Every class present, in label order, scored per class (empty volumes give no scores)."""
        results = []
        for i, sample in enumerate(batch["samples"]):
            values = batch["present"][i]
            names = [self._name(batch["label_names"][i], v) for v in values]
            result: dict[str, Any] = {"id": sample["id"], "names": names}
            if values:
                record = batch["records"][i]
                out = self._segment(model, batch["volume"][i : i + 1], names)
                targets, spacing = self.metric_targets(sample, record, values)
                scores = self.score(out["masks"] > self.cfg.threshold, record, targets, spacing, names)
                result.update({m: scores[m] for m in self._metric_names()}, text=out["text"], boxes_missing=out["boxes_missing"])
            results.append(result)
        return results

    def compute_metrics(self, predictions: list[dict[str, Any]]) -> dict[str, float]:
        """Per class: the mean over cases; ``mean_*``: the mean over classes of those; with
        ``answer_boxes``, ``box_failure_rate``: the share of objects whose answer wrote no box."""
        out: dict[str, float] = {"num_cases": float(len(predictions))}
        if self.cfg.answer_boxes:
            objects = sum(len(p["names"]) for p in predictions if "boxes_missing" in p)
            out["box_failure_rate"] = sum(p.get("boxes_missing", 0) for p in predictions) / objects if objects else math.nan
        for metric in self._metric_names():
            per_class: dict[str, list[float]] = {}
            for pred in predictions:
                for name, value in (pred.get(metric) or {}).items():
                    per_class.setdefault(name, []).append(value)
            means = {name: _mean(vals) for name, vals in per_class.items()}
            for name, value in means.items():
                out[f"{metric}/{metric_key(name)}"] = value
            out[f"mean_{metric}"] = _mean(list(means.values()))
        return out

    def blind_predictions(self, split: str = "test", fit_split: str = "train") -> list[dict[str, Any]] | None:
        """An atlas: each class is where more than half of the training labels have it, on the
        model grid (needs one model grid shape for every volume)."""
        def names_of(sample: dict[str, Any], values: list[int]) -> list[str]:
            return [self._name(self.object_names(sample), v) for v in values]

        frequency: dict[str, np.ndarray] = {}
        count = 0
        for sample in self.samples(fit_split):
            batch = self.collate([sample])
            label = batch["label"][0]
            if count and label.shape != next(iter(frequency.values())).shape:
                return None
            count += 1
            for name, value in zip(names_of(sample, batch["present"][0]), batch["present"][0]):
                frequency[name] = frequency.get(name, np.zeros(label.shape, np.float32)) + (label == value)
        if not count:
            return None
        rows = []
        for sample in self.samples(split):
            batch = self.collate([sample])
            values, record = batch["present"][0], batch["records"][0]
            names = names_of(sample, values)
            row: dict[str, Any] = {"id": sample["id"], "names": names}
            if values:
                shape = batch["label"][0].shape
                pred = np.stack([frequency.get(n, np.zeros(shape, np.float32)) / count > 0.5 for n in names])
                if pred.shape[1:] != shape:
                    return None
                targets, spacing = self.metric_targets(sample, record, values)
                scores = self.score(pred, record, targets, spacing, names)
                row.update({m: scores[m] for m in self._metric_names()})
            rows.append(row)
        return rows

    def infer(
        self,
        model: Any,
        volume: torch.Tensor,
        *,
        text: str | None = None,
        points: np.ndarray | None = None,
        box: np.ndarray | None = None,
    ) -> dict[str, Any]:
        """``text``: class names separated by commas (default: every class the dataset names).

        Points / a box (model grid) may refine a single class.
        """
        _check_volume(volume)
        if text is not None:
            names = [n.strip() for n in text.split(",") if n.strip()]
            if not names:
                raise InputError("semantic_seg: --text names no class; give class names separated by commas")
        else:
            names = self.dataset_names()
        extra = visual_prompts(points, box, volume.shape[-3:])
        if extra is not None and len(names) != 1:
            raise InputError(f"semantic_seg: points or a box refine one class, got {len(names)} classes")
        with torch.no_grad():
            return self._segment(model, volume.to(_device(model)), [self._clean(n) for n in names], extra)

    def dataset_names(self) -> list[str]:
        """The class names of the configured dataset, in label order."""
        for split in ("train", "test", "validation"):
            try:
                reader = self.reader(split)
            except InputError:
                continue
            for sample in reader or []:
                names = super().object_names(sample)
                if names:
                    return [names[v] for v in sorted(names)]
        raise InputError("semantic_seg: no class names known; pass --text with class names")


# -- referring -------------------------------------------------------------------------------
class ReferringSegTask(_SegmentationTask):
    """A free-text description needing reasoning -> answer with [SEG] -> mask."""

    config_class: ClassVar[type] = ReferringSegConfig
    trains: ClassVar[tuple[str, ...]] = ("projector", "lora", "seg_projector", "decoder")
    infer_prompts: ClassVar[frozenset[str]] = frozenset({"text", "points", "box"})
    infer_needs: ClassVar[tuple[tuple[str, ...], ...]] = (("text",),)
    default_prompts: ClassVar[dict[str, list[str]]] = {
        "prompt": ["{question}", "{question} Please answer and output the segmentation mask."],
    }
    required_fields: ClassVar[dict[str, str]] = {"prompt": "question"}

    def samples(self, split: str) -> Sequence[dict[str, Any]]:
        kept = super().samples(split)
        if kept and not all(isinstance(s.get("question"), str) and isinstance(s.get("answer"), str) for s in kept):
            raise InputError(
                f"referring_seg: data format '{self.cfg.data.get('format')}' gives no question/answer per sample "
                "(use m3d_refseg or a reader with question, answer and label)"
            )
        return kept

    def object_names(self, sample: dict[str, Any]) -> dict[int, str]:
        return {1: "target"}

    def prepare_label(self, label: np.ndarray) -> np.ndarray:
        """The referred object: the ``Mask_ID`` mask, or any foreground when a reader gives no id."""
        return (label > 0).astype(np.int64)

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().collate(samples)
        batch["question"] = [s["question"] for s in samples]
        batch["answer"] = [s["answer"] for s in samples]
        return batch

    @staticmethod
    def with_seg(answer: str, box: str | None = None) -> str:
        """The training answer: the dataset's answer with ``[SEG]`` appended when it has none,
        and ``box`` (a box text) written just before its first ``[SEG]``."""
        answer = answer if SEG_TOKEN in answer else f"{answer.rstrip()} {SEG_TOKEN}"
        if not box:
            return answer
        head, tail = answer.split(SEG_TOKEN, 1)
        return f"{head.rstrip()} {box} {SEG_TOKEN}{tail}"

    def training_step(self, model: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        volume = batch["volume"]
        rng = self._rng()
        masks = [[label == 1] for label in batch["label"]]
        boxes = [box_text(row[0]) if self.cfg.answer_boxes else None for row in masks]
        prompts = [self.fill("prompt", question=q) for q in batch["question"]]
        text = model.trunk.tokenize(prompts, [self.with_seg(a, b) for a, b in zip(batch["answer"], boxes)])
        out = model.trunk(volume, text.input_ids, text.attention_mask, text.labels)
        valid = out.seg_mask[:, :1]  # the first [SEG] of each answer prompts the mask
        target = self.targets(batch["label"], [[1]] * len(batch["label"]), volume.device)
        prompts_dec = self._training_boxes(rng, masks, volume.device)
        prompts_dec.text_embeds = out.seg_embeds[:, :1]
        output = model.decoder(volume, prompts_dec, out.encoder_output)
        terms = self._seg_terms(output, target, valid)
        terms["lm_loss"] = out.loss
        terms["loss"] = self.cfg.lm_weight * out.loss + self.cfg.seg_weight * terms["seg_loss"]
        return terms

    def _answer(self, model: Any, volume: torch.Tensor, questions: Sequence[str], extra: Prompts | None = None) -> dict[str, Any]:
        """Generate; a sample whose answer has no [SEG] gets one appended (a teacher-forced pass)."""
        prompts = [self.fill("prompt", question=q) for q in questions]
        gen = model.trunk.generate(volume, prompts, max_new_tokens=self.cfg.max_new_tokens)
        embeds = torch.zeros(len(prompts), 1, model.trunk.prompt_dim, device=volume.device)
        texts = list(gen.text)
        forced = [not bool(row.any()) for row in gen.seg_mask] if gen.seg_mask.shape[1] else [True] * len(prompts)
        for i, f in enumerate(forced):
            if not f:
                embeds[i, 0] = gen.seg_embeds[i, 0]
        missing = [i for i, f in enumerate(forced) if f]
        if missing:
            texts_missing = [self.with_seg(texts[i].replace(IMAGE_TOKEN, "")) for i in missing]
            batch = model.trunk.tokenize([prompts[i] for i in missing], answer_prefix=texts_missing)
            out = model.trunk(volume[missing], batch.input_ids, batch.attention_mask)
            for j, i in enumerate(missing):
                embeds[i, 0] = out.seg_embeds[j, 0]
                texts[i] = texts_missing[j]
        boxed = [parse_box_text(t.split(SEG_TOKEN)[0]) is not None for t in texts]
        if extra is None and self.cfg.answer_boxes:  # the box the answer wrote before its [SEG]
            extra = self._text_boxes([[t.split(SEG_TOKEN)[0]] for t in texts], volume.shape[-3:], volume.device)
        extra = _on(extra, volume.device)
        dec = model.decoder(
            volume,
            replace(extra, text_embeds=embeds),
            model.encoder(volume),
        )
        probs = dec.masks[:, 0].float().sigmoid()
        return {"probs": probs, "text": texts, "forced": forced, "boxed": boxed, "output": dec}

    def predict_step(self, model: Any, batch: dict[str, Any]) -> list[dict[str, Any]]:
        out = self._answer(model, batch["volume"], batch["question"])
        results = []
        for i, sample in enumerate(batch["samples"]):
            record = batch["records"][i]
            targets, spacing = self.metric_targets(sample, record, [1])
            pred = (out["probs"][i : i + 1] > self.cfg.threshold).cpu().numpy()
            scores = self.score(pred, record, targets, spacing, ["target"])
            results.append({
                "id": sample["id"],
                "question": sample["question"],
                "answer": sample["answer"],
                "text": out["text"][i],
                "forced": out["forced"][i],
                "boxed": out["boxed"][i],
                "question_type": sample.get("question_type"),
                **{m: scores[m]["target"] for m in self._metric_names()},
            })
        return results

    def compute_metrics(self, predictions: list[dict[str, Any]]) -> dict[str, float]:
        """Mean Dice / NSD, per question type when the data has types, and ``forced_seg_rate``."""
        out: dict[str, float] = {"num_cases": float(len(predictions))}
        for metric in self._metric_names():
            out[f"mean_{metric}"] = _mean([p[metric] for p in predictions])
        types = sorted({str(p["question_type"]) for p in predictions if p.get("question_type")})
        for qtype in types:
            out[f"dice/{metric_key(qtype)}"] = _mean([p["dice"] for p in predictions if str(p.get("question_type")) == qtype])
        out["forced_seg_rate"] = float(np.mean([bool(p["forced"]) for p in predictions])) if predictions else math.nan
        if self.cfg.answer_boxes:
            out["box_failure_rate"] = float(np.mean([not p.get("boxed", False) for p in predictions])) if predictions else math.nan
        return out

    def infer(
        self,
        model: Any,
        volume: torch.Tensor,
        *,
        text: str | None = None,
        points: np.ndarray | None = None,
        box: np.ndarray | None = None,
    ) -> dict[str, Any]:
        """``text`` is the question (required); the answer comes back with the mask."""
        _check_volume(volume)
        if not text or not text.strip():
            raise InputError("referring_seg: pass the question as text (e.g. --text 'Where is the lesion?')")
        extra = visual_prompts(points, box, volume.shape[-3:])
        with torch.no_grad():
            out = self._answer(model, volume.to(_device(model)), [text.strip()], extra)
        return {
            "masks": out["probs"].cpu().numpy(),
            "text": out["text"][0],
            "names": ["target"],
            "scores": object_scores(out["output"], out["probs"], self.cfg.threshold),
        }


# -- interactive -----------------------------------------------------------------------------
def visual_prompts(points: np.ndarray | None, box: np.ndarray | None, shape: Sequence[int]) -> Prompts | None:
    """One object's points ``(N, 4)`` (d, h, w, label) and/or box ``(6,)`` as ``Prompts`` (B = K = 1)."""
    if points is None and box is None:
        return None
    pts = lbl = bx = None
    if points is not None:
        arr = np.asarray(points, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != 4 or not len(arr):
            raise InputError(f"points: expected (N, 4) rows of d, h, w, label, got shape {arr.shape}")
        if not set(np.unique(arr[:, 3]).tolist()) <= {0.0, 1.0}:
            raise InputError("points: labels must be 1 (foreground) or 0 (background)")
        pts = torch.from_numpy(arr[:, :3]).float()[None, None]
        lbl = torch.from_numpy(arr[:, 3]).long()[None, None]
    if box is not None:
        arr = np.asarray(box, dtype=np.float64).reshape(-1)
        if arr.shape != (6,):
            raise InputError(f"box: expected 6 numbers (d0, h0, w0, d1, h1, w1), got {arr.size}")
        bx = torch.from_numpy(arr).float()[None, None]
    prompts = Prompts(points=pts, point_labels=lbl, boxes=bx)
    prompts.validate((1, 1, *shape))
    return prompts


def _object_prompts(objects: Sequence[Sequence[dict[str, Any]]], device: torch.device) -> Prompts:
    """``objects[b][k] = {"points": (P, 3) | None, "labels": (P,), "box": (6,) | None}`` -> padded ``Prompts``."""
    b, k = len(objects), max(len(o) for o in objects)
    with_points = any(o.get("points") is not None for row in objects for o in row)
    with_box = any(o.get("box") is not None for row in objects for o in row)
    p = max((len(o["points"]) for row in objects for o in row if o.get("points") is not None), default=1)
    points = torch.zeros(b, k, p, 3, device=device)
    labels = torch.full((b, k, p), -1, dtype=torch.long, device=device)
    boxes = torch.full((b, k, 6), -1.0, device=device)
    for i, row in enumerate(objects):
        for j, obj in enumerate(row):
            if obj.get("points") is not None and len(obj["points"]):
                n = len(obj["points"])
                points[i, j, :n] = torch.as_tensor(np.asarray(obj["points"]), dtype=torch.float32, device=device)
                labels[i, j, :n] = torch.as_tensor(np.asarray(obj["labels"]), dtype=torch.long, device=device)
            if obj.get("box") is not None:
                boxes[i, j] = torch.as_tensor(np.asarray(obj["box"]), dtype=torch.float32, device=device)
    return Prompts(
        points=points if with_points else None,
        point_labels=labels if with_points else None,
        boxes=boxes if with_box else None,
    )


class InteractiveSegTask(_SegmentationTask):
    """3D points and boxes (optionally text) -> mask; Dice after 1, 3 and 5 simulated clicks."""

    config_class: ClassVar[type] = InteractiveSegConfig
    trains: ClassVar[tuple[str, ...]] = ("decoder",)
    infer_prompts: ClassVar[frozenset[str]] = frozenset({"text", "points", "box"})
    infer_needs: ClassVar[tuple[tuple[str, ...], ...]] = (("points", "box"),)
    needs_text: ClassVar[bool] = False
    default_prompts: ClassVar[dict[str, list[str]]] = {
        "prompt": ["Segment the {names}."],
        "answer": ["{segs}."],
    }
    required_fields: ClassVar[dict[str, str]] = {"answer": "segs"}

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        if cfg.use_text:  # the [SEG] embeddings then come from the LLM, which must learn them
            self.trains = ("decoder", "seg_projector", "lora")

    @classmethod
    def check_config(cls, cfg: Any, path: str = "task") -> None:
        super().check_config(cfg, path)
        bad = [m for m in cfg.train_prompts if m not in TRAIN_PROMPTS]
        if bad or not cfg.train_prompts:
            raise ConfigError(f"config: {path}.train_prompts: expected a non-empty list of {', '.join(TRAIN_PROMPTS)}, got {list(cfg.train_prompts)}")
        if cfg.max_objects < 1 or cfg.max_positive < 1 or cfg.max_negative < 0 or cfg.negative_margin < 1:
            raise ConfigError(f"config: {path}: max_objects, max_positive and negative_margin must be >= 1, max_negative >= 0")
        if not cfg.eval_clicks or any(c < 1 for c in cfg.eval_clicks):
            raise ConfigError(f"config: {path}.eval_clicks: expected positive click counts, got {list(cfg.eval_clicks)}")

    @property
    def uses_text(self) -> bool:
        return bool(self.cfg.use_text)

    def configure_heads(self, model: Any) -> None:
        super().configure_heads(model)
        accepts = model.decoder.accepts
        kinds = {k for mode in self.cfg.train_prompts for k in mode.split("+")}
        missing = {"points" if k == "points" else "boxes" for k in kinds} - set(accepts)
        if missing:
            raise ConfigError(
                f"config: model.decoder: {type(model.decoder).__name__} takes no {', '.join(sorted(missing))} prompts; "
                "change interactive_seg.train_prompts"
            )

    def _text_embeds(self, model: Any, volume: torch.Tensor, names: Sequence[Sequence[str]]) -> tuple[torch.Tensor | None, Any]:
        if not self.cfg.use_text:
            return None, None
        out, _ = self.forced_seg(model, volume, names)
        return out.seg_embeds, out.encoder_output

    def _train_object(self, rng: np.random.Generator, mask: np.ndarray) -> dict[str, Any]:
        mode = self.cfg.train_prompts[int(rng.integers(len(self.cfg.train_prompts)))]
        obj: dict[str, Any] = {}
        if "points" in mode:
            pos = int(rng.integers(1, self.cfg.max_positive + 1))
            neg = int(rng.integers(0, self.cfg.max_negative + 1))
            obj["points"], obj["labels"] = simulate_clicks(mask, rng, pos, neg, self.cfg.negative_margin)
        if "box" in mode:
            obj["box"] = jitter_box(mask, rng, self.cfg.box_jitter)
        return obj

    def training_step(self, model: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        rng = self._rng()
        volume = batch["volume"]
        values = []
        for present in batch["present"]:
            if not present:
                raise InputError("interactive_seg: a training volume has no labelled object")
            count = min(self.cfg.max_objects, len(present))
            values.append([int(v) for v in rng.choice(present, size=count, replace=False)])
        objects = [[self._train_object(rng, label == v) for v in vs] for label, vs in zip(batch["label"], values)]
        prompts = _object_prompts(objects, volume.device)
        names = [[self._name(n, v) for v in vs] for vs, n in zip(values, batch["label_names"])]
        text, encoder_output = self._text_embeds(model, volume, names)
        if text is not None:
            prompts.text_embeds = text
        valid = torch.zeros(len(values), prompts.num_objects, dtype=torch.bool, device=volume.device)
        for i, vs in enumerate(values):
            valid[i, : len(vs)] = True
        prompts.valid = valid
        output = model.decoder(volume, prompts, encoder_output)
        terms = self._seg_terms(output, self.targets(batch["label"], values, volume.device), valid)
        terms["loss"] = self.cfg.seg_weight * terms["seg_loss"]
        return terms

    def _decode(self, model: Any, volume: torch.Tensor, prompts: Prompts, text: torch.Tensor | None, encoder_output: Any) -> tuple[torch.Tensor, DecoderOutput]:
        prompts.text_embeds = text
        out = model.decoder(volume, prompts, encoder_output)
        return out.masks[0].float().sigmoid(), out

    def _dice(
        self, probs: torch.Tensor, record: Any, targets: np.ndarray, spacing: list[float], names: list[str]
    ) -> dict[str, float]:
        pred = (probs > self.cfg.threshold).cpu().numpy()
        return self.score(pred, record, targets, spacing, names)["dice"]

    def predict_step(self, model: Any, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """Per object: Dice with the tight box alone, then after each click of the click protocol."""
        rounds = sorted(set(int(c) for c in self.cfg.eval_clicks))
        results = []
        for i, sample in enumerate(batch["samples"]):
            record, label = batch["records"][i], batch["label"][i]
            volume = batch["volume"][i : i + 1]
            result: dict[str, Any] = {"id": sample["id"], "dice_box": {}, **{f"dice_click{r}": {} for r in rounds}}
            present = batch["present"][i]
            for start in range(0, len(present), self.cfg.max_objects):
                values = present[start : start + self.cfg.max_objects]
                names = [self._name(batch["label_names"][i], v) for v in values]
                masks = [label == v for v in values]
                targets, spacing = self.metric_targets(sample, record, values)
                text, enc = self._text_embeds(model, volume, [names])
                scoring = (record, targets, spacing, names)
                box_prompts = _object_prompts([[{"box": mask_box(m)} for m in masks]], volume.device)
                result["dice_box"].update(self._dice(self._decode(model, volume, box_prompts, text, enc)[0], *scoring))
                clicks: list[list[tuple[np.ndarray, int]]] = [[] for _ in values]
                pred = [np.zeros_like(m) for m in masks]
                for r in range(1, rounds[-1] + 1):
                    for k, m in enumerate(masks):
                        click = next_click(pred[k], m)
                        if click is not None:
                            clicks[k].append(click)
                    objects = [[{
                        "points": np.stack([c for c, _ in cl]) if cl else None,
                        "labels": np.asarray([lab for _, lab in cl]) if cl else None,
                    } for cl in clicks]]
                    probs, _ = self._decode(model, volume, _object_prompts(objects, volume.device), text, enc)
                    pred = list((probs > self.cfg.threshold).cpu().numpy())
                    if r in rounds:
                        result[f"dice_click{r}"].update(self._dice(probs, *scoring))
            results.append(result)
        return results

    def compute_metrics(self, predictions: list[dict[str, Any]]) -> dict[str, float]:
        """Mean Dice over every object of every case; ``mean_dice`` is the Dice after the most clicks."""
        rounds = sorted(set(int(c) for c in self.cfg.eval_clicks))
        out: dict[str, float] = {"num_cases": float(len(predictions))}
        for key in ["dice_box", *[f"dice_click{r}" for r in rounds]]:
            out[key] = _mean([v for p in predictions for v in p.get(key, {}).values()])
        out["mean_dice"] = out[f"dice_click{rounds[-1]}"]
        return out

    def infer(
        self,
        model: Any,
        volume: torch.Tensor,
        *,
        text: str | None = None,
        points: np.ndarray | None = None,
        box: np.ndarray | None = None,
    ) -> dict[str, Any]:
        """One object from points ``(N, 4)`` and/or a box ``(6,)`` on the model grid (+ its name as
        text when the task was trained with ``use_text``)."""
        _check_volume(volume)
        prompts = visual_prompts(points, box, volume.shape[-3:])
        if prompts is None:
            raise InputError("interactive_seg: give points or a box (e.g. --points 'i,j,k,1' or --box ...)")
        if text is not None and not self.cfg.use_text:
            raise InputError("interactive_seg: this model was trained without text (use_text: false); leave --text out")
        name = (text or "").strip() or "object"
        volume = volume.to(_device(model))
        prompts = _on(prompts, volume.device)
        with torch.no_grad():
            embeds, enc = self._text_embeds(model, volume, [[self._clean(name)]])
            probs, output = self._decode(model, volume, prompts, embeds, enc)
        return {
            "masks": probs.cpu().numpy(),
            "text": self.fill("answer", segs=seg_list([name])) if self.cfg.use_text else None,
            "names": [name],
            "scores": object_scores(output, probs, self.cfg.threshold),
        }
