"""Whole-volume classification: a linear probe on the encoder's mean-pooled tokens.

Data: ``<root>/<csv>`` with columns ``image,label`` (image paths relative to ``root``,
NIfTI files; label = one of ``classes``), and a ``split`` column (train/validation/test).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medvlsam2.core.errors import InputError
from medvlsam2.core.task import BaseTask


@dataclass
class ClassificationData:
    root: str = "."
    csv: str = "labels.csv"


@dataclass
class VolumeClassificationConfig:
    classes: list[str] = field(default_factory=lambda: ["normal", "abnormal"])
    input_size: tuple[int, int, int] = (32, 64, 64)
    data: ClassificationData = field(default_factory=ClassificationData)


class VolumeClassificationTask(BaseTask):
    """Predicts one class per volume; trains the encoder and its own linear head."""

    config_class = VolumeClassificationConfig
    trains = ("encoder", "heads")
    main_metric = "accuracy"

    def configure_heads(self, model: Any) -> None:
        self.head = nn.Linear(model.encoder.out_dim, len(self.cfg.classes))

    def samples(self, split: str) -> list[dict[str, Any]]:
        root = Path(self.cfg.data.root)
        table = root / self.cfg.data.csv
        if not table.is_file():
            raise InputError(f"volume_classification: label file not found: {table}")
        rows = []
        with table.open(newline="") as handle:
            for number, row in enumerate(csv.DictReader(handle), start=2):
                for column in ("image", "label", "split"):
                    if not row.get(column):
                        raise InputError(f"{table} row {number}: column '{column}' missing or empty")
                if row["label"] not in self.cfg.classes:
                    raise InputError(f"{table} row {number}: label '{row['label']}' is not one of {self.cfg.classes}")
                if row["split"] == split:
                    rows.append({"image": str(root / row["image"]), "label": self.cfg.classes.index(row["label"])})
        return rows

    def _load(self, path: str) -> torch.Tensor:
        import nibabel as nib

        data = torch.as_tensor(nib.load(path).get_fdata(), dtype=torch.float32)
        if data.ndim != 3:
            raise InputError(f"{path}: expected a 3D volume, got shape {tuple(data.shape)}")
        data = (data - data.mean()) / (data.std() + 1e-6)
        return F.interpolate(data[None, None], size=tuple(self.cfg.input_size), mode="trilinear")[0]

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "volume": torch.stack([self._load(s["image"]) for s in samples]),
            "label": torch.tensor([s["label"] for s in samples]),
        }

    def _logits(self, model: Any, volume: torch.Tensor) -> torch.Tensor:
        return self.head(model.encoder(volume).tokens.mean(dim=1))

    def training_step(self, model: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"loss": F.cross_entropy(self._logits(model, batch["volume"]), batch["label"])}

    @torch.no_grad()
    def predict_step(self, model: Any, batch: dict[str, Any]) -> list[dict[str, Any]]:
        predicted = self._logits(model, batch["volume"]).argmax(dim=-1)
        return [{"predicted": int(p), "label": int(t)} for p, t in zip(predicted, batch["label"])]

    def compute_metrics(self, predictions: list[dict[str, Any]]) -> dict[str, float]:
        if not predictions:
            return {}
        correct = sum(p["predicted"] == p["label"] for p in predictions)
        return {"accuracy": correct / len(predictions)}
