"""encoder_seg: token-level supervision of the volume encoder from label maps."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medvlsam2.core.config import load_config
from medvlsam2.core.errors import ConfigError
from medvlsam2.core.registry import build

MODEL = {
    "encoder": {"name": "vit3d", "img_size": [8, 32, 32], "patch_size": [4, 8, 8], "hidden_size": 32,
                "mlp_dim": 64, "num_layers": 1, "num_heads": 2},
    "projector": {"name": "mlp"},
    "llm": {"name": "hf_causal", "model_type": "llama", "lora_r": 4, "lora_alpha": 8,
            "model_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                             "num_attention_heads": 4, "num_key_value_heads": 2}},
    "decoder": None,
}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Bright 'spot' cubes at random places (file grid = model grid, 8 x 32 x 32) and a fixed 'rim'."""
    root = tmp_path_factory.mktemp("encseg")
    rng = np.random.default_rng(0)
    entries = []
    for i in range(10):
        image = rng.normal(0, 0.05, size=(8, 32, 32)).astype(np.float32)
        label = np.zeros(image.shape, dtype=np.int16)
        label[:, :2, :] = 2
        d, h, w = rng.integers(0, 5), rng.integers(4, 26), rng.integers(0, 26)
        label[d : d + 3, h : h + 6, w : w + 6] = 1
        image[label == 1] += 1.0
        nib.save(nib.Nifti1Image(image, np.eye(4)), root / f"case{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), root / f"case{i}_seg.nii.gz")
        entries.append({"image": f"case{i}.nii.gz", "label": f"case{i}_seg.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "spot", "2": "rim"}, "training": entries[:8], "test": entries[8:],
    }))
    return root


def data(root: Path) -> dict:
    return {"format": "nifti_json", "root": str(root), "splits": {"validation": None},
            "preprocess": {"preset": "ct", "intensity": "minmax", "slice_axis": 0, "spatial_size": [8, 32, 32]}}


def module_for(root: Path, tmp_path: Path, **task: object):
    from omegaconf import OmegaConf

    from medvlsam2.core.engine import MedVLModule

    cfg = {"model": MODEL, "tasks": [{"name": "encoder_seg", "data": data(root), **task}],
           "trainer": {"max_steps": 2, "batch_size": 2, "accelerator": "cpu", "precision": "32-true"},
           "output_dir": str(tmp_path / "runs"), "seed": 0}
    path = tmp_path / "run.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    return MedVLModule(load_config([path]))


def test_targets_are_each_tokens_share_of_a_class_in_token_order(root, tmp_path):
    module = module_for(root, tmp_path, classes=["spot", "rim", "absent"])
    task = module.tasks["encoder_seg"]
    sample = task.samples("train")[0]
    batch = task.collate([sample])
    logits, fractions = task._scores_and_targets(module.model, batch)
    assert logits.shape == fractions.shape == (1, 2 * 4 * 4, 3)  # (8/4) x (32/8) x (32/8) tokens
    label = np.asarray(nib.load(root / "case0_seg.nii.gz").dataobj)
    spot = torch.from_numpy(label == 1).float().reshape(2, 4, 4, 8, 4, 8).mean(dim=(1, 3, 5)).flatten()
    torch.testing.assert_close(fractions[0, :, 0], spot)
    assert bool((fractions[0, :, 1].reshape(2, 4, 4)[:, 0] == 0.25).all()) and float(fractions[0, :, 2].sum()) == 0.0


def test_the_encoder_learns_where_a_class_is(root, tmp_path):
    torch.manual_seed(0)
    module = module_for(root, tmp_path, classes=["spot"], pos_weight=4.0)
    task = module.tasks["encoder_seg"]
    assert module.trainable_components == ["encoder", "heads"]
    train, test = task.samples("train"), task.samples("test")
    before = task.compute_metrics(task.predict_step(module.model, task.collate(test)))
    params = [p for p in [*module.model.encoder.parameters(), *task.parameters()]]
    opt = torch.optim.AdamW(params, lr=3e-3)
    batch = task.collate(train)
    for _ in range(60):
        loss = task.training_step(module.model, batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = task.compute_metrics(task.predict_step(module.model, task.collate(test)))
    assert after["auroc/spot"] > 0.9 and after["auroc/spot"] > before["auroc/spot"]
    assert after["mean_auroc"] == after["auroc/spot"]


def test_presence_auroc_tells_seeing_a_class_from_knowing_where_it_tends_to_be(root):
    task = build("tasks", "encoder_seg", {"data": data(root), "classes": ["lesion"]})
    present = [np.array([[1], [0], [0], [0]], bool)] * 2 + [np.zeros((4, 1), bool)] * 2  # 2 of 4 volumes
    prior = np.array([[1.0], [0.0], [0.0], [0.0]])  # the same map for every volume
    blind = task.compute_metrics([{"scores": prior, "present": p} for p in present])
    assert blind["auroc/lesion"] == pytest.approx(26 / 28)  # 2 hits; 2 of 14 negatives tie with them
    assert blind["presence_auroc/lesion"] == 0.5 and blind["mean_presence_auroc"] == 0.5
    seeing = [prior * (1.0 if p.any() else 0.5) for p in present]
    sees = task.compute_metrics([{"scores": s, "present": p} for s, p in zip(seeing, present)])
    assert sees["presence_auroc/lesion"] == 1.0 and sees["auroc/lesion"] == 1.0
    anatomy = task.compute_metrics([{"scores": prior, "present": np.ones((4, 1), bool) & (prior > 0)}] * 2)
    assert "presence_auroc/lesion" not in anatomy and np.isnan(anatomy["mean_presence_auroc"])


def test_bad_options_name_the_path(root, tmp_path):
    with pytest.raises(ConfigError, match=r"config: tasks\[0\].classes: name the label classes"):
        module_for(root, tmp_path)
    with pytest.raises(ConfigError, match=r"classes: a class is named twice"):
        build("tasks", "encoder_seg", {"data": data(root), "classes": ["spot", "spot"]})
    with pytest.raises(ConfigError, match=r"pos_weight: expected a positive weight, got 0"):
        build("tasks", "encoder_seg", {"data": data(root), "classes": ["spot"], "pos_weight": 0})
