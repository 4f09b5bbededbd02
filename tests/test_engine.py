"""Training engine: stages, run folder, resume after SIGKILL, DDP on two CPU processes.

Uses the example plugin's encoder + classification task, so it exercises the engine alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_example_plugin import make_dataset

from medvlsam2.core.checkpoint import load_checkpoint
from medvlsam2.core.config import load_config
from medvlsam2.core.errors import ConfigError
from medvlsam2.core.run import evaluate, fit


def write_config(tmp_path: Path, extra: str = "", epochs: int = 3) -> Path:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    make_dataset(data)
    path = tmp_path / "run.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            model:
              encoder: {{name: simple_cnn3d, widths: [8, 16]}}
              projector: null
              llm: null
              decoder: null
            tasks:
              - {{name: volume_classification, classes: [normal, lesion], input_size: [16, 16, 16], data: {{root: {data}}}}}
            trainer: {{max_epochs: {epochs}, batch_size: 2, enable_progress_bar: false, accelerator: cpu, log_every_n_steps: 1}}
            output_dir: {tmp_path / "runs"}
            seed: 3
            """
        )
        + extra
    )
    return path


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(ckpt)["state_dict"]


def test_fit_writes_the_run_folder_and_test_scores(tmp_path):
    cfg = load_config([write_config(tmp_path)])
    folder = fit(cfg)
    for name in ("config.yaml", "checkpoints/last.ckpt", "metrics.csv", "state.json"):
        assert (folder / name).is_file(), name
    assert load_config([folder / "config.yaml"]).seed == 3
    metrics = evaluate(cfg, folder / "checkpoints" / "last.ckpt", split="test")
    assert metrics["test/volume_classification/num_cases"] == 2
    assert 0.0 <= metrics["test/volume_classification/accuracy"] <= 1.0
    assert json.loads((folder / "metrics.json").read_text()) == metrics


def test_training_runs_in_train_mode_even_when_fit_starts_in_eval_mode(tmp_path):
    # plugins keep frozen pretrained parts in eval mode through train(), so training calls it
    import lightning as L

    modes = []

    class Watch(L.Callback):
        def on_fit_start(self, trainer, module):
            module.eval()  # as after an evaluation in the same process

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            modes.append(module.training and module.model.encoder.training)

    fit(load_config([write_config(tmp_path, epochs=1)]), callbacks=[Watch()])
    assert modes and all(modes)


def test_stages_freeze_by_component_and_chain_weights(tmp_path):
    stages = """
stages:
  - {name: probe, tasks: [volume_classification], trainable: [heads], max_epochs: 2, lr: 0.01}
  - {name: tune, tasks: [volume_classification], trainable: [encoder], max_epochs: 2}
"""
    cfg = load_config([write_config(tmp_path, stages)])
    folder = fit(cfg)
    probe = weights(folder / "checkpoints" / "probe" / "last.ckpt")
    tune = weights(folder / "checkpoints" / "tune" / "last.ckpt")
    enc_key = next(k for k in probe if k.startswith("model._encoder"))
    head_key = next(k for k in probe if k.startswith("tasks."))
    # Stage 'tune' trained the encoder only and started from 'probe': its head is probe's.
    assert torch.equal(probe[head_key], tune[head_key])
    assert not torch.equal(probe[enc_key], tune[enc_key])
    assert json.loads((folder / "state.json").read_text())["completed"] == ["probe", "tune"]
    assert torch.equal(weights(folder / "checkpoints" / "last.ckpt")[enc_key], tune[enc_key])


def test_checkpoints_leave_out_what_no_stage_trains_and_load_it_back_checked(tmp_path):
    from medvlsam2.core.checkpoint import FROZEN_CHECKSUMS
    from medvlsam2.core.errors import InputError
    from medvlsam2.core.export import _build_module
    from medvlsam2.core.run import load_weights

    stages = """
stages:
  - {name: probe, tasks: [volume_classification], trainable: [heads], max_epochs: 1, lr: 0.01}
  - {name: probe2, tasks: [volume_classification], trainable: [heads], max_epochs: 2}
"""
    cfg = load_config([write_config(tmp_path, stages)])
    keep: dict = {}
    folder = fit(cfg, keep=keep)
    trained = keep["module"]
    encoder = {n for n, _ in trained.named_parameters() if n.startswith("model._encoder.")}
    assert encoder
    for stage in ("probe", "probe2"):
        saved = load_checkpoint(folder / "checkpoints" / stage / "last.ckpt")
        assert not encoder & saved["state_dict"].keys()
        assert set(saved[FROZEN_CHECKSUMS]) == encoder
        assert any(k.startswith("tasks.") for k in saved["state_dict"])
    # a module rebuilt from the config and given the checkpoint is the trained one, exactly
    rebuilt = _build_module(cfg)
    load_weights(rebuilt, folder / "checkpoints" / "last.ckpt")
    expected = trained.state_dict()
    assert rebuilt.state_dict().keys() == expected.keys()
    for key, value in rebuilt.state_dict().items():
        assert torch.equal(value, expected[key]), key
    # Lightning's resume of an unfinished stage reads the partial checkpoint too
    (folder / "state.json").write_text(json.dumps({"completed": ["probe"]}))
    resumed = fit(load_config([folder / "config.yaml"], ["stages.1.max_epochs=3"]))
    assert load_checkpoint(resumed / "checkpoints" / "probe2" / "last.ckpt")["epoch"] == 2
    # a frozen weight rebuilt differently (another pretrained file, seed or library) is refused
    other = _build_module(cfg)
    with torch.no_grad():
        next(p for n, p in other.named_parameters() if n in encoder).add_(1.0)
    with pytest.raises(InputError, match="frozen weight\\(s\\) rebuilt from the config differ .*model._encoder."):
        load_weights(other, folder / "checkpoints" / "last.ckpt")


