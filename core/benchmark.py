"""``medvlsam2 benchmark --config configs/benchmark/<name>.yaml``: a grid of runs, peers, scaling.

A benchmark config names base run config file(s), a grid of replacements (dotted key -> values,
or named cells), a budget, seeds and peers. Every job (a cell and seed, a peer, a scaling
series) runs in its own subprocess (``python -m medvlsam2.core.benchmark_worker``): memory is
measured per job, a crash stays inside its job, and the job's result JSON is written atomically,
so a killed benchmark resumes and skips finished jobs. The report (``benchmark.csv``,
``ratios.csv``, ``benchmark.md``, PNG plots) is rebuilt from those JSON files.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from medvlsam2.core.checkpoint import atomic_write_text
from medvlsam2.core.config import apply_overrides, load_config, merge_schema, read_yaml
from medvlsam2.core.errors import ConfigError

#: Bumped when what a job measures changes, so old results are not reused.
HARNESS_VERSION = 1
PEERS = ("segresnet", "vista3d", "sam2_video")
SCALING_SERIES = ("depth", "size", "tokens")


# -- the schema ------------------------------------------------------------------------------
@dataclass
class BudgetConfig:
    """The same training budget for every cell and peer."""

    #: Optimiser steps per training stage (a peer trains this many steps on each task).
    steps: int | None = 20
    #: Wall-clock training time per cell (split evenly over its stages); stops a stage early.
    minutes: float | None = None
    #: Timed inference runs per task after one warm-up run; the median is reported.
    latency_repeats: int = 3
    #: Test volumes timed per task.
    latency_cases: int = 1
    #: A job running longer than this is killed and recorded as failed.
    job_timeout_minutes: float = 60.0


@dataclass
class PeersConfig:
    """Peers trained and scored on the same data and budget as the cells."""

    #: Any of segresnet, vista3d, sam2_video.
    names: list[str] = field(default_factory=list)
    #: Segmentation tasks the peers run on (those present in the base config).
    tasks: list[str] = field(default_factory=lambda: ["semantic_seg", "interactive_seg", "referring_seg"])
    lr: float = 1.0e-3
    #: MONAI SegResNet arguments (random init).
    segresnet: dict[str, Any] = field(default_factory=lambda: {"init_filters": 8, "blocks_down": [1, 2, 2], "blocks_up": [1, 1]})
    #: Small VISTA3D: SegResNetDS2 width and depth (random init; the paper model is 48 wide, 5 levels).
    vista3d: dict[str, Any] = field(default_factory=lambda: {"feature_size": 16, "blocks_down": [1, 2, 2]})
    #: The SAM2 video predictor also runs with the trained decoder weights of each sam2_volume cell.
    sam2_video_trained: bool = True


@dataclass
class ScalingConfig:
    """Inference time and peak memory as the volume (or the visual token count) grows."""

    #: "model" (the whole base model, semantic_seg inference) and/or decoder registry names.
    targets: list[str] = field(default_factory=lambda: ["model", "sam2_volume", "prompt_unet"])
    series: list[str] = field(default_factory=lambda: list(SCALING_SERIES))
    depths: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])
    #: Slice size (H = W) of the depth series.
    depth_hw: int = 64
    sizes: list[int] = field(default_factory=lambda: [64, 128, 256])
    #: Depth of the size series.
    size_depth: int = 16
    #: Projector pool grids of the token series (the whole model only).
    pool_grids: list[list[int]] = field(default_factory=lambda: [[1, 2, 2], [2, 2, 2], [2, 4, 4], [4, 4, 4], [4, 8, 8]])
    #: Volume of the token series (D, H, W).
    tokens_volume: list[int] = field(default_factory=lambda: [16, 32, 32])
    repeats: int = 2
    #: Largest D*H*W per target; bigger points are skipped and listed as skipped (CPU budget).
    max_voxels: dict[str, int] = field(default_factory=dict)
    #: Decoder arguments per decoder target (defaults: the base config's decoder when its name matches).
    decoders: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class BenchmarkConfig:
    name: str = "benchmark"
    #: Run config file(s) every cell starts from, merged left to right (relative to the
    #: current folder, else to this file's folder).
    base: list[str] = MISSING
    #: ``key.path=value`` overrides applied to every cell (merge semantics, as on the command line).
    overrides: list[str] = field(default_factory=list)
    #: Dotted key -> list of values; the cells are the cartesian product. A value replaces the
    #: whole node (a mapping value is not merged into the base's mapping).
    grid: dict[str, list[Any]] = field(default_factory=dict)
    #: Named cells: cell name -> {dotted key: value}, replacing nodes like grid values.
    cells: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Demo data folder (sets ``vars.demo_data``); None: the base config's own data.
    dataset: str | None = None
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    seeds: list[int] = field(default_factory=lambda: [0])
    peers: PeersConfig = field(default_factory=PeersConfig)
    scaling: ScalingConfig | None = None
    #: Results go to ``output_dir/name``.
    output_dir: str = "runs/benchmark"
    #: Side of the square GEMM timed for the machine's matmul peak (MFU denominator).
    gemm_size: int = 2048
    #: Run the jobs at this niceness (0: unchanged); the machine may be shared.
    nice: int = 0


def read_benchmark_config(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The validated benchmark config; unknown keys raise a ``ConfigError`` with their dotted path."""
    raw = apply_overrides(read_yaml(path), overrides)
    cfg = merge_schema(BenchmarkConfig, OmegaConf.to_container(raw, resolve=False))
    budget = cfg.budget
    if budget.steps is None and budget.minutes is None:
        raise ConfigError("config: budget: give steps or minutes")
    if budget.steps is not None and budget.steps < 1:
        raise ConfigError(f"config: budget.steps: expected at least 1, got {budget.steps}")
    if budget.minutes is not None and budget.minutes <= 0:
        raise ConfigError(f"config: budget.minutes: expected a positive number, got {budget.minutes}")
    if budget.latency_repeats < 1 or budget.latency_cases < 1:
        raise ConfigError("config: budget.latency_repeats and budget.latency_cases must be at least 1")
    for name in cfg.peers.names:
        if name not in PEERS:
            raise ConfigError(f"config: peers.names: unknown peer '{name}'; peers: {', '.join(PEERS)}")
    if not cfg.seeds:
        raise ConfigError("config: seeds: give at least one seed")
    for key, values in cfg.grid.items():
        if not isinstance(values, Sequence) and not OmegaConf.is_list(values) or len(values) == 0:
            raise ConfigError(f"config: grid.{key}: expected a non-empty list of values")
    if cfg.grid and cfg.cells:
        raise ConfigError("config: give either grid or cells, not both")
    if cfg.scaling is not None:
        for series in cfg.scaling.series:
            if series not in SCALING_SERIES:
                raise ConfigError(f"config: scaling.series: unknown series '{series}'; series: {', '.join(SCALING_SERIES)}")
    return cfg


