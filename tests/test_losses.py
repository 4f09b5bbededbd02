"""Segmentation losses: each term is zero (or minimal) when it should be and trains what it should."""

from __future__ import annotations

import pytest
import torch

from medvlsam2.core.decoder import NO_OBJECT_LOGIT, DecoderOutput
from medvlsam2.core.errors import ConfigError, InputError
from medvlsam2.core.losses import (
    SegLossConfig,
    SegmentationLoss,
    bce_loss,
    dice_loss,
    focal_loss,
    iou_prediction_loss,
    object_score_loss,
    slice_iou,
)


def target() -> torch.Tensor:
    t = torch.zeros(1, 2, 3, 8, 8)
    t[0, 0, 1, 2:6, 2:6] = 1
    t[0, 1, :, 4:, 4:] = 1
    return t


def test_dice_and_bce_are_small_for_confident_correct_logits_and_large_for_wrong():
    t = target()
    good, bad = (t * 2 - 1) * 20, (1 - 2 * t) * 20
    assert dice_loss(good, t) < 1e-3 < 0.9 < dice_loss(bad, t)
    assert bce_loss(good, t) < 1e-6 and bce_loss(bad, t) > 10


def test_focal_down_weights_easy_voxels_relative_to_bce():
    t = target()
    easy = (t * 2 - 1) * 2.0
    assert focal_loss(easy, t, alpha=-1) < 0.1 * bce_loss(easy, t)
    assert focal_loss(easy, t, alpha=0.25) > 0


def test_iou_prediction_loss_is_zero_for_the_true_iou_and_ignores_absent_slices():
    t = target()
    logits = (t * 2 - 1) * 5
    logits[0, 1, 0] = 5.0  # slice 0 of object 1: predicted everything, true quarter
    real = slice_iou(logits, t)
    assert real[0, 1, 0] == pytest.approx(0.25) and real[0, 0, 1] == 1
    present = t.flatten(3).sum(-1) > 0
    assert iou_prediction_loss(real, logits, t, present) == 0
    wrong_on_absent = real.clone()
    wrong_on_absent[0, 0, 0] = 0.7  # object 0 is absent on slice 0
    assert iou_prediction_loss(wrong_on_absent, logits, t, present) == 0
    assert iou_prediction_loss(torch.zeros_like(real), logits, t, present) > 0


def test_object_score_loss_follows_presence():
    present = torch.tensor([[[True, False]]])
    assert object_score_loss(torch.tensor([[[10.0, -10.0]]]), present) < 1e-4
    assert object_score_loss(torch.tensor([[[-10.0, 10.0]]]), present) > 5


def test_slices_the_decoder_did_not_decode_add_nothing_but_missed_voxels_to_dice():
    # object 0 is present on slice 1, which its prompt ruled out (a box over slices 0 and 2 only)
    t = target()
    logits = (t * 2 - 1) * 20
    score = torch.where(t.flatten(3).amax(-1) > 0, 20.0, -20.0)
    logits[0, 0, 1], score[0, 0, 1] = NO_OBJECT_LOGIT, NO_OBJECT_LOGIT
    terms = SegmentationLoss(SegLossConfig(focal_weight=1.0))(DecoderOutput(masks=logits, object_score=score), t)
    assert terms["bce"] < 1e-6 and terms["focal"] < 1e-6 and terms["object_score"] < 1e-6
    assert terms["dice"] > 0.4  # object 0 is missed entirely: half of the two objects' Dice
    nothing = torch.full_like(t, NO_OBJECT_LOGIT)
    assert bce_loss(nothing, t) == 0 and object_score_loss(nothing[..., 0, 0], t[..., 0, 0] > 0) == 0
    # only the value changes: the decoded voxels get the gradient of the plain mean
    ours, plain = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    bce_loss(ours, t).backward()
    torch.nn.functional.binary_cross_entropy_with_logits(plain, t).backward()
    decoded = logits > NO_OBJECT_LOGIT  # (a decoder's undecoded logits are constants: no gradient)
    assert torch.allclose(ours.grad[decoded], plain.grad[decoded]) and (ours.grad[~decoded] == 0).all()


def test_segmentation_loss_weights_terms_and_reaches_every_head():
    t = target()
    logits = torch.zeros_like(t, requires_grad=True)
    iou = torch.full(t.shape[:3], 0.5, requires_grad=True)
    score = torch.zeros(t.shape[:3], requires_grad=True)
    out = DecoderOutput(masks=logits, iou_pred=iou, object_score=score)
    terms = SegmentationLoss(SegLossConfig(dice_weight=2.0, focal_weight=1.0))(out, t)
    assert set(terms) == {"dice", "bce", "focal", "iou", "object_score", "loss"}
    expected = 2 * terms["dice"] + terms["bce"] + terms["focal"] + terms["iou"] + terms["object_score"]
    assert torch.allclose(terms["loss"], expected)
    terms["loss"].backward()
    assert logits.grad.abs().sum() > 0 and iou.grad.abs().sum() > 0 and score.grad.abs().sum() > 0
    only_masks = SegmentationLoss(SegLossConfig(iou_weight=0, object_score_weight=0))(DecoderOutput(masks=logits), t)
    assert set(only_masks) == {"dice", "bce", "loss"}


def test_bad_targets_and_weights_raise_clear_errors():
    with pytest.raises(InputError, match=r"target masks have shape \(1, 1, 3, 8, 8\)"):
        SegmentationLoss()(DecoderOutput(masks=torch.zeros(1, 2, 3, 8, 8)), torch.zeros(1, 1, 3, 8, 8))
    with pytest.raises(ConfigError, match="non-negative"):
        SegmentationLoss(SegLossConfig(bce_weight=-1))
    with pytest.raises(ConfigError, match="at least one"):
        SegmentationLoss(SegLossConfig(dice_weight=0, bce_weight=0))