def test_unknown_component_and_stage_are_named(tmp_path):
    from medvlsam2.core.errors import ConfigError

    bad = "stages:\n  - {name: s, tasks: [volume_classification], trainable: [encodr]}\n"
    with pytest.raises(ConfigError, match="unknown component 'encodr' \\(did you mean 'encoder'\\?\\)"):
        fit(load_config([write_config(tmp_path, bad)]))
    with pytest.raises(ConfigError, match="--stage: no stage 'nope'"):
        fit(load_config([write_config(tmp_path)]), only_stage="nope")


KILL_SCRIPT = """
import os, signal, sys
import lightning as L
from medvlsam2.core.config import load_config
from medvlsam2.core.errors import ConfigError
from medvlsam2.core.run import fit

class KillAfterFirstCheckpoint(L.Callback):
    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == 2:   # epochs 0 and 1 are checkpointed
            os.kill(os.getpid(), signal.SIGKILL)

fit(load_config([sys.argv[1]]), callbacks=[KillAfterFirstCheckpoint()])
"""


def test_run_killed_with_sigkill_resumes_to_the_same_weights(tmp_path):
    config = write_config(tmp_path, "run_name: killed\n", epochs=4)
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    killed = subprocess.run([sys.executable, str(script), str(config)], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    folder = tmp_path / "runs" / "killed"
    interrupted = load_checkpoint(folder / "checkpoints" / "train" / "last.ckpt")
    assert interrupted["epoch"] == 1
    assert not (folder / "checkpoints" / "last.ckpt").exists()
    resumed = subprocess.run(
        [sys.executable, "-m", "medvlsam2", "fit", "--resume", str(folder)], capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    straight_cfg = load_config([config], ["run_name=straight"])
    straight = fit(straight_cfg)
    a = weights(folder / "checkpoints" / "last.ckpt")
    b = weights(straight / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_ddp_on_two_cpu_processes(tmp_path):
    config = write_config(tmp_path, "run_name: ddp\n", epochs=2)
    out = subprocess.run(
        [
            sys.executable, "-m", "medvlsam2", "fit", "--config", str(config),
            "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
        ],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log
    folder = tmp_path / "runs" / "ddp"
    files = sorted(p.relative_to(folder / "checkpoints").as_posix() for p in (folder / "checkpoints").rglob("*.ckpt"))
    assert files == ["last.ckpt", "train/last.ckpt"]
    ckpt = load_checkpoint(folder / "checkpoints" / "last.ckpt")
    # 4 training samples, batch 2 per rank -> 2 steps an epoch on each rank, 2 epochs.
    assert ckpt["global_step"] == 4


def test_a_zero_evaluation_limit_is_refused_before_anything_runs(tmp_path):
    """Lightning applies limit_val_batches / limit_test_batches to validate and test as well as
    to fit; at 0 they would score nothing without a word. Without the test after fit, 0 is
    allowed (it switches off validation during training, as the demo does)."""
    cfg = load_config([write_config(tmp_path, epochs=1)], ["trainer.limit_test_batches=0"])
    with pytest.raises(ConfigError, match=r"trainer\.limit_test_batches: 0 leaves no batch of the test split"):
        fit(cfg)
    assert not (tmp_path / "runs").exists()  # refused before the run folder is written
    cfg = load_config([write_config(tmp_path, epochs=1)], ["trainer.limit_test_batches=0", "trainer.test_after_fit=false",
                                                           "trainer.limit_val_batches=0"])
    folder = fit(cfg)
    ckpt = folder / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match=r"trainer\.limit_val_batches: 0 leaves no batch of the validation split"):
        evaluate(cfg, ckpt, split="validation")
    cfg.trainer.limit_test_batches = None
    assert evaluate(cfg, ckpt, split="test")["test/volume_classification/num_cases"] == 2
