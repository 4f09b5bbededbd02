"""Dense supervision of the volume encoder: what each of its tokens covers.

A linear head on the encoder's tokens predicts, for every token, the fraction of its voxels that
belong to each of ``classes`` (named classes of a label map, e.g. structures and lesions), with
a binary cross-entropy against those fractions. It trains the encoder and its own head only, so
it sits beside the language tasks: the tokens the LLM reads learn where things are from every
voxel of a label map instead of from a few answer words.

Data: any reader whose samples carry a ``label`` map with named labels (``nifti_json``).
Metrics, per class:

* ``auroc/<class>``: the AUROC of the token scores against "the token holds some of the class",
  and their mean ``mean_auroc``. It rewards knowing *where a class tends to be* as much as
  seeing it: a head that scores the same map for every volume reaches a high token AUROC for a
  lesion that usually sits in the same few tokens.
* ``presence_auroc/<class>``: whether the class is *seen* — the AUROC of each volume's highest
  token score against "the volume holds the class", for classes present in some evaluated
  volumes and absent from others (lesions, not anatomy present in every case); their mean is
  ``mean_presence_auroc``. A location prior scores 0.5 here.

A class absent from every evaluated token (volume), or present in all of them, has no AUROC and
is left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medvlsam2.core.errors import ConfigError
from medvlsam2.plugins.tasks.base import MedVLTask, TaskConfig
from medvlsam2.plugins.tasks.segmentation import metric_key


@dataclass
class EncoderSegConfig(TaskConfig):
    #: Label names whose per-token fractions the head predicts (matched by name in each dataset).
    classes: list[str] = field(default_factory=list)
    #: Weight of a class's presence in the loss (``pos_weight`` of the BCE): rare classes such as
    #: small lesions cover few tokens.
    pos_weight: float = 1.0


class EncoderSegTask(MedVLTask):
    config_class = EncoderSegConfig
    trains: ClassVar[tuple[str, ...]] = ("encoder", "heads")
    main_metric = "mean_auroc"

    @classmethod
    def check_config(cls, cfg: Any, path: str = "task") -> None:
        super().check_config(cfg, path)
        if not cfg.classes:
            raise ConfigError(f"config: {path}.classes: name the label classes the encoder's tokens should predict")
        if len(set(cfg.classes)) != len(cfg.classes):
            raise ConfigError(f"config: {path}.classes: a class is named twice in {list(cfg.classes)}")
        if cfg.pos_weight <= 0:
            raise ConfigError(f"config: {path}.pos_weight: expected a positive weight, got {cfg.pos_weight}")

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self._masks: dict[tuple[str, str], np.ndarray] = {}

    def configure_heads(self, model: Any) -> None:
        if getattr(model, "encoder", None) is None:
            raise ConfigError("config: model.encoder: encoder_seg needs a volume encoder")
        self.head = nn.Linear(model.encoder.out_dim, len(self.cfg.classes))

    # -- data --------------------------------------------------------------------------------
    def samples(self, split: str) -> Sequence[dict[str, Any]]:
        return [r for r in self.records(split) if r.get("label")]

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        volume, records = self.stack_volumes(samples)
        masks = np.stack([self._class_masks(s, r) for s, r in zip(samples, records)])
        return {"volume": volume, "masks": torch.from_numpy(masks).float(), "samples": samples}

    def _class_masks(self, sample: dict[str, Any], record: Any) -> np.ndarray:
        """``(K, D, H, W)`` masks of ``classes`` on the model grid (cached with the volumes)."""
        key = (str(sample["label"]), str(sample["image"]))
        if key not in self._masks:
            label = self.label_on_model_grid(sample, record)
            values = {str(name): int(value) for value, name in (sample.get("labels") or {}).items()}
            masks = np.stack([label == values[c] if c in values else np.zeros(label.shape, bool) for c in self.cfg.classes])
            if not self.cfg.cache_volumes:
                return masks
            self._masks[key] = masks
        return self._masks[key]

    # -- steps -------------------------------------------------------------------------------
    def _scores_and_targets(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token logits ``(B, N, K)`` and the fraction of each token's voxels in each class."""
        out = model.encoder(batch["volume"])
        logits = self.head(out.tokens.float())
        masks = batch["masks"].to(logits.device)
        fractions = F.adaptive_avg_pool3d(masks, tuple(out.grid))  # (B, K, d, h, w), tokens depth-major
        return logits, fractions.flatten(2).transpose(1, 2)

    def training_step(self, model: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits, fractions = self._scores_and_targets(model, batch)
        weight = torch.full((logits.shape[-1],), float(self.cfg.pos_weight), device=logits.device)
        loss = F.binary_cross_entropy_with_logits(logits, fractions, pos_weight=weight)
        return {"loss": loss, "token_bce": loss.detach()}

    @torch.no_grad()
    def predict_step(self, model: Any, batch: dict[str, Any]) -> list[dict[str, Any]]:
        logits, fractions = self._scores_and_targets(model, batch)
        return [
            {"id": s["id"], "scores": logits[i].float().cpu().numpy(), "present": (fractions[i] > 0).cpu().numpy()}
            for i, s in enumerate(batch["samples"])
        ]

    def compute_metrics(self, predictions: list[dict[str, Any]]) -> dict[str, float]:
        tokens = _aurocs(
            np.concatenate([p["scores"] for p in predictions]), np.concatenate([p["present"] for p in predictions]),
            self.cfg.classes, "auroc",
        )
        volumes = _aurocs(
            np.stack([p["scores"].max(axis=0) for p in predictions]),
            np.stack([p["present"].any(axis=0) for p in predictions]),
            self.cfg.classes, "presence_auroc",
        )
        return {
            **tokens,
            "mean_auroc": float(np.mean(list(tokens.values()))) if tokens else float("nan"),
            **volumes,
            "mean_presence_auroc": float(np.mean(list(volumes.values()))) if volumes else float("nan"),
        }


def _aurocs(scores: np.ndarray, present: np.ndarray, classes: Sequence[str], prefix: str) -> dict[str, float]:
    """``{prefix/<class>: AUROC}`` of ``scores`` ``(N, K)`` against ``present`` ``(N, K)``, where defined."""
    from torchmetrics.functional.classification import binary_auroc

    return {
        f"{prefix}/{metric_key(name)}": float(
            binary_auroc(torch.from_numpy(scores[:, k]).float(), torch.from_numpy(present[:, k]).long())
        )
        for k, name in enumerate(classes)
        if 0 < present[:, k].sum() < len(present)
    }