# -- cells -----------------------------------------------------------------------------------
@dataclass
class Cell:
    """One point of the grid: a name and the replacements it makes to the base config."""

    name: str
    replace: dict[str, Any]


def _value_label(value: Any) -> str:
    if isinstance(value, Mapping):
        return str(value.get("name", hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()[:6]))
    return str(value)


def expand_cells(cfg: DictConfig) -> list[Cell]:
    """The cartesian product of ``grid`` (or the named ``cells``); one unnamed cell without either."""
    if cfg.cells:
        return [Cell(str(name), dict(OmegaConf.to_container(rep, resolve=False))) for name, rep in cfg.cells.items()]
    grid = OmegaConf.to_container(cfg.grid, resolve=False)
    if not grid:
        return [Cell("base", {})]
    keys = list(grid)
    cells = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        name = "+".join(_value_label(v) for v in combo)
        cells.append(Cell(name, dict(zip(keys, combo))))
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise ConfigError("config: grid: two cells get the same name; give mapping values distinct `name`s or use cells")
    return cells


def _find(path: str, config_dir: Path) -> Path:
    candidate = Path(path)
    if candidate.is_file() or candidate.is_absolute():
        return candidate
    beside = config_dir / candidate
    return beside if beside.is_file() else candidate


def cell_run_config(cfg: DictConfig, cell: Cell, seed: int, config_dir: Path, *, dataset: str | None = None) -> DictConfig:
    """The cell's unresolved run config: base files, grid replacements, overrides, data, seed."""
    merged = OmegaConf.create({})
    for path in cfg.base:
        merged = OmegaConf.merge(merged, read_yaml(_find(path, config_dir)))
    for key, value in cell.replace.items():
        try:
            OmegaConf.update(merged, key, value, merge=False, force_add=True)
        except Exception as err:  # noqa: BLE001 - OmegaConf raises several types here
            raise ConfigError(f"config: cell '{cell.name}': cannot set '{key}': {err}") from err
    merged = apply_overrides(merged, list(cfg.overrides))
    data = dataset if dataset is not None else cfg.dataset
    if data is not None:
        OmegaConf.update(merged, "vars.demo_data", str(data), force_add=True)
    OmegaConf.update(merged, "seed", int(seed), force_add=True)
    return merged


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in text)[:80]


