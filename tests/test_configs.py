"""Every shipped config validates; the small ones run (fast_dev_run / a few steps)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medvlsam2.core.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RUN_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "demo_quick.yaml")
# Files under benchmark/ are benchmark configs, except run-config overlays the grids build on.
OVERLAYS = [p for p in sorted((CONFIGS / "benchmark").glob("*.yaml")) if "tasks" in yaml.safe_load(p.read_text())]
BENCHMARKS = [p for p in sorted((CONFIGS / "benchmark").glob("*.yaml")) if p not in OVERLAYS]


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_run_config_validates(path):
    cfg = load_config([path])
    assert cfg.tasks and cfg.model.encoder.name


@pytest.mark.parametrize("path", OVERLAYS, ids=lambda p: p.name)
def test_benchmark_overlay_validates_over_tiny(path):
    assert load_config([CONFIGS / "tiny.yaml", path]).tasks


def test_quick_demo_config_validates_over_the_demo():
    cfg = load_config([CONFIGS / "demo.yaml", CONFIGS / "demo_quick.yaml"])
    full = load_config([CONFIGS / "demo.yaml"])
    # the same stages, each shorter
    assert [s.name for s in cfg.stages] == [s.name for s in full.stages]
    assert all(q.max_steps < f.max_steps for q, f in zip(cfg.stages, full.stages))


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_config_validates(path):
    from medvlsam2.core.benchmark import expand_cells, read_benchmark_config

    assert expand_cells(read_benchmark_config(path))


def test_tiny_config_runs_a_fast_dev_run(tmp_path):
    from medvlsam2.core.run import fit

    cfg = load_config(
        [CONFIGS / "tiny.yaml"],
        [f"output_dir={tmp_path}", f"vars.demo_data={tmp_path / 'data'}", "trainer.fast_dev_run=true", "trainer.enable_progress_bar=false"],
    )
    folder = fit(cfg)
    assert (folder / "config.yaml").is_file()
    assert (folder / "metrics.json").is_file()
