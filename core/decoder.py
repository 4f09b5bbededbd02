"""The mask-decoder contract: volume + prompts in, mask logits ``(B, K, D, H, W)`` out.

Coordinates are voxel indices of the tensor the decoder receives, in ``(d, h, w)`` order,
i.e. the same order as the volume's last three axes. The caller (``predict``) maps the
user's file indices onto this grid and back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from medvlsam2.core.encoder import EncoderOutput
from medvlsam2.core.errors import InputError

PROMPT_KINDS = ("text", "points", "boxes")
#: The mask and object-score logit a decoder gives where its prompts rule an object out without
#: decoding it (slices outside a box's depth, padding slots). It is a constant, so it carries no
#: gradient; the segmentation loss counts it 0 in its BCE, focal and object-score means, where it
#: would only add a constant (Dice still counts the object's voxels there as missed).
NO_OBJECT_LOGIT = -1024.0


@dataclass
class Prompts:
    """Up to K objects per volume, each prompted by any combination of the three kinds.

    * ``text_embeds`` ``(B, K, d)``: the trunk's ``[SEG]`` projections.
    * ``points`` ``(B, K, P, 3)`` voxel ``(d, h, w)`` and ``point_labels`` ``(B, K, P)``:
      1 foreground, 0 background, -1 padding (ignored).
    * ``boxes`` ``(B, K, 6)``: ``(d0, h0, w0, d1, h1, w1)``, inclusive voxel bounds;
      a row of -1 means "no box for this object".
    * ``valid`` ``(B, K)`` bool, optional: which object slots hold an object. A batch whose
      samples have different numbers of objects pads the rest; a decoder may skip a padding
      slot (its masks are then no-object logits) or decode it, and losses ignore it either way.
    """

    text_embeds: torch.Tensor | None = None
    points: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    valid: torch.Tensor | None = None

    @property
    def kinds(self) -> tuple[str, ...]:
        present = (self.text_embeds, self.points, self.boxes)
        return tuple(k for k, v in zip(PROMPT_KINDS, present) if v is not None)

    @property
    def batch_size(self) -> int:
        return self._first().shape[0]

    @property
    def num_objects(self) -> int:
        return self._first().shape[1]

    def _first(self) -> torch.Tensor:
        for value in (self.text_embeds, self.points, self.boxes):
            if value is not None:
                return value
        raise InputError("no prompt given: pass text embeddings, points or a box")

    def validate(self, volume_shape: tuple[int, ...]) -> None:
        """Raise ``InputError`` when shapes disagree or coordinates fall outside the volume."""
        b, k = self.batch_size, self.num_objects
        spatial = torch.tensor(volume_shape[-3:])
        if self.valid is not None and (self.valid.dtype != torch.bool or tuple(self.valid.shape) != (b, k)):
            raise InputError(f"valid must be a bool tensor of shape ({b}, {k}), got {self.valid.dtype} {tuple(self.valid.shape)}")
        if self.text_embeds is not None and self.text_embeds.shape[:2] != (b, k):
            raise InputError(f"text_embeds has shape {tuple(self.text_embeds.shape)}, expected ({b}, {k}, d)")
        if self.points is not None:
            if self.points.ndim != 4 or self.points.shape[:2] != (b, k) or self.points.shape[-1] != 3:
                raise InputError(f"points have shape {tuple(self.points.shape)}, expected ({b}, {k}, P, 3)")
            if self.point_labels is None or self.point_labels.shape != self.points.shape[:3]:
                raise InputError("point_labels must have shape (B, K, P) matching points")
            used = self.point_labels >= 0
            pts = self.points[used]
            if len(pts) and ((pts < 0).any() or (pts >= spatial.to(pts)).any()):
                raise InputError(f"a point lies outside the volume of size {tuple(volume_shape[-3:])}")
        if self.boxes is not None:
            if self.boxes.shape != (b, k, 6):
                raise InputError(f"boxes have shape {tuple(self.boxes.shape)}, expected ({b}, {k}, 6)")
            present = (self.boxes >= 0).all(-1)
            bx = self.boxes[present]
            if len(bx):
                if (bx[:, :3] > bx[:, 3:]).any():
                    raise InputError("a box has a minimum corner above its maximum corner")
                if (bx[:, 3:] >= spatial.to(bx)).any():
                    raise InputError(f"a box reaches outside the volume of size {tuple(volume_shape[-3:])}")


@dataclass
class DecoderOutput:
    """Mask logits at the input grid, plus per-object quality predictions when available."""

    masks: torch.Tensor  # (B, K, D, H, W) logits
    iou_pred: torch.Tensor | None = None  # (B, K, D): predicted IoU per slice
    object_score: torch.Tensor | None = None  # (B, K, D): object-present logit per slice
    #: (B, K, 6): boxes the decoder predicted for its objects, ``(d0, h0, w0, d1, h1, w1)`` as
    #: fractions of the volume's extent (a voxel i spans [i/D, (i+1)/D)); None when it predicts none.
    boxes: torch.Tensor | None = None


def normalise_intensity(volume: torch.Tensor, percentiles: tuple[float, float] | list[float]) -> torch.Tensor:
    """Per-volume robust scaling of ``(B, ...)`` to [0, 1] between two intensity percentiles.

    Decoders see any modality (CT in HU, MRI in arbitrary units) the same way; the quantiles are
    taken on at most about a million voxels per volume.
    """
    flat = volume.detach().flatten(1).float()
    step = max(1, flat.shape[1] // 1_000_000)
    q = torch.tensor([p / 100 for p in percentiles], dtype=flat.dtype, device=flat.device)
    lo, hi = torch.quantile(flat[:, ::step], q, dim=1)
    shape = (-1,) + (1,) * (volume.ndim - 1)
    return ((volume.float() - lo.view(shape)) / (hi - lo).clamp_min(1e-6).view(shape)).clamp(0, 1)


def mask_boxes(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes of binary masks ``(..., D, H, W)`` as fractions of the extent, in the layout of
    ``DecoderOutput.boxes``, plus a bool saying which masks are non-empty (their box is zeros)."""
    spatial = masks.shape[-3:]
    flat = masks.reshape(-1, *spatial).bool()
    boxes = torch.zeros(flat.shape[0], 6, device=masks.device)
    present = flat.flatten(1).any(1)
    for axis in range(3):
        other = tuple(a + 1 for a in range(3) if a != axis)
        hit = flat.any(dim=other)  # (N, size along axis)
        idx = torch.arange(spatial[axis], device=masks.device).expand_as(hit)
        lo = torch.where(hit, idx, spatial[axis]).min(1).values
        hi = torch.where(hit, idx, -1).max(1).values
        boxes[:, axis] = lo.float() / spatial[axis]
        boxes[:, axis + 3] = (hi + 1).float() / spatial[axis]
    boxes[~present] = 0
    return boxes.reshape(*masks.shape[:-3], 6), present.reshape(masks.shape[:-3])


class MaskDecoder(nn.Module):
    """Base class of decoder plugins.

    Subclasses set ``prompt_dim`` (the width of ``Prompts.text_embeds``) and ``accepts``.
    """

    config_class: ClassVar[type | None] = None
    prompt_dim: int
    accepts: frozenset[str] = frozenset(PROMPT_KINDS)
    #: How memory and time grow with the number of slices D ("linear", "quadratic", ...).
    depth_scaling: ClassVar[str] = "linear"

    def check_prompts(self, volume: torch.Tensor, prompts: Prompts) -> None:
        unsupported = set(prompts.kinds) - set(self.accepts)
        if unsupported:
            raise InputError(
                f"{type(self).__name__} does not accept {', '.join(sorted(unsupported))} prompts "
                f"(accepts: {', '.join(sorted(self.accepts))})"
            )
        if volume.ndim != 5:
            raise InputError(f"expected a volume (B, C, D, H, W), got shape {tuple(volume.shape)}")
        prompts.validate(tuple(volume.shape))

    def forward(
        self,
        volume: torch.Tensor,
        prompts: Prompts,
        encoder_output: EncoderOutput | None = None,
    ) -> DecoderOutput:  # pragma: no cover - abstract
        raise NotImplementedError