# -- jobs ------------------------------------------------------------------------------------
@dataclass
class Job:
    """One subprocess: its spec (written to ``spec.json``) and where its result goes."""

    kind: str
    label: str
    folder: Path
    spec: dict[str, Any]
    after: list[str] = field(default_factory=list)

    @property
    def result_path(self) -> Path:
        return self.folder / "result.json"

    @property
    def key(self) -> str:
        return _digest({"version": HARNESS_VERSION, "kind": self.kind, "spec": self.spec})

    def finished(self) -> bool:
        if not self.result_path.is_file():
            return False
        try:
            return json.loads(self.result_path.read_text()).get("key") == self.key
        except json.JSONDecodeError:
            return False


def plan(cfg: DictConfig, config_path: Path) -> tuple[Path, list[Job]]:
    """Every job of the benchmark (cells x seeds, peers, scaling series), validated up front."""
    out = Path(cfg.output_dir) / safe_name(cfg.name)
    config_dir = config_path.parent
    budget = OmegaConf.to_container(cfg.budget, resolve=True)
    common = {"budget": budget, "gemm_size": int(cfg.gemm_size)}
    jobs: list[Job] = []
    cells = expand_cells(cfg) if (cfg.grid or cfg.cells or cfg.scaling is None) else []
    first_run: dict[int, DictConfig] = {}
    for cell in cells:
        for seed in cfg.seeds:
            raw = cell_run_config(cfg, cell, int(seed), config_dir)
            resolved = _validated(raw, f"cell '{cell.name}'")
            first_run.setdefault(int(seed), raw)
            folder = out / "cells" / f"{safe_name(cell.name)}__seed{seed}"
            spec = {**common, "cell": cell.name, "seed": int(seed), "replace": cell.replace,
                    "run_config": OmegaConf.to_container(raw, resolve=False)}
            jobs.append(Job("cell", f"cell {cell.name} seed {seed}", folder, spec))
            dec = resolved.model.decoder
            if "sam2_video" in cfg.peers.names and cfg.peers.sam2_video_trained and dec is not None and dec["name"] == "sam2_volume":
                jobs.append(_peer_job(cfg, out, common, "sam2_video", raw, int(seed), trained_from=cell.name,
                                      cell_folder=folder))
    peers = [p for p in cfg.peers.names]
    for seed, raw in first_run.items():
        for peer in peers:
            if peer == "sam2_video":
                decoders = {}
                for cell in cells:
                    cell_raw = cell_run_config(cfg, cell, seed, config_dir)
                    dec = OmegaConf.to_container(load_config_from(cell_raw).model.decoder, resolve=True)
                    if dec is not None and dec["name"] == "sam2_volume":
                        decoders.setdefault(_digest(dec), cell_raw)
                for cell_raw in decoders.values():
                    jobs.append(_peer_job(cfg, out, common, peer, cell_raw, seed))
            else:
                jobs.append(_peer_job(cfg, out, common, peer, raw, seed))
    if cfg.scaling is not None:
        jobs += _scaling_jobs(cfg, out, config_dir)
    return out, jobs


