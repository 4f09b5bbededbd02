"""3D visual grounding (as in M3D): referring expression comprehension and generation.

* REC — a description in, a box out as text: ``[d0, h0, w0, d1, h1, w1]``, corners normalised
  to 0..1 on the model grid (2 decimals). Scored by 3D IoU and accuracy at IoU >= 0.5; an
  answer with no parseable box counts as IoU 0 (and in ``parse_failure_rate``).
* REG — a box in (written into the prompt the same way), the description out; scored with
  text metrics and exact match.
* With ``max_targets`` > 1, a training REC sample of a label map asks for 1..max_targets of the
  volume's structures at once and is answered ``the a [box], the b [box]``: one pass over the
  image and prompt teaches several boxes. Evaluation asks for one structure at a time.

Data: any reader whose samples carry a ``label`` mask with named labels (``nifti_json``: one
sample per named structure present, description "the {name}") or a referring sample
(``m3d_refseg``: its question is the description, its ``Mask_ID`` mask the target).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from medvlsam2.core.errors import ConfigError, InputError
from medvlsam2.plugins.tasks.base import TaskConfig, join_names
from medvlsam2.plugins.tasks.language import GenerationConfig, TrunkTextTask, score_text

NUMBER = r"[-+]?\d*\.?\d+"
BOX = re.compile(r"\[\s*" + r"\s*,\s*".join([f"({NUMBER})"] * 6) + r"\s*\]")


def box_to_text(box: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in box) + "]"


def parse_box_text(text: str) -> np.ndarray | None:
    """The first ``[a, b, c, d, e, f]`` in ``text`` with min <= max corners, else None."""
    match = BOX.search(text)
    if not match:
        return None
    box = np.array([float(g) for g in match.groups()])
    if (box[:3] > box[3:]).any():
        return None
    return box


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """Normalised ``(d0, h0, w0, d1, h1, w1)`` of a boolean mask; voxel edges, so a full mask is 0..1."""
    idx = np.argwhere(mask)
    if len(idx) == 0:
        return None
    shape = np.asarray(mask.shape, dtype=float)
    return np.concatenate([idx.min(0) / shape, (idx.max(0) + 1) / shape])


@dataclass
class GroundingConfig(TaskConfig):
    #: rec: description -> box; reg: box -> description; both: every target twice.
    mode: str = "both"
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=40))
    text_metrics: list[str] = field(default_factory=lambda: ["bleu", "rouge"])
    #: Label names to ground (nifti_json); empty = every named label present in the volume.
    structures: list[str] = field(default_factory=list)
    #: Training only: most structures one REC sample of a label map asks for (1..max_targets,
    #: drawn per sample); 1 = one box per answer, as evaluated.
    max_targets: int = 1


class GroundingTask(TrunkTextTask):
    config_class = GroundingConfig
    main_metric = "rec_acc@0.5"
    prompt_kind = "rec"
    default_prompts: ClassVar[dict[str, list[str]]] = {
        "rec": [
            "Where is {description}? Answer with a 3D box.",
            "Give the bounding box of {description}.",
        ],
        "reg": [
            "What is in the box {box}?",
            "Describe the region {box}.",
        ],
        "rec_many": [
            "Where are {descriptions}? Answer with a 3D box for each.",
            "Give the bounding boxes of {descriptions}.",
        ],
    }

    infer_prompts: ClassVar[frozenset[str]] = frozenset({"text"})
    infer_needs: ClassVar[tuple[tuple[str, ...], ...]] = (("text",),)

    def infer(self, model: Any, volume: torch.Tensor, *, text: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """``text`` names what to find ("the left thalamus"); it fills the REC prompt the model
        was trained with, and the answer is that structure's 3D box as text."""
        if not text or not text.strip():
            raise InputError("grounding: name what to find as text (e.g. --text 'the left thalamus')")
        prompt = self.templates("rec")[0].format(description=text.strip())
        return super().infer(model, volume, text=prompt, **kwargs)

    @classmethod
    def check_config(cls, cfg: Any, path: str = "task") -> None:
        super().check_config(cfg, path)
        if cfg.mode not in ("rec", "reg", "both"):
            raise ConfigError(f"config: {path}.mode: '{cfg.mode}' is not one of rec, reg, both")
        if cfg.max_targets < 1:
            raise ConfigError(f"config: {path}.max_targets: expected at least 1, got {cfg.max_targets}")

    def samples(self, split: str) -> list[dict[str, Any]]:
        out = []
        for record in self.records(split):
            targets = self._targets(record)
            for description, label_value in targets:
                for kind in ("rec", "reg"):
                    if self.cfg.mode in (kind, "both"):
                        out.append({**record, "kind": kind, "description": description, "label_value": label_value})
        return out

    def _targets(self, record: dict[str, Any]) -> list[tuple[str, int | None]]:
        if "question" in record and record.get("label"):
            return [(record["question"], None)]
        names = record.get("labels") or {}
        wanted = set(self.cfg.structures)
        return [(f"the {name}", int(value)) for value, name in sorted(names.items()) if not wanted or name in wanted]

    @staticmethod
    def _box(label: np.ndarray, value: int | None) -> np.ndarray | None:
        return mask_box(label > 0 if value is None else label == value)

    def _packed(self, sample: dict[str, Any], label: np.ndarray, box: np.ndarray) -> tuple[str, str] | None:
        """While training, with ``max_targets`` > 1: a prompt and answer for the sample's structure
        and up to max_targets - 1 others present in its label map, in random order; None for one."""
        own = sample["label_value"]
        if not self.training or own is None or self.cfg.max_targets == 1:
            return None
        present = set(np.unique(label).tolist())
        others = [(d, v) for d, v in self._targets(sample) if v != own and v in present]
        extra = random.sample(others, min(random.randint(1, self.cfg.max_targets) - 1, len(others)))
        if not extra:
            return None
        chosen = [(sample["description"], box), *((d, self._box(label, v)) for d, v in extra)]
        random.shuffle(chosen)
        prompt = self.template("rec_many").format(descriptions=join_names([d for d, _ in chosen]))
        return prompt, ", ".join(f"{d} {box_to_text(b)}" for d, b in chosen)

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        volumes, records = self.stack_volumes(samples)
        prompts, answers, boxes = [], [], []
        for sample, record in zip(samples, records):
            label = self.label_on_model_grid(sample, record)
            box = self._box(label, sample["label_value"])
            boxes.append(box)
            packed = self._packed(sample, label, box) if sample["kind"] == "rec" and box is not None else None
            if packed is not None:
                prompts.append(packed[0])
                answers.append(packed[1])
            elif sample["kind"] == "rec":
                prompts.append(self.template("rec").format(description=sample["description"]))
                answers.append(box_to_text(box) if box is not None else "Not present.")
            else:
                prompts.append(self.template("reg").format(box=box_to_text(box) if box is not None else "[]"))
                answers.append(sample["description"])
        return {"volume": volumes, "records": records, "prompts": prompts, "answers": answers, "boxes": boxes, "samples": samples}

    @torch.no_grad()
    def predict_step(self, model: Any, batch: dict[str, Any]) -> list[dict[str, Any]]:
        rows = super().predict_step(model, batch)
        for row, sample, box in zip(rows, batch["samples"], batch["boxes"]):
            row.update(kind=sample["kind"], target_box=box)
        return rows

    def blind_predictions(self, split: str = "test", fit_split: str = "train") -> list[dict[str, Any]] | None:
        """REC: the mean training box of the same description (an atlas prior); REG: the
        description of the training box that overlaps the prompt's box most."""
        from medvlsam2.plugins.tasks.metrics import box_iou_3d

        fitted = [(s, b) for s, _, _, b in self._collated(self.samples(fit_split)) if b is not None]
        if not fitted:
            return None
        by_text: dict[str, list[np.ndarray]] = {}
        for sample, box in fitted:
            by_text.setdefault(sample["description"], []).append(box)
        every = np.stack([b for _, b in fitted])
        rows = []
        for sample, prompt, answer, box in self._collated(self.samples(split)):
            if sample["kind"] == "rec":
                prediction = box_to_text(np.mean(by_text.get(sample["description"], every), axis=0))
            else:
                nearest = int(box_iou_3d(every, np.repeat(box[None], len(every), 0)).argmax()) if box is not None else 0
                prediction = fitted[nearest][0]["description"]
            rows.append({"id": sample["id"], "prompt": prompt, "prediction": prediction, "reference": answer,
                         "kind": sample["kind"], "target_box": box})
        return rows

    def _collated(self, samples: list[dict[str, Any]], chunk: int = 16) -> Iterator[tuple[dict[str, Any], str, str, np.ndarray | None]]:
        """``(sample, prompt, answer, target box)`` of each sample, through ``collate``."""
        for start in range(0, len(samples), chunk):
            batch = self.collate(samples[start : start + chunk])
            yield from zip(batch["samples"], batch["prompts"], batch["answers"], batch["boxes"])

    def compute_metrics(self, predictions: list[dict[str, Any]]) -> dict[str, float]:
        from medvlsam2.plugins.tasks.metrics import box_iou_3d

        out: dict[str, float] = {}
        rec = [p for p in predictions if p["kind"] == "rec" and p["target_box"] is not None]
        if rec:
            ious, failures = [], 0
            for p in rec:
                box = parse_box_text(p["prediction"])
                if box is None:
                    failures += 1
                    ious.append(0.0)
                else:
                    ious.append(float(box_iou_3d(box[None], np.asarray(p["target_box"])[None])[0]))
            iou = np.asarray(ious)
            out.update({"rec_iou": float(iou.mean()), "rec_acc@0.5": float((iou >= 0.5).mean()), "parse_failure_rate": failures / len(rec)})
        reg = [p for p in predictions if p["kind"] == "reg"]
        if reg:
            preds, refs = [p["prediction"] for p in reg], [p["reference"] for p in reg]
            out.update({f"reg_{k}": v for k, v in score_text(preds, refs, list(self.cfg.text_metrics)).items()})
            out["reg_exact_match"] = float(np.mean([a.strip(" .").lower() == b.strip(" .").lower() for a, b in zip(preds, refs)]))
        return out
