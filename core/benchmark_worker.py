"""One benchmark job in its own process: ``python -m medvlsam2.core.benchmark_worker spec.json``.

Running each job in a fresh process makes its peak memory (``ru_maxrss``) its own, keeps a
crash inside the job, and lets the harness resume by the result JSON each job writes
atomically at its end. This module holds the shared measurements (matmul peak, FLOPs, latency,
memory) and the cell job; peers and scaling live in their own modules.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from medvlsam2.core.checkpoint import atomic_write_text


# -- measurements shared by every job --------------------------------------------------------
def device_of(cfg: DictConfig) -> torch.device:
    accel = str(cfg.trainer.accelerator)
    if accel in ("gpu", "cuda") or (accel == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(size: int, device: torch.device, dtype: torch.dtype = torch.float32, repeats: int = 10) -> float:
    """FLOP/s of the best of ``repeats`` square GEMMs: the denominator of the MFU."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def timed(fn: Callable[[], Any], repeats: int, device: torch.device, warmup: int = 1) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of ``fn`` as ``torch.utils.flop_counter`` counts them (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """This process's peak resident memory (Linux reports KiB) and, on GPU, peak allocated memory."""
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 1024**2
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale}
    if device.type == "cuda":
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 1024**2
    return out


#: The libraries whose versions change a run's numbers (their kernels, defaults or tokenisers).
STACK = ("torch", "transformers", "peft", "lightning", "monai", "timm", "sam2", "numpy", "scipy")

#: CPU instruction sets that pick which kernels torch and oneDNN run (AMX: bf16 matmuls in tiles).
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def machine() -> dict[str, Any]:
    """What the numbers were measured on: the hardware and the software.

    Two runs of one config with one seed give the same numbers to the last digit only on the
    same CPU kernels and library versions; this records both, so runs can be compared.
    """
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    import os

    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "gpu": None,
            "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
            "cpu_features": [f for f in CPU_FEATURES if f in flags],
            "libraries": library_versions(), "medvlsam2": source_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def library_versions(names: Sequence[str] = STACK) -> dict[str, str]:
    """Installed version of each of ``names`` (the ones not installed are left out)."""
    from importlib import metadata

    out = {}
    for name in names:
        try:
            # torch's own string names its build (e.g. +cu130), which the metadata may not
            out[name] = torch.__version__ if name == "torch" else metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def source_version() -> str:
    """This package's version and, when it runs from a git checkout, the commit (``+dirty``
    when files differ from it)."""
    import subprocess

    import medvlsam2

    here = Path(medvlsam2.__file__).resolve().parent
    version = str(medvlsam2.__version__)

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10, check=True)
        return done.stdout.strip()

    try:
        # only this package's own checkout, not a repository that happens to contain site-packages
        if Path(git("rev-parse", "--show-toplevel")).resolve() not in (here, here.parent):
            return version
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version} (commit {commit}{'+dirty' if dirty else ''})"


def load_run_config(run_config: dict[str, Any], folder: Path) -> DictConfig:
    """Validate the cell's unresolved run config through ``load_config`` (a YAML file in ``folder``)."""
    from medvlsam2.core.config import load_config

    path = folder / "run_input.yaml"
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(run_config), resolve=False))
    return load_config([path])


def apply_budget(cfg: DictConfig, budget: dict[str, Any]) -> None:
    """Every stage trains ``budget.steps`` steps (or, with only minutes, until its time is up)."""
    steps = budget.get("steps")
    limit = int(steps) if steps is not None else 1_000_000
    if cfg.stages:
        for stage in cfg.stages:
            stage.max_steps = limit
            stage.max_epochs = None
    cfg.trainer.max_steps = limit
    cfg.trainer.max_epochs = None


def main_metrics(metrics: dict[str, float], tasks: dict[str, Any]) -> dict[str, float]:
    """``{task key: its main test metric}`` for every task with one."""
    out = {}
    for key, task in tasks.items():
        name = getattr(type(task), "main_metric", "")
        value = metrics.get(f"test/{key}/{name}")
        if name and value is not None:
            out[key] = float(value)
    return out


class TrainMeter(Callback):
    """Compute time and samples of every training step, per stage (data loading excluded), and
    a wall-clock limit per stage (``budget.minutes``)."""

    def __init__(self, stage_seconds: float | None) -> None:
        self.stage_seconds = stage_seconds
        self.steps: dict[str, list[tuple[int, float]]] = {}
        self._t = 0.0
        self._stage_start = 0.0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._stage_start = time.perf_counter()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        from medvlsam2.core.engine import _batch_size

        stage = pl_module.stage.name if pl_module.stage is not None else "train"
        self.steps.setdefault(stage, []).append((_batch_size(batch), time.perf_counter() - self._t))
        if self.stage_seconds is not None and time.perf_counter() - self._stage_start > self.stage_seconds:
            trainer.should_stop = True


def throughput(steps: list[tuple[int, float]]) -> float | None:
    """Samples per second over the steps after the first (warm-up) step."""
    timed_steps = steps[1:] if len(steps) > 1 else steps
    seconds = sum(t for _, t in timed_steps)
    return sum(n for n, _ in timed_steps) / seconds if seconds > 0 else None