def load_config_from(raw: DictConfig) -> DictConfig:
    """A run config validated from an unresolved DictConfig (through a temporary YAML text)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.yaml"
        path.write_text(OmegaConf.to_yaml(raw, resolve=False))
        return load_config([path])


def _validated(raw: DictConfig, where: str) -> DictConfig:
    try:
        return load_config_from(raw)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from err


def _peer_job(
    cfg: DictConfig, out: Path, common: dict[str, Any], peer: str, raw: DictConfig, seed: int,
    *, trained_from: str | None = None, cell_folder: Path | None = None,
) -> Job:
    run_config = OmegaConf.to_container(raw, resolve=False)
    spec = {**common, "peer": peer, "seed": seed, "run_config": run_config,
            "peers": OmegaConf.to_container(cfg.peers, resolve=True)}
    label = peer
    if peer == "sam2_video":
        dec = OmegaConf.to_container(load_config_from(raw).model.decoder, resolve=True)
        spec["decoder"] = dec
        label = f"sam2_video[{trained_from}]" if trained_from else f"sam2_video[init {_digest(dec)[:6]}]"
    if trained_from is not None:
        spec["trained_from"] = trained_from
        spec["checkpoint"] = str(cell_folder / "run" / "checkpoints" / "last.ckpt")
    folder = out / "peers" / f"{safe_name(label)}__seed{seed}"
    return Job("peer", f"peer {label} seed {seed}", folder, spec, after=[f"cell {trained_from} seed {seed}"] if trained_from else [])


def _scaling_jobs(cfg: DictConfig, out: Path, config_dir: Path) -> list[Job]:
    sc = cfg.scaling
    raw = cell_run_config(cfg, Cell("base", {}), int(cfg.seeds[0]), config_dir)
    resolved = _validated(raw, "scaling base config")
    base_decoder = OmegaConf.to_container(resolved.model.decoder, resolve=True) if resolved.model.decoder else None
    jobs = []
    for target in sc.targets:
        if target != "model":
            args = dict(OmegaConf.to_container(sc.decoders, resolve=True).get(target) or {})
            if not args and base_decoder is not None and base_decoder["name"] == target:
                args = {k: v for k, v in base_decoder.items() if k != "name"}
            decoder = {"name": target, **args}
        for series in sc.series:
            if series == "tokens" and target != "model":
                continue
            if series == "depth":
                points = [[int(d), sc.depth_hw, sc.depth_hw] for d in sc.depths]
            elif series == "size":
                points = [[sc.size_depth, int(s), int(s)] for s in sc.sizes]
            else:
                points = [list(sc.tokens_volume) for _ in sc.pool_grids]
            spec = {
                "target": target, "series": series, "points": points,
                "pool_grids": [list(g) for g in sc.pool_grids] if series == "tokens" else None,
                "repeats": int(sc.repeats), "max_voxels": (OmegaConf.to_container(sc.max_voxels) or {}).get(target),
                "run_config": OmegaConf.to_container(raw, resolve=False),
                "decoder": decoder if target != "model" else None,
            }
            jobs.append(Job("scaling", f"scaling {target} {series}", out / "scaling" / f"{safe_name(target)}__{series}", spec))
    return jobs


# -- running ---------------------------------------------------------------------------------
def run_job(job: Job, *, nice: int = 0, timeout_s: float | None = None) -> dict[str, Any]:
    """Run ``job`` in a fresh Python process; returns its result (or a failure record)."""
    job.folder.mkdir(parents=True, exist_ok=True)
    spec_path = job.folder / "spec.json"
    atomic_write_text(spec_path, json.dumps({"kind": job.kind, "key": job.key, **job.spec}, indent=2, default=str))
    command = [sys.executable, "-m", "medvlsam2.core.benchmark_worker", str(spec_path)]
    if nice > 0:
        command = ["nice", "-n", str(int(nice)), *command]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error"}
    start = time.perf_counter()
    with (job.folder / "log.txt").open("w") as log:
        try:
            proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = -9
    if code == 0 and job.finished():
        return json.loads(job.result_path.read_text())
    tail = (job.folder / "log.txt").read_text(errors="replace").strip().splitlines()[-3:]
    failure = {"key": job.key, "kind": job.kind, "label": job.label, "failed": True, "returncode": code,
               "error": " | ".join(tail), "wall_s": time.perf_counter() - start}
    atomic_write_text(job.folder / "failed.json", json.dumps(failure, indent=2))
    return failure


def run_benchmark(config: str | Path, overrides: Sequence[str] = (), *, command: str | None = None,
                  echo: Any = print, report_only: bool = False) -> Path:
    """Run (or resume) every job of the benchmark at ``config`` and write the report; returns its folder.

    ``report_only`` rebuilds the report from the jobs finished so far and runs nothing.
    """
    from medvlsam2.core.benchmark_report import write_report

    config = Path(config)
    cfg = read_benchmark_config(config, overrides)
    out, jobs = plan(cfg, config)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "benchmark.yaml", OmegaConf.to_yaml(cfg))
    timeout = float(cfg.budget.job_timeout_minutes) * 60
    done: dict[str, dict[str, Any]] = {}
    total = len(jobs)
    echo(f"benchmark '{cfg.name}': {total} job(s) -> {out}")
    for i, job in enumerate(jobs, start=1):
        prefix = f"[{i}/{total}] {job.label}"
        if job.finished():
            done[job.label] = json.loads(job.result_path.read_text())
            echo(f"{prefix}: finished earlier, skipped")
            continue
        if report_only:
            echo(f"{prefix}: not finished (report only)")
            continue
        blocked = [a for a in job.after if done.get(a, {}).get("failed", a not in done)]
        if blocked:
            echo(f"{prefix}: skipped ({blocked[0]} did not finish)")
            continue
        echo(f"{prefix}: running ...")
        start = time.perf_counter()
        result = run_job(job, nice=int(cfg.nice), timeout_s=timeout)
        done[job.label] = result
        status = f"FAILED ({result.get('error', '')})" if result.get("failed") else "done"
        echo(f"{prefix}: {status} in {time.perf_counter() - start:.0f} s")
    command = command or f"medvlsam2 benchmark --config {shlex.quote(str(config))}"
    write_report(out, cfg, jobs, command=command, echo=echo)
    return out
