"""Faults lose no work: a kill inside a checkpoint write, SIGINT / SIGTERM during ``fit``, bad
volumes met by the data loader, and out-of-memory on one case of ``predict`` over a folder."""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_engine import write_config
from test_errors import VQA, save_untrained
from test_language_tasks import run_config, task_yaml, write_cases

from medvlsam2.core.checkpoint import atomic_torch_save, load_checkpoint
from medvlsam2.core.cli import main
from medvlsam2.core.config import load_config

SLOW_WRITE = """
import os, sys, time, torch
import medvlsam2.core.checkpoint as ck

real_fdopen = os.fdopen

class SlowFile:
    '''Writes the first megabyte, says so, then hangs: the kill lands mid-write.'''
    def __init__(self, handle):
        self.handle, self.written = handle, 0
    def write(self, data):
        self.written += self.handle.write(data)
        if self.written > 1 << 20:
            self.handle.flush()
            print("writing", flush=True)
            time.sleep(600)
        return len(data)
    def __getattr__(self, name):
        return getattr(self.handle, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.handle.close()

ck.os.fdopen = lambda fd, mode: SlowFile(real_fdopen(fd, mode))
ck.atomic_torch_save({"state_dict": {"w": torch.full((4_000_000,), 2.0)}, "epoch": 2}, sys.argv[1])
"""


