"""The third-party example package: installed via its entry point, chosen by name, built, trained."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch

from medvlsam2.core.config import load_config
from medvlsam2.core.registry import PluginHost


def make_dataset(root):
    rng = np.random.default_rng(0)
    rows = ["image,label,split"]
    for i in range(6):
        label = ["normal", "lesion"][i % 2]
        data = rng.normal(size=(16, 16, 16)).astype(np.float32)
        if label == "lesion":
            data[4:12, 4:12, 4:12] += 4.0
        nib.save(nib.Nifti1Image(data, np.eye(4)), root / f"case{i}.nii.gz")
        rows.append(f"case{i}.nii.gz,{label},{'train' if i < 4 else 'test'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")


def test_example_plugin_selected_from_yaml_builds_and_trains(tmp_path):
    make_dataset(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(
        "model:\n  encoder: {name: simple_cnn3d, widths: [8, 16]}\n"
        "tasks:\n"
        f"  - {{name: volume_classification, classes: [normal, lesion], input_size: [16, 16, 16], data: {{root: {tmp_path}}}}}\n"
    )
    cfg = load_config([config])
    host = PluginHost()
    encoder = host.build("encoders", cfg.model.encoder.name, cfg.model.encoder, path="model.encoder")
    assert encoder.out_dim == 16
    task = host.build("tasks", cfg.tasks[0].name, {k: v for k, v in cfg.tasks[0].items() if k != "weight"})
    batch = task.collate(task.samples("train"))
    assert batch["volume"].shape == (4, 1, 16, 16, 16)

    model = torch.nn.Module()
    model.encoder = encoder
    task.bind(model)
    losses = task.training_step(model, batch)
    params = list(encoder.parameters()) + list(task.parameters())
    optimiser = torch.optim.Adam(params, lr=1e-2)
    first = losses["loss"].item()
    for _ in range(15):
        optimiser.zero_grad()
        loss = task.training_step(model, batch)["loss"]
        loss.backward()
        optimiser.step()
    assert loss.item() < first
    predictions = task.predict_step(model, batch)
    assert task.compute_metrics(predictions)["accuracy"] == 1.0
