"""Scaling series: inference time and peak memory as the volume (or visual token count) grows.

One job is one series of one target (the whole model, or one decoder) in its own process. Each
point is timed after a warm-up on a small volume; peak memory per point is the largest resident
set seen by a 5 ms sampling thread during the timed calls, minus the resident set before them
(on GPU: ``torch.cuda.max_memory_allocated`` after a reset). The fitted exponent is the slope of
log(time) against log(x) by least squares; x is D, H*W or the number of visual tokens. The
process CPU time is fitted too: on a shared machine wall time also measures the neighbours.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medvlsam2.core.benchmark_worker import device_of, load_run_config, peak_memory_mb, sync


class RSSPeak:
    """Largest resident set size seen while the block runs (sampled every ``interval`` seconds; a
    coarser interval would miss short peaks, a finer one competes for the GIL)."""

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak = 0
        self.before = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> RSSPeak:
        self.before = self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.before) / 1024**2


def fit_exponent(xs: list[float], ys: list[float]) -> float | None:
    """Slope of log(y) on log(x) (the power law's exponent), or None with fewer than two points."""
    pairs = [(x, y) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len(pairs) < 2:
        return None
    lx, ly = np.log([p[0] for p in pairs]), np.log([p[1] for p in pairs])
    return float(np.polyfit(lx, ly, 1)[0])


def _measure(fn: Callable[[], Any], repeats: int, device: torch.device) -> dict[str, float]:
    times, cpu = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with RSSPeak() as rss:
        for _ in range(repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    out = {"time_s": statistics.median(times), "cpu_s": statistics.median(cpu), "mem_mb": rss.delta_mb}
    if device.type == "cuda":
        out["mem_mb"] = (torch.cuda.max_memory_allocated() - base) / 1024**2
    return out


def _decoder(args: dict[str, Any], hw: int) -> Any:
    from medvlsam2.core.registry import get_host

    args = dict(args)
    if args["name"] == "sam2_volume" and args.get("image_encoder") == "hiera":
        args["image_size"] = hw  # SAM2 sees slices at image_size: its cost grows only when that does
    return get_host().build("decoders", args["name"], args, path="scaling.decoder").eval()


def _centre_point(shape: tuple[int, int, int], device: torch.device) -> Any:
    from medvlsam2.core.decoder import Prompts

    centre = torch.tensor([[[[s // 2 for s in shape]]]], dtype=torch.float32, device=device)
    return Prompts(points=centre, point_labels=torch.ones(1, 1, 1, dtype=torch.long, device=device))


def run_scaling(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Time every point of one series; points above ``max_voxels`` are recorded as skipped."""
    import lightning as L

    cfg = load_run_config(spec["run_config"], folder)
    device = device_of(cfg)
    L.seed_everything(int(cfg.seed), verbose=False)
    series, target = spec["series"], spec["target"]
    cap = spec.get("max_voxels")
    rows: list[dict[str, Any]] = []
    built: dict[Any, Any] = {}
    for i, point in enumerate(spec["points"]):
        d, h, w = (int(v) for v in point)
        row: dict[str, Any] = {"D": d, "H": h, "W": w, "voxels": d * h * w}
        if series == "tokens":
            grid = spec["pool_grids"][i]
            row["pool_grid"] = list(grid)
        row["x"] = {"depth": d, "size": h * w}.get(series) or 0
        if cap and d * h * w > int(cap):
            rows.append({**row, "skipped": f"over max_voxels={cap}"})
            continue
        volume = torch.randn(1, 1, d, h, w, device=device)
        small = torch.randn(1, 1, min(4, d), h, w, device=device)
        if target == "model":
            key = tuple(spec["pool_grids"][i]) if series == "tokens" else "model"
            if key not in built:
                built.clear()
                built[key] = _model(cfg, grid if series == "tokens" else None, device)
            module, name = built[key]
            task = module.tasks["semantic_seg"]
            if series == "tokens":
                row["x"] = row["visual_tokens"] = _visual_tokens(module, volume)

            def call(v: torch.Tensor, t: Any = task, m: Any = module, n: str = name) -> Any:
                return t.infer(m.model, v, text=n)
        else:
            key = h if spec["decoder"]["name"] == "sam2_volume" else "decoder"
            if key not in built:
                built.clear()
                built[key] = _decoder(spec["decoder"], h).to(device)
            decoder = built[key]

            def call(v: torch.Tensor, dec: Any = decoder) -> Any:
                with torch.no_grad():
                    return dec(v, _centre_point(tuple(v.shape[-3:]), device))
        call(small)
        row.update(_measure(lambda c=call, v=volume: c(v), int(spec["repeats"]), device))
        rows.append(row)
    measured = [r for r in rows if "time_s" in r]
    xs = [float(r["x"]) for r in measured]
    return {
        "rows": rows,
        "exponent_time": fit_exponent(xs, [r["time_s"] for r in measured]),
        "exponent_cpu": fit_exponent(xs, [r["cpu_s"] for r in measured]),
        "exponent_mem": fit_exponent(xs, [r["mem_mb"] for r in measured]),
        "x_name": {"depth": "D (slices)", "size": "H*W (pixels per slice)", "tokens": "visual tokens"}[series],
        **peak_memory_mb(device),
    }


def _model(cfg: Any, pool_grid: list[int] | None, device: torch.device) -> tuple[Any, str]:
    """The whole model of the base config (random init), and a class name to prompt it with."""
    import lightning as L

    from medvlsam2.core.config import StageConfig
    from medvlsam2.core.engine import MedVLModule
    from medvlsam2.core.errors import ConfigError

    if pool_grid is not None:
        cfg.model.projector.pool_grid = list(pool_grid)
    if not any(t["name"] == "semantic_seg" for t in cfg.tasks):
        raise ConfigError("scaling: target 'model' times semantic_seg inference; the base config has no semantic_seg task")
    L.seed_everything(int(cfg.seed), verbose=False)
    module = MedVLModule(cfg, StageConfig(name="test", tasks=[])).to(device).eval()
    return module, module.tasks["semantic_seg"].dataset_names()[0]


def _visual_tokens(module: Any, volume: torch.Tensor) -> int:
    """Visual embeddings the LLM receives for ``volume`` (after the projector)."""
    trunk = module.model.trunk
    with torch.no_grad():
        enc = trunk.encoder(volume)
        return int(trunk.projector(enc.tokens, enc.grid).shape[1])
