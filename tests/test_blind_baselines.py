"""No-image baselines (``blind_predictions``): fitted on the training split, scored like the model.

Four training cases have the lesion on the left three times out of four and the ventricle always
in the same place; the two test cases have it on the left and on the right. A baseline that never
sees the volume must therefore get the ventricle and the left case right and the right case wrong.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medvlsam2.core.registry import build
from medvlsam2.plugins.tasks.grounding import box_to_text
from medvlsam2.plugins.tasks.metrics import medoid_text

SIDES = ["left", "left", "right", "left", "left", "right"]  # cases 0-3 train, 4-5 test
PREPROCESS = {"preset": "mri", "spatial_size": [8, 32, 32]}
#: choice order per case: the test cases put "left" at C and B
CHOICES = [["left", "right", "both", "none"]] * 4 + [["right", "none", "left", "both"], ["none", "left", "right", "both"]]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("blind")
    rng = np.random.default_rng(0)
    for i, side in enumerate(SIDES):
        image = rng.normal(0, 0.1, size=(32, 32, 8)).astype(np.float32)
        label = np.zeros(image.shape, dtype=np.int16)
        label[slice(4, 14) if side == "left" else slice(18, 28), 8:24, 2:6] = 1
        label[8:24, 26:31, 1:7] = 2
        image[label > 0] += 1.0
        nib.save(nib.Nifti1Image(image, np.eye(4)), root / f"case{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), root / f"case{i}_seg.nii.gz")
        (root / f"case{i}.txt").write_text(f"A bright lesion in the {side} hemisphere. The ventricles are normal.")
    split = {"train": range(4), "test": range(4, 6)}
    entry = lambda i: {"image": f"case{i}.nii.gz", "label": f"case{i}_seg.nii.gz"}  # noqa: E731
    (root / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "lesion", "2": "ventricle"},
        "training": [entry(i) for i in split["train"]], "test": [entry(i) for i in split["test"]],
    }))
    (root / "M3D_Cap.json").write_text(json.dumps(
        {s: [{"image": f"case{i}.nii.gz", "text": f"case{i}.txt"} for i in cases] for s, cases in split.items()}
    ))
    columns = ["Image Path", "Question Type", "Question", "Choice A", "Choice B", "Choice C", "Choice D", "Answer Choice", "Answer"]
    for s, cases in split.items():
        with (root / f"M3D_VQA_{s}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            for i in cases:
                letter = "ABCD"[CHOICES[i].index(SIDES[i])]
                writer.writerow([f"case{i}.nii.gz", "5", "Which side is the lesion on?", *CHOICES[i], letter, SIDES[i]])
    return root


def task(name: str, fmt: str, root: Path, **extra: object):
    splits = {"train": "training" if fmt == "nifti_json" else "train", "validation": None, "test": "test"}
    return build("tasks", name, {"data": {"format": fmt, "root": str(root), "splits": splits, "preprocess": PREPROCESS}, **extra})


def test_medoid_text_is_the_report_closest_to_the_others():
    texts = ["a lesion in the left thalamus", "a lesion in the left putamen", "no lesion", "a lesion in the left thalamus"]
    assert medoid_text(texts) == "a lesion in the left thalamus"
    assert medoid_text(["only one"]) == "only one"
    many = [f"report number {i}" for i in range(300)]
    assert medoid_text(many, limit=10) in many


def test_vqa_baseline_picks_the_training_majority_answer_by_its_text_not_its_letter(root):
    vqa = task("vqa", "m3d_vqa", root)
    rows = vqa.blind_predictions("test", "train")
    closed = [r for r in rows if r["kind"] == "closed"]
    assert [r["prediction"] for r in closed] == ["C. left", "B. left"]
    assert [r["prediction"] for r in rows if r["kind"] == "open"] == ["left", "left"]
    metrics = vqa.compute_metrics(rows)
    assert metrics["closed_accuracy"] == pytest.approx(0.5)  # right for the left case only
    assert metrics["open_rougeL"] == pytest.approx(0.5)


def test_report_baseline_writes_one_training_report_for_every_case(root):
    report = task("report_generation", "m3d_cap", root, text_metrics=["rouge"])
    rows = report.blind_predictions("test", "train")
    assert len(rows) == 2 and {r["prediction"] for r in rows} == {"A bright lesion in the left hemisphere. The ventricles are normal."}
    scores = report.compute_metrics(rows)
    assert 0.8 < scores["rougeL"] < 1.0  # exact for the left case, one word off for the right


def test_grounding_baseline_answers_the_mean_training_box(root):
    grounding = task("grounding", "nifti_json", root, mode="rec")
    rows = grounding.blind_predictions("test", "train")
    assert len(rows) == 4  # 2 cases x 2 structures
    ventricle = [r for r in rows if "ventricle" in r["prompt"]]
    # the ventricle never moves: the prior box is its box
    assert all(r["prediction"] == box_to_text(r["target_box"]) for r in ventricle)
    lesion = [r for r in rows if "lesion" in r["prompt"]]
    assert lesion[0]["prediction"] == lesion[1]["prediction"] != box_to_text(lesion[0]["target_box"])
    metrics = grounding.compute_metrics(rows)
    assert 0.5 <= metrics["rec_acc@0.5"] < 1.0 and metrics["parse_failure_rate"] == 0.0


def test_semantic_atlas_baseline_keeps_voxels_most_training_labels_share(root):
    semantic = task("semantic_seg", "nifti_json", root, metrics_grid="model")
    rows = semantic.blind_predictions("test", "train")
    assert [r["names"] for r in rows] == [["lesion", "ventricle"]] * 2
    assert rows[0]["dice"] == pytest.approx({"lesion": 1.0, "ventricle": 1.0})  # left: the atlas's side
    assert rows[1]["dice"] == pytest.approx({"lesion": 0.0, "ventricle": 1.0})
    metrics = semantic.compute_metrics(rows)
    assert metrics["dice/lesion"] == pytest.approx(0.5) and metrics["mean_dice"] == pytest.approx(0.75)
    assert np.isnan(metrics.get("box_failure_rate", np.nan))


def test_tasks_without_a_baseline_say_so(root):
    interactive = task("interactive_seg", "nifti_json", root)
    assert interactive.blind_predictions("test", "train") is None
