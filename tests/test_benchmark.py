"""The benchmark harness on a 2-cell grid of tiny models (configs/benchmark/tiny_grid.yaml).

Checks the harness, not the figures: the files and columns it writes, resume skipping finished
jobs, the ours/peer ratios, scaling fits, and config errors that name the bad key.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from medvlsam2.core.benchmark import expand_cells, read_benchmark_config, run_benchmark
from medvlsam2.core.benchmark_report import COLUMNS, RATIO_COLUMNS, ratio_rows
from medvlsam2.core.benchmark_scaling import fit_exponent
from medvlsam2.core.cli import main
from medvlsam2.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
GRID = REPO / "configs" / "benchmark" / "tiny_grid.yaml"


def _grid_config(tmp_path: Path, extra: str = "") -> Path:
    text = GRID.read_text().replace("base: [configs/", f"base: [{REPO}/configs/").replace(
        ", configs/benchmark/", f", {REPO}/configs/benchmark/")
    path = tmp_path / "grid.yaml"
    path.write_text(text + f"output_dir: {tmp_path / 'out'}\ndataset: {REPO / 'runs' / 'demo-data-tiny'}\n" + extra)
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    tmp = tmp_path_factory.mktemp("bench")
    config = _grid_config(tmp)
    lines: list[str] = []
    folder = run_benchmark(config, echo=lines.append)
    return config, folder, lines


def test_benchmark_writes_csv_markdown_and_plots(finished):
    _, folder, lines = finished
    with (folder / "benchmark.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert set(COLUMNS) <= set(rows[0])
    assert {"dice_box", "dice_click1", "dice_click2"} <= set(rows[0])
    ours = {(r["name"], r["task"]) for r in rows if r["kind"] == "ours" and r["status"] == "ok"}
    assert ours == {(c, t) for c in ("unet_8_16", "unet_4_8") for t in ("semantic_seg", "interactive_seg")}
    for r in rows:
        assert r["status"] == "ok", r
        assert 0.0 <= float(r["score"]) <= 1.0
        assert float(r["latency_ms"]) > 0 and float(r["peak_rss_mb"]) > 100
        assert int(r["params_total"]) >= int(r["params_trainable"]) > 0
        assert float(r["train_samples_per_s"]) > 0 and float(r["gflops_per_sample"]) > 0
        assert float(r["mfu"]) > 0  # not < 1: a busy machine can slow the GEMM more than the model
    peers = {(r["name"], r["task"]) for r in rows if r["kind"] == "peer"}
    assert peers == {("segresnet", "semantic_seg"), ("segresnet", "interactive_seg")}
    md = (folder / "benchmark.md").read_text()
    assert "medvlsam2 benchmark --config" in md and "torch" in md and "cores" in md
    assert "| unet_8_16 | interactive_seg | segresnet |" in md
    for png in ("quality_vs_cost_semantic_seg.png", "quality_vs_cost_interactive_seg.png", "dice_vs_clicks.png"):
        assert (folder / png).stat().st_size > 1000, png
    assert any("report:" in line for line in lines)


def test_ratios_are_ours_over_the_peer(finished):
    _, folder, lines = finished
    with (folder / "ratios.csv").open() as handle:
        ratios = list(csv.DictReader(handle))
    assert set(RATIO_COLUMNS) <= set(ratios[0])
    assert len(ratios) == 4  # 2 cells x 2 tasks x 1 peer
    for r in ratios:
        assert float(r["latency_ratio"]) == pytest.approx(float(r["our_latency_ms"]) / float(r["peer_latency_ms"]), rel=1e-4)
        if float(r["peer_score"]) > 0:
            assert float(r["score_ratio"]) == pytest.approx(float(r["our_score"]) / float(r["peer_score"]), rel=1e-4)
    assert sum("vs segresnet" in line for line in lines) == 4


def test_resume_skips_finished_jobs_and_reruns_a_missing_one(finished, monkeypatch):
    import medvlsam2.core.benchmark as bench

    config, folder, _ = finished
    peer = folder / "peers" / "segresnet__seed0" / "result.json"
    saved = peer.read_text()
    peer.unlink()  # as if the benchmark had been killed during the peer job
    ran: list[str] = []

    def fake_run(job, **_):
        ran.append(job.label)
        peer.write_text(saved)
        return json.loads(saved)

    monkeypatch.setattr(bench, "run_job", fake_run)
    lines: list[str] = []
    run_benchmark(config, echo=lines.append)
    assert ran == ["peer segresnet seed 0"]
    assert sum("finished earlier, skipped" in line for line in lines) == 2
    # a changed spec (another budget) invalidates the finished results
    assert not any(job.finished() for job in bench.plan(read_benchmark_config(config, ["budget.steps=3"]), config)[1])


def test_ratio_pairs_only_same_seed_and_task():
    rows = [
        {"kind": "ours", "name": "a", "seed": 0, "task": "t", "metric": "m", "score": 0.6, "latency_ms": 30.0, "status": "ok"},
        {"kind": "peer", "name": "p", "seed": 0, "task": "t", "metric": "m", "score": 0.3, "latency_ms": 10.0, "status": "ok"},
        {"kind": "peer", "name": "p", "seed": 1, "task": "t", "metric": "m", "score": 0.9, "latency_ms": 10.0, "status": "ok"},
        {"kind": "peer", "name": "q", "seed": 0, "task": "u", "metric": "m", "score": 0.9, "latency_ms": 10.0, "status": "ok"},
    ]
    (only,) = ratio_rows(rows)
    assert only["peer"] == "p" and only["score_ratio"] == pytest.approx(2.0) and only["latency_ratio"] == pytest.approx(3.0)


def test_fit_exponent_recovers_power_laws():
    xs = [16, 32, 64, 128]
    assert fit_exponent(xs, [0.01 * x for x in xs]) == pytest.approx(1.0)
    assert fit_exponent(xs, [0.001 * x**2 for x in xs]) == pytest.approx(2.0)
    assert fit_exponent([16], [1.0]) is None


def test_bad_benchmark_key_is_a_config_error_naming_it(tmp_path):
    path = _grid_config(tmp_path)
    path.write_text(path.read_text().replace("budget: {steps: 2,", "budget: {stepz: 2,"))
    with pytest.raises(ConfigError, match=r"budget\.stepz"):
        read_benchmark_config(path)
    assert main(["benchmark", "--config", str(path)]) == 2
    with pytest.raises(ConfigError, match=r"peers\.names.*'vista'"):
        read_benchmark_config(_grid_config(tmp_path), ["peers.names=[vista]"])


def test_a_bad_cell_value_is_named_before_anything_runs(tmp_path):
    path = _grid_config(tmp_path, "")
    text = path.read_text().replace("channels: [8, 16]}", "channels: [8, 16], widht: 3}")
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"cell 'unet_8_16'.*model\.decoder\.widht"):
        run_benchmark(path, echo=lambda _: None)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("result.json"))


def test_grid_is_a_cartesian_product_with_replacing_values(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text("base: [x.yaml]\ngrid:\n  seed: [1, 2]\n  model.decoder: [{name: a, k: 1}, {name: b}]\n")
    cells = expand_cells(read_benchmark_config(path))
    assert [c.name for c in cells] == ["1+a", "1+b", "2+a", "2+b"]
    assert cells[1].replace == {"seed": 1, "model.decoder": {"name": "b"}}
    spec = json.loads(json.dumps(cells[0].replace))
    assert spec["model.decoder"] == {"name": "a", "k": 1}


def test_machine_names_the_kernels_the_stack_and_this_checkout():
    """What two runs must share to give the same numbers: the CPU kernels and the versions."""
    import subprocess

    import torch

    import medvlsam2
    from medvlsam2.core.benchmark_report import machine_text
    from medvlsam2.core.benchmark_worker import machine

    info = machine()
    assert info["cpu_kernels"] == torch.backends.cpu.get_cpu_capability()
    assert info["libraries"]["torch"] == torch.__version__ and "peft" in info["libraries"]
    here = Path(medvlsam2.__file__).resolve().parent
    top = subprocess.run(["git", "-C", str(here), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if top.returncode == 0 and Path(top.stdout.strip()).resolve() in (here, here.parent):
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
        assert f"commit {head.stdout.strip()}" in info["medvlsam2"]
    else:  # an installed wheel: the version alone
        assert info["medvlsam2"] == medvlsam2.__version__
    line = machine_text(info)
    assert f"torch {torch.__version__}" in line and f"torch CPU kernels {info['cpu_kernels']}" in line
    # results written before the versions were recorded still read
    old = {"cpu": "AMD EPYC", "cores": 2, "torch_threads": 2, "torch": "2.14.1", "gpu": None}
    assert machine_text(old) == "AMD EPYC, 2 cores (2 torch threads), GPU: none; torch 2.14.1"
