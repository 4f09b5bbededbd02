"""Segmentation losses shared by the segmentation tasks, for any ``MaskDecoder``.

Dice + BCE on the mask logits (weights configurable, sigmoid focal as an option), plus SAM2's
own heads: the IoU prediction regressed onto the real per-slice IoU, and the object-score
logit classified against "object present on this slice". As in SAM2's training losses, the
IoU term only counts on slices where the object is present. A decoder that predicts boxes for
its objects (``DecoderOutput.boxes``) has them regressed onto the target masks' boxes with L1 +
generalised IoU, as DETR-style detection heads are.

Voxels and slices a decoder did not decode (their logit is ``NO_OBJECT_LOGIT``: its prompt
ruled the object out there) count 0 in the BCE, focal and object-score terms: they carry no
gradient, and a present object there would add a constant of about 1024 per voxel or slice to
the logged loss. Dice keeps them, as missed voxels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medvlsam2.core.decoder import NO_OBJECT_LOGIT, DecoderOutput, mask_boxes
from medvlsam2.core.errors import ConfigError, InputError


@dataclass
class SegLossConfig:
    """Weights of the loss terms (0 switches a term off)."""

    dice_weight: float = 1.0
    bce_weight: float = 1.0
    focal_weight: float = 0.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    iou_weight: float = 1.0
    object_score_weight: float = 1.0
    #: L1 + (1 - GIoU) between predicted boxes and the targets' boxes, for objects present.
    box_weight: float = 1.0
    #: Slices whose target has at least this many foreground voxels count as "object present".
    min_present_voxels: int = 1


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice over all but the first two axes (one value per object), averaged."""
    prob = logits.float().sigmoid().flatten(2)
    tgt = target.float().flatten(2)
    inter = (prob * tgt).sum(-1)
    return (1 - (2 * inter + eps) / (prob.sum(-1) + tgt.sum(-1) + eps)).mean()


def _mean_undecoded_as_zero(values: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` with those where ``logits`` were not decoded (``NO_OBJECT_LOGIT``)
    counted as 0: the gradient is the plain mean's (those carry none), the value drops their
    constant."""
    return torch.where(logits > NO_OBJECT_LOGIT, values, torch.zeros_like(values)).mean()


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-voxel BCE, averaged; undecoded voxels count 0."""
    return _mean_undecoded_as_zero(F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none"), logits)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss (RetinaNet / SAM2); ``alpha < 0`` disables class weighting."""
    logits, target = logits.float(), target.float()
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return _mean_undecoded_as_zero(loss, logits)


def slice_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Hard IoU per slice ``(B, K, D)`` of ``logits > 0`` against ``target`` (no gradient)."""
    pred = (logits.detach() > 0).flatten(3)
    tgt = target.bool().flatten(3)
    inter = (pred & tgt).sum(-1).float()
    union = (pred | tgt).sum(-1).float()
    return inter / union.clamp_min(1.0)


def iou_prediction_loss(iou_pred: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """MSE between predicted and real per-slice IoU, on slices where the object is present."""
    err = (iou_pred.float() - slice_iou(logits, target)) ** 2
    weight = present.float()
    return (err * weight).sum() / weight.sum().clamp_min(1.0)


def box_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 + (1 - generalised IoU) of ``(N, 6)`` boxes ``(d0, h0, w0, d1, h1, w1)``, averaged."""
    from monai.data.box_utils import box_pair_giou

    pred, target = pred.float(), target.float()
    l1 = (pred - target).abs().sum(-1)
    return (l1 + 1 - box_pair_giou(pred, target)).mean()


def object_score_loss(object_score: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """BCE of the object-score logit against object presence per slice; undecoded slices count 0."""
    score = object_score.float()
    return _mean_undecoded_as_zero(F.binary_cross_entropy_with_logits(score, present.float(), reduction="none"), score)


class SegmentationLoss(nn.Module):
    """``DecoderOutput`` + target masks ``(B, K, D, H, W)`` -> a dict of terms and their weighted ``loss``."""

    config_class = SegLossConfig

    def __init__(self, cfg: SegLossConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or SegLossConfig()
        weights = self.weights
        if any(w < 0 for w in weights.values()):
            raise ConfigError("loss weights must be non-negative")
        if not any(weights[k] > 0 for k in ("dice", "bce", "focal")):
            raise ConfigError("at least one of dice_weight, bce_weight, focal_weight must be positive")

    @property
    def weights(self) -> dict[str, float]:
        """Each term's weight, by the term's name in the returned dict."""
        cfg = self.cfg
        return {
            "dice": cfg.dice_weight, "bce": cfg.bce_weight, "focal": cfg.focal_weight,
            "iou": cfg.iou_weight, "object_score": cfg.object_score_weight, "box": cfg.box_weight,
        }

    def forward(self, output: DecoderOutput, target: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = output.masks
        if target.shape != logits.shape:
            raise InputError(f"target masks have shape {tuple(target.shape)}, the decoder gave {tuple(logits.shape)}")
        cfg = self.cfg
        target = target.to(logits.dtype)
        terms: dict[str, torch.Tensor] = {}
        if cfg.dice_weight > 0:
            terms["dice"] = dice_loss(logits, target)
        if cfg.bce_weight > 0:
            terms["bce"] = bce_loss(logits, target)
        if cfg.focal_weight > 0:
            terms["focal"] = focal_loss(logits, target, cfg.focal_alpha, cfg.focal_gamma)
        present = target.flatten(3).sum(-1) >= cfg.min_present_voxels
        if cfg.iou_weight > 0 and output.iou_pred is not None:
            terms["iou"] = iou_prediction_loss(output.iou_pred, logits, target, present)
        if cfg.object_score_weight > 0 and output.object_score is not None:
            terms["object_score"] = object_score_loss(output.object_score, present)
        if cfg.box_weight > 0 and output.boxes is not None:
            if output.boxes.shape != (*logits.shape[:2], 6):
                raise InputError(f"the decoder gave boxes of shape {tuple(output.boxes.shape)}, expected {(*logits.shape[:2], 6)}")
            boxes, has = mask_boxes(target)
            # objects absent from the volume have no box to learn (their object score says so)
            terms["box"] = box_loss(output.boxes[has], boxes[has]) if has.any() else output.boxes.sum() * 0
        weight = self.weights
        terms["loss"] = sum(weight[k] * v for k, v in terms.items())
        return terms
