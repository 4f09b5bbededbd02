"""Semantic, referring and interactive segmentation on tiny data written in the real layouts.

nifti_json (MSD ``dataset.json`` + NIfTI volumes and label maps) and M3D-RefSeg (case folders
with ``ct.nii.gz`` / ``mask.nii.gz`` and the CSV) are written to ``tmp_path``; the model is a
1-layer 3D ViT, a 2-layer Llama with LoRA and the ``prompt_unet`` decoder.
"""

from __future__ import annotations

import json
import math
import textwrap
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from medvlsam2.core.config import load_config
from medvlsam2.core.errors import ConfigError, InputError
from medvlsam2.core.llm import SEG_TOKEN
from medvlsam2.core.trunk import GenerationOutput
from medvlsam2.plugins.tasks.segmentation import (
    jitter_box,
    mask_box,
    next_click,
    simulate_clicks,
)

SHAPE = (24, 32, 32)  # file axes; axis 0 is the slice axis of the model grid
AFFINE = np.diag([2.0, 1.0, 1.5, 1.0])
NAMES = {1: "left thalamus", 2: "brain stem", 3: "lesion"}
PREPROCESS = {"preset": "ct", "intensity": "minmax", "slice_axis": 0, "spatial_size": [8, 32, 32]}
MODEL = {
    "encoder": {"name": "vit3d", "img_size": [8, 32, 32], "patch_size": [4, 8, 8], "hidden_size": 32,
                "mlp_dim": 64, "num_layers": 1, "num_heads": 2},
    "projector": {"name": "spatial_pool_mlp", "pool_grid": [2, 2, 2]},
    "llm": {"name": "hf_causal", "model_type": "llama", "lora_r": 4, "lora_alpha": 8,
            "model_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "num_key_value_heads": 2}},
    "decoder": {"name": "prompt_unet", "prompt_dim": 16, "channels": [8, 16]},
    "seg_projector": {"hidden_dim": 32},
}


# -- data in the real layouts ------------------------------------------------------------------
def blob_label(rng: np.random.Generator, with_lesion: bool) -> np.ndarray:
    label = np.zeros(SHAPE, dtype=np.uint8)
    d, h, w = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    c = rng.integers(-1, 2, size=3)
    label[((d - 7 - c[0]) / 5.0) ** 2 + ((h - 10 - c[1]) / 6.0) ** 2 + ((w - 10 - c[2]) / 6.0) ** 2 <= 1] = 1
    label[14 + c[0] : 21 + c[0], 16:27, 18:28] = 2
    if with_lesion:
        label[4:12, 22:28, 4:10] = 3
    return label


def image_of(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (rng.normal(0, 0.2, SHAPE) + label.astype(np.float32) * 1.5).astype(np.float32)


def make_nifti_json(root: Path, n_train: int = 4, n_test: int = 2) -> Path:
    rng = np.random.default_rng(0)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    entries = []
    for i in range(n_train + n_test):
        label = blob_label(rng, with_lesion=i % 2 == 0)
        nib.save(nib.Nifti1Image(image_of(label, rng), AFFINE), root / "imagesTr" / f"case{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, AFFINE), root / "labelsTr" / f"case{i}.nii.gz")
        entries.append({"image": f"./imagesTr/case{i}.nii.gz", "label": f"./labelsTr/case{i}.nii.gz"})
    datalist = {
        "name": "tiny brain",
        "labels": {"0": "background", **{str(k): v for k, v in NAMES.items()}},
        "training": entries[:n_train],
        "test": entries[n_train:],
    }
    (root / "dataset.json").write_text(json.dumps(datalist))
    return root


def make_refseg(root: Path) -> Path:
    """M3D-RefSeg: s0000/ct.nii.gz + s0000/mask.nii.gz (values = Mask_ID) and the split CSVs."""
    rng = np.random.default_rng(1)
    rows = {"train": [], "test": []}
    questions = {
        1: ("Which structure lies in the upper left of this scan?", "It is the rounded structure"),
        2: ("Where is the elongated structure below the first one?", "Sure, it is [SEG]."),
    }
    for i in range(4):
        case = root / f"s{i:04d}"
        case.mkdir(parents=True)
        mask = blob_label(rng, with_lesion=False)
        nib.save(nib.Nifti1Image(image_of(mask, rng), AFFINE), case / "ct.nii.gz")
        nib.save(nib.Nifti1Image(mask, AFFINE), case / "mask.nii.gz")
        split = "train" if i < 3 else "test"
        for mask_id, (question, answer) in questions.items():
            rows[split].append(f's{i:04d}/ct.nii.gz,s{i:04d}/mask.nii.gz,{mask_id},"{question}","{answer}"')
    for split, lines in rows.items():
        text = "Image,Mask,Mask_ID,Question,Answer\n" + "\n".join(lines) + "\n"
        (root / f"M3D_RefSeg_{split}.csv").write_text(text)
    return root


def nifti_data(root: Path, **extra: object) -> dict:
    return {"format": "nifti_json", "root": str(root), "preprocess": dict(PREPROCESS),
            "splits": {"validation": None}, **extra}


def task_entries(data: Path, refseg: Path) -> list[dict]:
    return [
        {"name": "semantic_seg", "max_classes": 2, "data": nifti_data(data)},
        {"name": "referring_seg", "max_new_tokens": 4,
         "data": {"format": "m3d_refseg", "root": str(refseg), "preprocess": dict(PREPROCESS),
                  "splits": {"validation": None}}},
        {"name": "interactive_seg", "max_objects": 3, "data": nifti_data(data)},
        {"name": "interactive_seg", "use_text": True, "max_objects": 2, "train_prompts": ["box"],
         "eval_clicks": [2], "data": nifti_data(data)},
    ]


def run_config(tmp_path: Path, tasks: list[dict], model: dict = MODEL, max_steps: int = 2, stages: list | None = None) -> object:
    cfg = {
        "model": model, "tasks": tasks, **({"stages": stages} if stages else {}),
        "trainer": {"max_steps": max_steps, "batch_size": 2, "enable_progress_bar": False, "accelerator": "cpu",
                    "log_every_n_steps": 1},
        "output_dir": str(tmp_path / "runs"), "seed": 0,
    }
    path = tmp_path / "run.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    return load_config([path])


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("seg")
    return make_nifti_json(root / "brain"), make_refseg(root / "refseg")


@pytest.fixture(scope="module")
def module(data_dirs, tmp_path_factory):
    from medvlsam2.core.engine import MedVLModule

    cfg = run_config(tmp_path_factory.mktemp("run"), task_entries(*data_dirs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return MedVLModule(cfg)


def two_steps(module, key: str) -> list[float]:
    """Two optimiser steps of one task through the LightningModule's own training_step."""
    task = module.tasks[key]
    optimiser = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    batch = {**task.collate(list(task.samples("train"))[:2]), "task": key}
    module.train()
    losses = []
    for _ in range(2):
        optimiser.zero_grad()
        loss = task.training_step(module.model, batch)["loss"]
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    module.eval()
    return losses


def evaluate_task(module, key: str) -> dict[str, float]:
    task = module.tasks[key]
    samples = list(task.samples("test"))
    with torch.no_grad():
        predictions = task.predict_step(module.model, task.collate(samples))
    assert len(predictions) == len(samples)
    return task.compute_metrics(predictions)


# -- the three tasks train and evaluate ----------------------------------------------------------
def test_semantic_seg_trains_and_scores_every_class(module):
    assert all(math.isfinite(v) for v in two_steps(module, "semantic_seg"))
    metrics = evaluate_task(module, "semantic_seg")
    assert metrics["num_cases"] == 2
    # test cases 4 (with lesion) and 5 (without): every present class is scored, by name
    for name in ("left_thalamus", "brain_stem", "lesion"):
        assert 0.0 <= metrics[f"dice/{name}"] <= 1.0 and 0.0 <= metrics[f"nsd/{name}"] <= 1.0
    assert 0.0 <= metrics["mean_dice"] <= 1.0


def test_seg_loss_reaches_seg_projector_and_lora(module):
    task = module.tasks["semantic_seg"]
    two_steps(module, "semantic_seg")  # FiLM starts at zero: after a step the text path carries gradient
    module.zero_grad()
    module.train()
    batch = task.collate(list(task.samples("train"))[:2])
    terms = task.training_step(module.model, batch)
    assert {"loss", "lm_loss", "seg_loss", "dice", "bce"} <= set(terms)
    terms["seg_loss"].backward()
    trunk = module.model.trunk
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trunk.seg_projector.parameters())
    lora = [p for n, p in trunk.llm.named_parameters() if "lora_" in n]
    assert lora and any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    module.zero_grad()
    module.eval()


def test_forced_seg_always_yields_k_masks(module, data_dirs):
    task = module.tasks["semantic_seg"]  # max_classes 2: three classes go in two chunks
    volume = task.collate(list(task.samples("test"))[:1])["volume"]
    out = task.infer(module.model, volume, text="left thalamus, brain stem, lesion")
    assert out["masks"].shape == (3, 8, 32, 32)
    assert out["names"] == ["left thalamus", "brain stem", "lesion"]
    assert out["text"].count(SEG_TOKEN) == 3 and len(out["scores"]) == 3
    assert 0.0 <= out["masks"].min() and out["masks"].max() <= 1.0
    every = task.infer(module.model, volume)  # default: every class the dataset names
    assert every["names"] == list(NAMES.values()) and every["masks"].shape[0] == 3


def test_referring_seg_trains_and_forces_a_missing_seg(module, monkeypatch):
    assert all(math.isfinite(v) for v in two_steps(module, "referring_seg"))
    task = module.tasks["referring_seg"]
    assert task.with_seg("It is the rounded structure") == f"It is the rounded structure {SEG_TOKEN}"
    assert task.with_seg("Sure, it is [SEG].") == "Sure, it is [SEG]."
    metrics = evaluate_task(module, "referring_seg")
    assert metrics["num_cases"] == 2 and 0.0 <= metrics["mean_dice"] <= 1.0
    assert 0.0 <= metrics["forced_seg_rate"] <= 1.0

    trunk = module.model.trunk

    def no_seg(volume, prompts, **kwargs):
        b = len(prompts)
        return GenerationOutput(["The left kidney."] * b, torch.zeros(b, 1, dtype=torch.long),
                                torch.zeros(b, 0, 64), torch.zeros(b, 0, 16), torch.zeros(b, 0, dtype=torch.bool))

    monkeypatch.setattr(trunk, "generate", no_seg)
    batch = task.collate(list(task.samples("test")))
    with torch.no_grad():
        predictions = task.predict_step(module.model, batch)
    assert [p["text"] for p in predictions] == [f"The left kidney. {SEG_TOKEN}"] * 2
    assert task.compute_metrics(predictions)["forced_seg_rate"] == 1.0
    out = task.infer(module.model, batch["volume"][:1], text="Where is the lesion?")
    assert out["masks"].shape == (1, 8, 32, 32) and out["text"].endswith(SEG_TOKEN)


def test_interactive_seg_reports_dice_after_clicks(module):
    assert all(math.isfinite(v) for v in two_steps(module, "interactive_seg"))
    metrics = evaluate_task(module, "interactive_seg")
    for key in ("dice_box", "dice_click1", "dice_click3", "dice_click5", "mean_dice"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["mean_dice"] == metrics["dice_click5"]
    task = module.tasks["interactive_seg"]
    volume = task.collate(list(task.samples("test"))[:1])["volume"]
    out = task.infer(module.model, volume, points=np.array([[2, 10, 10, 1], [6, 30, 30, 0]]), box=np.array([0, 4, 4, 4, 16, 16]))
    assert out["masks"].shape == (1, 8, 32, 32) and out["text"] is None and out["names"] == ["object"]
    with pytest.raises(InputError, match="give points or a box"):
        task.infer(module.model, volume)
    with pytest.raises(InputError, match="outside the volume"):
        task.infer(module.model, volume, points=np.array([[9, 1, 1, 1]]))


def test_interactive_seg_with_text_adds_forced_seg_embeddings(module):
    task = module.tasks["interactive_seg_2"]
    assert set(task.trains) == {"decoder", "seg_projector", "lora"}
    assert all(math.isfinite(v) for v in two_steps(module, "interactive_seg_2"))
    metrics = evaluate_task(module, "interactive_seg_2")
    assert set(metrics) == {"num_cases", "dice_box", "dice_click2", "mean_dice"}
    volume = task.collate(list(task.samples("test"))[:1])["volume"]
    out = task.infer(module.model, volume, text="brain stem", box=np.array([2, 16, 18, 6, 26, 27]))
    assert out["text"] == f"brain stem {SEG_TOKEN}." and out["names"] == ["brain stem"]
    with pytest.raises(InputError, match="trained without text"):
        module.tasks["interactive_seg"].infer(module.model, volume, text="brain stem", box=np.array([2, 16, 18, 6, 26, 27]))


# -- clicks and boxes ------------------------------------------------------------------------------
def test_next_click_goes_to_the_centre_of_the_largest_error_region():
    target = np.zeros((20, 20, 20), dtype=bool)
    target[2:9, 2:9, 2:9] = True  # 7^3, entirely missed: the largest error
    target[12:15, 12:15, 12:15] = True  # found
    pred = np.zeros_like(target)
    pred[12:15, 12:15, 12:15] = True
    pred[16:19, 2:5, 2:5] = True  # a small leak
    click, label = next_click(pred, target)
    assert tuple(click) == (5, 5, 5) and label == 1
    pred[2:9, 2:9, 2:9] = True  # the miss is fixed; the leak is now the largest error
    click, label = next_click(pred, target)
    assert tuple(click) == (17, 3, 3) and label == 0
    pred[16:19, 2:5, 2:5] = False
    assert next_click(pred, target) is None


def test_training_clicks_and_boxes_follow_the_object():
    rng = np.random.default_rng(0)
    target = np.zeros((16, 24, 24), dtype=bool)
    target[3:12, 5:18, 6:20] = True
    from scipy.ndimage import distance_transform_edt

    outside = distance_transform_edt(~target)
    inside = distance_transform_edt(np.pad(target, 1))[1:-1, 1:-1, 1:-1]
    positives = []
    for _ in range(30):
        points, labels = simulate_clicks(target, rng, 3, 2, margin=2)
        pos, neg = points[labels == 1], points[labels == 0]
        assert len(pos) == 3 and len(neg) == 2
        assert target[tuple(pos.T)].all() and not target[tuple(neg.T)].any()
        assert (outside[tuple(neg.T)] <= 2).all()
        positives += inside[tuple(pos.T)].tolist()
    assert np.mean(positives) > inside[target].mean()  # biased away from the edge
    assert tuple(mask_box(target)) == (3, 5, 6, 11, 17, 19)
    for _ in range(20):
        box = jitter_box(target, rng, 0.2)
        assert (box[:3] <= box[3:]).all() and (box >= 0).all() and (box[3:] < np.array(target.shape)).all()
        assert np.abs(box - mask_box(target)).max() <= math.ceil(0.2 * 14) + 1


# -- metric path ------------------------------------------------------------------------------------
def test_known_mask_pair_gives_known_dice_on_the_file_grid(data_dirs, tmp_path):
    from medvlsam2.core.registry import build

    data = nifti_data(data_dirs[0], preprocess={**PREPROCESS, "spatial_size": list(SHAPE)})
    task = build("tasks", "semantic_seg", {"data": data})
    sample = task.samples("test")[0]  # case 4, with every class
    _, record = task.load_image(sample)
    file_label = np.asarray(nib.load(sample["label"]).dataobj)
    pred = np.stack([file_label == 1, file_label == 2])  # model grid == file grid here
    pred[0, :, :, :8] = False  # cut away part of class 1
    a, b = pred[0], file_label == 1
    expected = 2 * (a & b).sum() / (a.sum() + b.sum())
    targets, spacing = task.metric_targets(sample, record, [1, 2])
    assert spacing == [2.0, 1.0, 1.5]
    scores = task.score(pred, record, targets, spacing, ["left thalamus", "brain stem"])
    assert scores["dice"]["left thalamus"] == pytest.approx(expected, abs=1e-6)
    assert scores["dice"]["brain stem"] == pytest.approx(1.0) and scores["nsd"]["brain stem"] == pytest.approx(1.0)
    assert 0.3 < expected < 0.95
    metrics = task.compute_metrics([
        {"dice": {"left thalamus": 1.0, "lesion": 0.2}, "nsd": {"left thalamus": 1.0, "lesion": 0.4}},
        {"dice": {"left thalamus": 0.5}, "nsd": {"left thalamus": 0.5}},
    ])
    assert metrics["dice/left_thalamus"] == pytest.approx(0.75) and metrics["dice/lesion"] == pytest.approx(0.2)
    assert metrics["mean_dice"] == pytest.approx(0.475) and metrics["num_cases"] == 2


def test_model_grid_scores_match_a_resampled_target(data_dirs):
    from medvlsam2.core.registry import build

    task = build("tasks", "semantic_seg", {"data": nifti_data(data_dirs[0]), "metrics_grid": "model"})
    sample = task.samples("test")[0]
    _, record = task.load_image(sample)
    label = task.model_label(sample, record)
    targets, spacing = task.metric_targets(sample, record, [1, 2, 3])
    assert spacing == pytest.approx([6.0, 1.0, 1.5])  # 24 slices of 2 mm resized to 8
    scores = task.score(targets.astype(bool), record, targets, spacing, list(NAMES.values()))
    assert scores["mean_dice"] == pytest.approx(1.0)
    assert targets.shape == (3, 8, 32, 32) and (targets[2] == (label == 3)).all()


# -- the engine -------------------------------------------------------------------------------------
def test_fit_then_test_runs_the_three_tasks_through_the_engine(data_dirs, tmp_path):
    from medvlsam2.core.run import evaluate, fit

    cfg = run_config(tmp_path, task_entries(*data_dirs), max_steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = fit(cfg)
        metrics = evaluate(cfg, folder / "checkpoints" / "last.ckpt", split="test")
    assert metrics["test/semantic_seg/num_cases"] == 2
    assert metrics["test/referring_seg/num_cases"] == 2
    assert 0.0 <= metrics["test/interactive_seg/dice_click5"] <= 1.0
    assert json.loads((folder / "metrics.json").read_text()) == metrics


def test_a_stage_that_freezes_everything_a_task_trains_is_named_not_an_internal_error(data_dirs, tmp_path):
    # interactive_seg's loss reaches the decoder only (no LLM in its step); a stage that trains
    # LoRA alone gives it nothing to train, and backward would fail with a bare RuntimeError
    from medvlsam2.core.run import fit

    tasks = [task_entries(*data_dirs)[2]]
    stages = [{"name": "joint", "tasks": ["interactive_seg"], "trainable": ["lora"], "max_steps": 2}]
    cfg = run_config(tmp_path, tasks, stages=stages)
    with warnings.catch_warnings(), pytest.raises(ConfigError) as error:
        warnings.simplefilter("ignore")
        fit(cfg)
    message = str(error.value)
    assert "stage 'joint'" in message and "task interactive_seg" in message
    assert "(lora)" in message and "decoder" in message


def test_sam2_volume_decoder_trains_semantic_seg(data_dirs, tmp_path):
    from medvlsam2.core.engine import MedVLModule

    model = {**MODEL, "decoder": {"name": "sam2_volume", "image_encoder": "hiera", "image_size": 64,
                                  "pretrained": False, "prompt_dim": 16, "memory_attention_layers": 1,
                                  "num_maskmem": 2}}
    cfg = run_config(tmp_path, [{"name": "semantic_seg", "max_classes": 2, "data": nifti_data(data_dirs[0])}], model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = MedVLModule(cfg)
    task = module.tasks["semantic_seg"]
    batch = task.collate(list(task.samples("train"))[:1])
    module.train()
    terms = task.training_step(module.model, batch)
    assert {"iou", "object_score"} <= set(terms)  # SAM2's own heads are trained too
    terms["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.model.trunk.seg_projector.parameters())
    module.eval()
    out = task.infer(module.model, batch["volume"], text="brain stem")
    assert out["masks"].shape == (1, 8, 32, 32) and 0.0 <= out["scores"][0] <= 1.0


# -- user errors ------------------------------------------------------------------------------------
def test_config_and_input_errors_name_the_problem(data_dirs, tmp_path):
    from medvlsam2.core.registry import build

    data = nifti_data(data_dirs[0])
    with pytest.raises(ConfigError, match=r"prompts\.answer: template 'Done\.' must contain \{segs\}"):
        build("tasks", "semantic_seg", {"data": data, "prompts": {"answer": ["Done."]}}, path="tasks[0]")
    with pytest.raises(ConfigError, match="metrics_grid: 'file' is not one of original, model"):
        build("tasks", "semantic_seg", {"data": data, "metrics_grid": "file"})
    with pytest.raises(ConfigError, match=r"\.force_box: .* needs answer_boxes: true"):
        build("tasks", "semantic_seg", {"data": data, "force_box": True}, path="tasks[0]")
    with pytest.raises(ConfigError, match="train_prompts"):
        build("tasks", "interactive_seg", {"data": data, "train_prompts": ["scribble"]})
    referring = build("tasks", "referring_seg", {"data": data})
    with pytest.raises(InputError, match="gives no question/answer"):
        referring.samples("train")
    bad = textwrap.dedent(
        f"""
        model: {{encoder: {{name: vit3d}}, llm: null, projector: null, decoder: {{name: prompt_unet}}}}
        tasks: [{{name: semantic_seg, data: {{format: nifti_json, root: {data_dirs[0]}}}}}]
        """
    )
    (tmp_path / "bad.yaml").write_text(bad)
    from medvlsam2.core.engine import MedVLModule

    with pytest.raises(ConfigError, match="model.llm: SemanticSegTask needs the LLM"):
        MedVLModule(load_config([tmp_path / "bad.yaml"]))


def test_classes_option_restricts_what_a_task_prompts_and_scores(module):
    task = module.tasks["interactive_seg"]
    samples = list(task.samples("test"))
    everything = task.collate(samples)["present"]
    task.cfg.classes = ["brain stem"]
    try:
        only = task.collate(samples)["present"]
    finally:
        task.cfg.classes = []
    names = [task.object_names(s) for s in samples]
    assert any(len(p) > 1 for p in everything)
    assert all(names[i][v] == "brain stem" for i, p in enumerate(only) for v in p)
    assert any(only)


# -- answer_boxes: the LLM writes each object's box before its [SEG] ------------------------------
def test_box_text_round_trips_to_the_masks_voxel_box():
    from medvlsam2.plugins.tasks.segmentation import box_text, text_box_voxels

    rng = np.random.default_rng(3)
    for shape in [(8, 32, 32), (12, 64, 64), (5, 17, 23)]:
        for _ in range(20):
            lo = rng.integers(0, np.asarray(shape))
            hi = lo + rng.integers(0, np.asarray(shape) - lo)
            mask = np.zeros(shape, dtype=bool)
            mask[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1] = True
            # written with 2 decimals and read back onto the same grid: the exact voxel box
            assert text_box_voxels(box_text(mask), shape).tolist() == mask_box(mask).tolist()
    assert box_text(np.zeros((4, 4, 4), dtype=bool)) is None
    assert text_box_voxels("It is the left thalamus.", (8, 32, 32)) is None
    assert text_box_voxels("[0.50, 0.5, 0.5, 0.25, 1, 1]", (8, 32, 32)) is None  # min corner above max


@pytest.fixture(scope="module")
def boxed(data_dirs, tmp_path_factory):
    """A model whose semantic and referring answers write boxes."""
    from medvlsam2.core.engine import MedVLModule

    tasks = [{**t, "answer_boxes": True, "box_jitter": 0.0} for t in task_entries(*data_dirs)[:2]]
    cfg = run_config(tmp_path_factory.mktemp("boxed"), tasks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return MedVLModule(cfg)


class DecoderSpy:
    """Records the prompts each decoder call gets, then runs the decoder."""

    def __init__(self, monkeypatch, decoder):
        self.calls = []
        forward = decoder.forward

        def spy(volume, prompts, encoder_output=None):
            self.calls.append(prompts)
            return forward(volume, prompts, encoder_output)

        monkeypatch.setattr(decoder, "forward", spy)


def test_answer_boxes_train_the_box_text_and_prompt_the_decoder_with_the_box(boxed, monkeypatch):
    from medvlsam2.plugins.tasks.segmentation import box_text, text_box_voxels

    spy = DecoderSpy(monkeypatch, boxed.model.decoder)
    answers = []
    tokenize = boxed.model.trunk.tokenize
    monkeypatch.setattr(boxed.model.trunk, "tokenize", lambda p, a=None, **k: answers.append(a) or tokenize(p, a, **k))
    boxed.train()
    try:
        for key in ("semantic_seg", "referring_seg"):
            task = boxed.tasks[key]
            batch = task.collate(list(task.samples("train"))[:2])
            assert math.isfinite(task.training_step(boxed.model, batch)["loss"].item())
            prompts = spy.calls[-1]
            assert prompts.text_embeds is not None and prompts.boxes is not None
            for i, (answer, label) in enumerate(zip(answers[-1], batch["label"])):
                written = [part.rsplit("[", 1)[1] for part in answer.split(SEG_TOKEN)[:-1]]
                assert written, answer
                values = batch["present"][i] if key == "semantic_seg" else [1]
                tight = {box_text(label == v) for v in values}
                for k, box in enumerate(written):
                    # the box before the k-th [SEG] is the tight box of a target mask, and (with
                    # box_jitter 0) the k-th object's decoder box is that same box in voxels
                    assert "[" + box.strip() in tight, (answer, tight)
                    voxels = text_box_voxels("[" + box, label.shape)
                    assert prompts.boxes[i, k].tolist() == voxels.tolist()
    finally:
        boxed.eval()
    referring = boxed.tasks["referring_seg"]
    assert referring.with_seg("It is the left thalamus.", "[0.10, 0.20, 0.30, 0.40, 0.50, 0.60]") == (
        f"It is the left thalamus. [0.10, 0.20, 0.30, 0.40, 0.50, 0.60] {SEG_TOKEN}"
    )
    assert referring.with_seg("Sure, it is [SEG].", "[0.10, 0.20, 0.30, 0.40, 0.50, 0.60]") == (
        f"Sure, it is [0.10, 0.20, 0.30, 0.40, 0.50, 0.60] {SEG_TOKEN}."
    )


def scripted_generate(texts, calls=None):
    """A ``trunk.generate`` that answers ``texts`` in turn, one per prompt (with no [SEG] states,
    so the tasks take them from their teacher-forced pass); ``calls`` collects its arguments."""

    def generate(volume, prompts, **kwargs):
        if calls is not None:
            calls.append({"volume": volume, "prompts": list(prompts), **kwargs})
        b = len(prompts)
        text = [texts.pop(0) for _ in range(b)]
        seg = torch.zeros(b, 0, 16)
        return GenerationOutput(text, torch.zeros(b, 1, dtype=torch.long), torch.zeros(b, 0, 64), seg,
                                torch.zeros(b, 0, dtype=torch.bool))

    return generate


def test_answer_boxes_at_inference_prompt_the_decoder_with_the_box_the_llm_writes(boxed, monkeypatch):
    boxed.eval()  # inference templates (the first of each kind), whichever test ran before
    spy = DecoderSpy(monkeypatch, boxed.model.decoder)
    trunk = boxed.model.trunk
    semantic = boxed.tasks["semantic_seg"]
    volume = semantic.collate(list(semantic.samples("test"))[:1])["volume"]
    # semantic: one generate for every name, one prompt per name; decoding in chunks of max_classes 2
    calls = []
    monkeypatch.setattr(trunk, "generate", scripted_generate([
        " [0.25, 0.00, 0.50, 0.75, 0.50, 1.00] [SEG]", " I cannot tell.", " [0.00, 0.25, 0.25, 1.00, 0.75, 0.75] [SEG]",
    ], calls))
    with torch.no_grad():
        out = semantic.infer(boxed.model, volume, text="left thalamus, brain stem, lesion")
    # the answer is forced up to each name, with no trailing space (training tokenises " [")
    assert calls[0]["answer_prefix"] == ["left thalamus", "brain stem", "lesion"]
    assert calls[0]["prompts"] == [f"Segment the {n}." for n in ("left thalamus", "brain stem", "lesion")]
    assert calls[0]["volume"].shape[0] == 3
    assert out["masks"].shape == (3, 8, 32, 32) and out["text"].count(SEG_TOKEN) == 3
    assert "left thalamus [0.25, 0.00, 0.50, 0.75, 0.50, 1.00] [SEG]" in out["text"]
    assert "brain stem [SEG]" in out["text"] and out["boxes_missing"] == 1
    first, second = spy.calls[-2:]
    assert first.boxes[0].tolist() == [[2, 0, 16, 5, 15, 31], [-1] * 6]  # brain stem: [SEG] alone
    assert second.boxes[0].tolist() == [[0, 8, 8, 7, 23, 23]]
    # force_box: the answer is forced up to the box's "[", so every class gets a box
    semantic.cfg.force_box = True
    try:
        calls = []
        monkeypatch.setattr(trunk, "generate", scripted_generate([
            "0.25, 0.00, 0.50, 0.75, 0.50, 1.00] [SEG]", "0.00, 0.25, 0.25, 1.00, 0.75, 0.75] [SEG]",
        ], calls))
        with torch.no_grad():
            out = semantic.infer(boxed.model, volume, text="left thalamus, brain stem")
        assert calls[0]["answer_prefix"] == ["left thalamus [", "brain stem ["]
        assert "brain stem [0.00, 0.25, 0.25, 1.00, 0.75, 0.75] [SEG]" in out["text"] and out["boxes_missing"] == 0
        assert spy.calls[-1].boxes[0].tolist() == [[2, 0, 16, 5, 15, 31], [0, 8, 8, 7, 23, 23]]
        # the forced prefix is the start of what training answers tokenise to
        prompt = semantic.fill("prompt", names="brain stem")
        trained = trunk.tokenize([prompt], ["brain stem [0.00, 0.25, 0.25, 1.00, 0.75, 0.75] [SEG]."]).input_ids[0].tolist()
        forced = trunk.tokenize([prompt], answer_prefix=["brain stem ["]).input_ids[0].tolist()
        assert trained[: len(forced)] == forced
    finally:
        semantic.cfg.force_box = False
    # a user's box replaces the written one
    monkeypatch.setattr(trunk, "generate", scripted_generate(["[0.25, 0.00, 0.50, 0.75, 0.50, 1.00] [SEG]"]))
    with torch.no_grad():
        semantic.infer(boxed.model, volume, text="left thalamus", box=np.array([1, 2, 3, 4, 5, 6]))
    assert spy.calls[-1].boxes[0].tolist() == [[1, 2, 3, 4, 5, 6]]

    referring = boxed.tasks["referring_seg"]
    batch = referring.collate(list(referring.samples("test")))
    monkeypatch.setattr(trunk, "generate", scripted_generate([
        "It is the rounded structure. [0.00, 0.00, 0.00, 0.50, 0.50, 0.50] [SEG]", "It is the elongated one.",
    ]))
    with torch.no_grad():
        predictions = referring.predict_step(boxed.model, batch)
    assert spy.calls[-1].boxes[:, 0].tolist() == [[0, 0, 0, 3, 15, 15], [-1] * 6]
    assert [p["boxed"] for p in predictions] == [True, False]
    metrics = referring.compute_metrics(predictions)
    assert metrics["box_failure_rate"] == 0.5
    monkeypatch.setattr(trunk, "generate", scripted_generate(["[0.0, 0.0, 0.0, 1.0, 1.0, 1.0] [SEG]"] * 4))
    with torch.no_grad():
        semantic_metrics = semantic.compute_metrics(semantic.predict_step(boxed.model, semantic.collate(list(semantic.samples("test"))[:1])))
    assert semantic_metrics["box_failure_rate"] == 0.0


def test_answer_boxes_needs_a_decoder_that_takes_boxes(boxed, monkeypatch):
    task = boxed.tasks["semantic_seg"]
    monkeypatch.setattr(boxed.model.decoder, "accepts", frozenset({"text"}))
    with pytest.raises(ConfigError, match=r"takes no box prompts, which SemanticSegTask.answer_boxes needs"):
        task.configure_heads(boxed.model)