def first_batch(task: Any, split: str, size: int, device: torch.device, start: int = 0) -> dict[str, Any] | None:
    """A collated batch of ``size`` samples of ``split`` (moved to ``device``), or None."""
    samples = list(task.samples(split))[start : start + size]
    if not samples:
        return None
    batch = task.collate(samples)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# -- the cell job ----------------------------------------------------------------------------
def run_cell(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Train the cell with the budget, score the test split, time, count and measure it."""
    import shutil

    import lightning as L

    from medvlsam2.core.config import StageConfig, stage_runs
    from medvlsam2.core.engine import MedVLModule
    from medvlsam2.core.export import trained_names
    from medvlsam2.core.run import evaluate_module, fit, load_weights, stages_of

    budget = spec["budget"]
    cfg = load_run_config(spec["run_config"], folder)
    device = device_of(cfg)
    run = folder / "run"
    if run.exists():  # a half-finished cell starts over: its timings must cover whole stages
        shutil.rmtree(run)
    cfg.output_dir, cfg.run_name = str(folder), "run"
    cfg.trainer.test_after_fit = False
    cfg.trainer.enable_progress_bar = False
    apply_budget(cfg, budget)
    bf16 = "bf16" in str(cfg.trainer.precision)
    peak = matmul_peak(int(spec["gemm_size"]), device, torch.bfloat16 if bf16 else torch.float32)

    stages = stages_of(cfg)
    minutes = budget.get("minutes")
    meter = TrainMeter(minutes * 60 / len(stages) if minutes else None)
    start = time.perf_counter()
    fit(cfg, callbacks=[meter])
    train_seconds = time.perf_counter() - start

    L.seed_everything(int(cfg.seed), verbose=False)
    module = MedVLModule(cfg, StageConfig(name="test", tasks=[]))
    load_weights(module, run / "checkpoints" / "last.ckpt")
    module.to(device)
    total_params = sum(p.numel() for p in module.parameters())
    trainable = trained_names(module)
    trainable_params = sum(p.numel() for n, p in module.named_parameters() if n in trainable)

    # FLOPs first: evaluation runs under inference_mode, and tensors some modules cache there
    # (SAM2's rotary tables) cannot enter a backward pass afterwards.
    last = stages[-1]
    module.apply_stage(last)
    module.train()
    flops, weights = [], []
    for key in [k for k, e in zip(module.tasks, cfg.tasks) if stage_runs(last.tasks, k, e["name"])]:
        task = module.tasks[key]
        batch = first_batch(task, "train", int(cfg.trainer.batch_size), device)
        if batch is None:
            continue
        n = len(batch.get("samples") or batch.get("ids") or [0])

        def step(t: Any = task, b: dict = batch) -> None:
            t.training_step(module.model, b)["loss"].backward()

        flops.append(count_flops(step) / max(1, n))
        weights.append(module.task_weights[key])
        module.zero_grad(set_to_none=True)
    module.zero_grad(set_to_none=True)

    start = time.perf_counter()
    metrics, _ = evaluate_module(cfg, module, split="test")
    eval_seconds = time.perf_counter() - start

    module.eval()
    latency: dict[str, float] = {}
    for key, task in module.tasks.items():
        times: list[float] = []
        for case in range(int(budget["latency_cases"])):
            batch = first_batch(task, "test", 1, device, start=case)
            if batch is None:
                break
            with torch.no_grad():
                times += timed(lambda t=task, b=batch: t.predict_step(module.model, b), int(budget["latency_repeats"]), device)
        if times:
            latency[key] = statistics.median(times) * 1000

    flops_per_sample = sum(f * w for f, w in zip(flops, weights)) / sum(weights) if weights else None
    samples_per_s = throughput(meter.steps.get(last.name, []))
    mfu = flops_per_sample * samples_per_s / peak if flops_per_sample and samples_per_s else None
    return {
        "metrics": metrics,
        "main": main_metrics(metrics, dict(module.tasks)),
        "main_metric_names": {k: getattr(type(t), "main_metric", "") for k, t in module.tasks.items()},
        "params_total": total_params,
        "params_trainable": trainable_params,
        "components": {k: list(v) for k, v in module.trainable_summary().items()},
        "train_steps": {s: len(v) for s, v in meter.steps.items()},
        "train_samples_per_s": samples_per_s,
        "train_samples_per_s_by_stage": {s: throughput(v) for s, v in meter.steps.items()},
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "latency_ms": latency,
        "flops_per_sample": flops_per_sample,
        "matmul_peak_flops": peak,
        "mfu": mfu,
        **peak_memory_mb(device),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec_path = Path(argv[0])
    spec = json.loads(spec_path.read_text())
    folder = spec_path.parent
    torch.manual_seed(int(spec.get("seed", 0)))
    start = time.perf_counter()
    if spec["kind"] == "cell":
        result = run_cell(spec, folder)
    elif spec["kind"] == "peer":
        from medvlsam2.core.benchmark_peers import run_peer

        result = run_peer(spec, folder)
    else:
        from medvlsam2.core.benchmark_scaling import run_scaling

        result = run_scaling(spec, folder)
    result.update({"key": spec["key"], "kind": spec["kind"], "machine": machine(), "wall_s": time.perf_counter() - start,
                   "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
    for name in ("cell", "peer", "seed", "trained_from", "target", "series"):
        if name in spec:
            result[name] = spec[name]
    atomic_write_text(folder / "result.json", json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