def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"state_dict": {"w": torch.ones(3)}, "epoch": 1}, target)
    before = target.read_bytes()
    script = tmp_path / "slow.py"
    script.write_text(SLOW_WRITE)
    proc = subprocess.Popen([sys.executable, str(script), str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        partial = list(tmp_path.glob(".last.ckpt.*.tmp"))
        assert len(partial) == 1 and partial[0].stat().st_size > 1 << 20  # the new data is on disk, unfinished
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == before
    old = load_checkpoint(target)
    assert old["epoch"] == 1 and torch.equal(old["state_dict"]["w"], torch.ones(3))


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_fit_stops_cleanly_with_a_checkpoint_to_resume(tmp_path, sig, code):
    # 20 batches an epoch, 2 epochs: the signal lands inside epoch 1, after epoch 0's checkpoint.
    config = write_config(tmp_path, epochs=2)
    config.write_text(config.read_text().replace("log_every_n_steps: 1}", "log_every_n_steps: 1, steps_per_epoch: 20, test_after_fit: false}"))
    folder = tmp_path / "runs" / "run"
    ckpt = folder / "checkpoints" / "train" / "last.ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "medvlsam2", "fit", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # as from a terminal: a test run started as a background job inherits SIGINT ignored,
        # and a process rightly keeps ignoring it then (POSIX; Python does too)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 240
    while not ckpt.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ckpt.is_file(), proc.communicate(timeout=60)[1][-2000:]
    proc.send_signal(sig)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=120)
    assert time.monotonic() - sent < 30  # stops after the current batch, not at the end of the run
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last == f"medvlsam2: stopped by {signal.Signals(sig).name}; checkpoint {ckpt}; continue with: medvlsam2 fit --resume {folder}"
    saved = load_checkpoint(ckpt)
    assert 20 <= saved["global_step"] < 40
    if sig == signal.SIGTERM:  # one resume is enough to show the checkpoint continues (each costs a run)
        resumed = subprocess.run(
            [sys.executable, "-m", "medvlsam2", "fit", "--resume", str(folder)], capture_output=True, text=True, timeout=300
        )
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert load_checkpoint(folder / "checkpoints" / "last.ckpt")["global_step"] == 40


@pytest.fixture(scope="module")
def language_data(tmp_path_factory):
    """The language cases with one training volume (case1) truncated: the reader accepts the row
    (the file exists), the loader meets the bad bytes."""
    root = tmp_path_factory.mktemp("faulty")
    write_cases(root)
    raw = (root / "case1.nii.gz").read_bytes()
    (root / "case1.nii.gz").write_bytes(raw[: len(raw) // 2])
    return root


def test_loader_skips_a_bad_volume_with_skip_bad_and_counts_it(tmp_path, language_data, caplog):
    from medvlsam2.core.run import fit

    config = run_config(tmp_path, task_yaml(language_data, "m3d_vqa", "vqa", VQA))
    cfg = load_config([config], ["tasks.0.data.skip_bad=true", "trainer.test_after_fit=false"])
    with caplog.at_level(logging.WARNING, logger="medvlsam2.core.data"):
        folder = fit(cfg)
    skips = [r.getMessage() for r in caplog.records if "skipping bad sample" in r.getMessage()]
    assert skips and "(1 skipped so far)" in skips[0] and "case1.nii.gz: cannot read NIfTI file" in skips[0]
    assert load_checkpoint(folder / "checkpoints" / "last.ckpt")["global_step"] == 2


def test_loader_worker_stops_on_a_bad_volume_naming_it(tmp_path, language_data, capfd):
    config = run_config(tmp_path, task_yaml(language_data, "m3d_vqa", "vqa", VQA))
    code = main(["fit", "--config", str(config), "trainer.num_workers=1", "trainer.test_after_fit=false"])
    err = capfd.readouterr().err
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("medvlsam2: error: ") and "case1.nii.gz: cannot read NIfTI file" in last
    assert last.endswith("(in a data-loader worker)")


def test_out_of_memory_on_one_case_keeps_the_others(tmp_path, capfd, monkeypatch):
    from medvlsam2.plugins.tasks.data import transforms

    data = tmp_path / "data"
    data.mkdir()
    write_cases(data)
    ckpt = save_untrained(load_config([run_config(tmp_path, task_yaml(data, "m3d_vqa", "vqa", VQA))]), tmp_path / "model")
    cases = tmp_path / "cases"
    cases.mkdir()
    for name, source in (("a", "case4"), ("b", "case5"), ("c", "case4")):
        shutil.copy(data / f"{source}.nii.gz", cases / f"{name}.nii.gz")
    real = transforms.preprocess

    def preprocess(source, cfg="ct"):
        if Path(source).name == "b.nii.gz":
            raise MemoryError
        return real(source, cfg)

    monkeypatch.setattr(transforms, "preprocess", preprocess)
    out = tmp_path / "out"
    base = ["predict", "--model", str(ckpt), "--task", "vqa", "--text", "Which side?"]
    assert main([*base, "--volume", str(cases), "--out", str(out)]) == 1
    captured = capfd.readouterr()
    assert f"medvlsam2: case {cases / 'b.nii.gz'} failed: out of memory" in captured.err
    assert "2 of 3 volumes done" in captured.out
    assert (out / "a" / "answer.json").is_file() and (out / "c" / "answer.json").is_file()
    assert not (out / "b").exists()
    # One volume: the same failure is one error line, exit 2.
    assert main([*base, "--volume", str(cases / "b.nii.gz"), "--out", str(tmp_path / "one")]) == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert lines == [f"medvlsam2: error: {cases / 'b.nii.gz'}: out of memory (try a smaller preprocess.spatial_size)"]


def test_ctrl_c_during_fit_waits_for_the_batch_end_and_a_second_one_does_not():
    """fit's SIGINT handler only marks the interrupt; it is raised at the end of the batch (a
    KeyboardInterrupt raised inside a finalizer would be dropped). A second Ctrl-C raises at once."""
    from medvlsam2.core.run import _deferred_sigint

    interrupt = _deferred_sigint()
    interrupt.on_train_batch_end(None, None, None, None, 0)  # nothing pending: training goes on
    interrupt.handle(signal.SIGINT, None)
    assert interrupt.pending
    with pytest.raises(KeyboardInterrupt):
        interrupt.on_train_batch_end(None, None, None, None, 0)
    with pytest.raises(KeyboardInterrupt):
        interrupt.handle(signal.SIGINT, None)
