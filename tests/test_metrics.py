"""Metric values against hand-computed cases; every number comes from a maintained library."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from medvlsam2.core.errors import InputError
from medvlsam2.plugins.tasks import metrics as M

warnings.filterwarnings("ignore", category=FutureWarning)

SAME = ["the liver is enlarged with a small hypodense lesion", "no acute intracranial abnormality is seen"]
OTHER = ["bilateral pleural effusions are present today", "kidneys appear normal in size"]


def test_bleu_identical_and_disjoint() -> None:
    assert M.bleu(SAME, SAME) == pytest.approx({"bleu1": 1.0, "bleu4": 1.0})
    assert M.bleu(SAME, OTHER) == {"bleu1": 0.0, "bleu4": 0.0}


def test_bleu1_hand_computed() -> None:
    # 3 of 4 unigrams match, hypothesis as long as reference: BP = 1, BLEU-1 = 0.75.
    assert M.bleu(["a b c d"], ["a b c e"])["bleu1"] == pytest.approx(0.75)


def test_rouge_hand_computed() -> None:
    assert M.rouge(SAME, SAME) == {"rouge1": 1.0, "rougeL": 1.0}
    assert M.rouge(SAME, OTHER) == {"rouge1": 0.0, "rougeL": 0.0}
    # "a b c d" vs "a c b d": unigram F1 = 1; LCS = 3 of 4 -> F = 0.75.
    assert M.rouge(["a b c d"], ["a c b d"]) == pytest.approx({"rouge1": 1.0, "rougeL": 0.75})


def test_meteor_runs_the_jar() -> None:
    assert M.meteor(SAME, SAME) == pytest.approx(1.0, abs=1e-3)
    assert M.meteor(SAME, OTHER) == pytest.approx(0.0, abs=1e-3)


def test_meteor_without_java_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(M.shutil, "which", lambda name: None)
    with pytest.raises(M.MetricUnavailableError, match="METEOR needs Java"):
        M.meteor(SAME, SAME)


def test_bertscore_local_minilm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (M.minilm_path() / "model.safetensors").is_file()
    scores = M.bertscore(SAME + OTHER, SAME + OTHER[::-1])
    # Per pair: two identical (F1 = 1), two unrelated (F1 well below 1).
    assert 0.5 < scores["bertscore_f1"] < 0.95
    assert set(scores) == {"bertscore_precision", "bertscore_recall", "bertscore_f1"}


def test_mismatched_lengths() -> None:
    with pytest.raises(InputError, match="2 predictions but 1 references"):
        M.bleu(SAME, SAME[:1])


def test_choice_parsing_and_accuracy() -> None:
    assert M.parse_choice("C. liver") == "C"
    assert M.parse_choice("(b) spleen") == "B"
    assert M.parse_choice("Answer: D") == "D"
    assert M.parse_choice("A") == "A"
    assert M.parse_choice("liver") is None
    assert M.parse_choice("a lesion in the liver") is None
    assert M.parse_choice("liver", {"A": "Spleen", "C": "Liver"}) == "C"
    out = M.choice_accuracy(
        ["C. liver", "A. axial", "B. arterial", "no idea"],
        ["C. Liver", "B. Sagittal", "B. Arterial", "D. Lung"],
        ["organ", "plane", "phase", "organ"],
    )
    assert out["accuracy"] == pytest.approx(0.5)
    assert out["per_type"] == {"organ": 0.5, "phase": 1.0, "plane": 0.0}


def test_retrieval_recall() -> None:
    sim = np.eye(12)
    sim[0] = np.linspace(1.0, 0.0, 12)[::-1]  # volume 0: its text ranks 12th of 12
    sim[0, 0] = 0.0
    out = M.retrieval_recall(sim)
    assert out["v2t_r@1"] == pytest.approx(11 / 12)
    assert out["v2t_r@10"] == pytest.approx(11 / 12)
    assert out["t2v_r@1"] == pytest.approx(11 / 12)  # text 0's column has its match at 0 too
    perfect = M.retrieval_recall(np.eye(5), ks=(1,))
    assert perfect == {"v2t_r@1": 1.0, "t2v_r@1": 1.0}


def test_box_iou_and_accuracy() -> None:
    pred = [[0, 0, 0, 2, 2, 2], [0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1]]
    gold = [[0, 0, 0, 2, 2, 1], [5, 5, 5, 6, 6, 6], [0, 0, 0, 1, 1, 1]]
    np.testing.assert_allclose(M.box_iou_3d(pred, gold), [0.5, 0.0, 1.0], atol=1e-6)
    assert M.grounding_metrics(pred, gold) == pytest.approx({"iou": 0.5, "acc@0.5": 2 / 3})
    with pytest.raises(InputError, match="min > max"):
        M.box_iou_3d([[1, 0, 0, 0, 1, 1]], [[0, 0, 0, 1, 1, 1]])


def test_dice_known_pair() -> None:
    pred = np.zeros((10, 10, 10), dtype=np.int64)
    target = pred.copy()
    pred[2:6, 2:6, 2:6] = 1  # 64 voxels
    target[3:7, 2:6, 2:6] = 1  # 64 voxels, 48 shared -> Dice = 96 / 128
    pred[8, 8, 8] = 2
    target[8, 8, 8] = 2
    out = M.segmentation_metrics(
        pred, target, num_classes=3, class_names=["liver", "tumour", "cyst"], hd95=True
    )
    assert out["dice"]["liver"] == pytest.approx(0.75)
    assert out["dice"]["tumour"] == pytest.approx(1.0)
    assert math.isnan(out["dice"]["cyst"])  # empty in both: left out of the mean
    assert out["mean_dice"] == pytest.approx((0.75 + 1.0) / 2)
    assert out["hd95"]["liver"] == pytest.approx(1.0)


def test_surface_dice_uses_spacing() -> None:
    pred = np.zeros((1, 12, 12, 12), dtype=np.uint8)
    target = pred.copy()
    pred[0, 2:8, 2:8, 2:8] = 1
    target[0, 3:9, 2:8, 2:8] = 1  # one voxel shift along the first axis
    near = M.segmentation_metrics(pred, target, spacing=(1.0, 1.0, 1.0), tolerance_mm=1.0)
    far = M.segmentation_metrics(pred, target, spacing=(3.0, 1.0, 1.0), tolerance_mm=1.0)
    assert near["nsd"]["1"] == pytest.approx(1.0)
    assert far["nsd"]["1"] < 0.9  # the same shift is 3 mm on a 3 mm grid
    assert near["dice"]["1"] == pytest.approx(far["dice"]["1"])


def test_segmentation_shape_mismatch() -> None:
    with pytest.raises(InputError, match="differ in shape"):
        M.segmentation_metrics(np.zeros((1, 4, 4, 4)), np.zeros((1, 4, 4, 5)))
