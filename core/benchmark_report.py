"""The benchmark report, rebuilt from the jobs' result JSON: CSV, Markdown, ratios, PNG plots."""

from __future__ import annotations

import csv
import json
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from medvlsam2.core.checkpoint import atomic_write_text


def machine_text(info: dict[str, Any]) -> str:
    """One line for a report from ``benchmark_worker.machine()``: the CPU and the kernels torch
    runs on it, the GPU, and the versions of the stack (older results lack the last ones)."""
    kernels = list(info.get("cpu_features") or [])
    if info.get("cpu_kernels"):
        kernels.insert(0, f"torch CPU kernels {info['cpu_kernels']}")
    threads = f"{info.get('torch_threads', '?')} torch threads"
    if kernels:
        threads += "; " + ", ".join(kernels)
    libraries = info.get("libraries") or {"torch": info.get("torch", "?")}
    text = (f"{info.get('cpu', '?')}, {info.get('cores', '?')} cores ({threads}), GPU: {info.get('gpu') or 'none'}; "
            + ", ".join(f"{name} {version}" for name, version in libraries.items()))
    return text + (f"; medvlsam2 {info['medvlsam2']}" if info.get("medvlsam2") else "")


COLUMNS = [
    "kind", "name", "seed", "task", "metric", "score", "latency_ms", "params_total", "params_trainable",
    "train_samples_per_s", "gflops_per_sample", "mfu", "peak_rss_mb", "gpu_peak_mb", "train_steps", "status",
]
RATIO_COLUMNS = [
    "cell", "seed", "task", "peer", "metric", "our_score", "peer_score", "score_ratio",
    "our_latency_ms", "peer_latency_ms", "latency_ratio",
]
SCALING_COLUMNS = ["target", "series", "D", "H", "W", "voxels", "x", "pool_grid", "time_s", "cpu_s", "mem_mb", "skipped"]


def _load(job: Any) -> dict[str, Any] | None:
    for path in (job.result_path, job.folder / "failed.json"):
        if path.is_file():
            data = json.loads(path.read_text())
            if data.get("key") == job.key:
                return data
    return None


def _click_keys(metrics: dict[str, float], task: str) -> list[str]:
    keys = [k.split("/")[-1] for k in metrics if k.startswith(f"test/{task}/dice_")]
    return sorted(keys, key=lambda k: (k != "dice_box", int(k[len("dice_click"):]) if k.startswith("dice_click") else 0))


def result_rows(jobs: Sequence[Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per (cell or peer job, task): long format, plus the click columns found."""
    rows: list[dict[str, Any]] = []
    clicks: list[str] = []
    for job in jobs:
        if job.kind == "scaling":
            continue
        res = _load(job)
        # a label reads "<kind> <name> seed <n>"; a peer's name may hold spaces ("sam2_video[init 25fc49]")
        name = job.spec.get("cell") or job.label.split(" ", 1)[1].rsplit(" seed ", 1)[0]
        base = {"kind": "ours" if job.kind == "cell" else "peer", "name": name, "seed": job.spec["seed"]}
        if res is None or res.get("failed"):
            rows.append({**base, "status": "failed" if res else "not run"})
            continue
        for task, metric in res.get("main_metric_names", {}).items():
            if task not in res.get("main", {}):
                continue
            per_task = job.kind == "peer"
            flops = res["flops_per_sample"].get(task) if per_task else res.get("flops_per_sample")
            row = {
                **base, "task": task, "metric": metric, "score": res["main"][task],
                "latency_ms": res["latency_ms"].get(task),
                "params_total": res["params"][task] if per_task else res["params_total"],
                "params_trainable": res["params"][task] if per_task else res["params_trainable"],
                "train_samples_per_s": res["train_samples_per_s"].get(task) if per_task else res["train_samples_per_s"],
                "gflops_per_sample": flops / 1e9 if flops else None,
                "mfu": res["mfu"].get(task) if per_task else res.get("mfu"),
                "peak_rss_mb": res.get("peak_rss_mb"), "gpu_peak_mb": res.get("gpu_peak_mb"),
                "train_steps": res["train_steps"].get(task) if per_task else sum(res["train_steps"].values()),
                "status": "ok",
            }
            for key in _click_keys(res["metrics"], task):
                row[key] = res["metrics"][f"test/{task}/{key}"]
                if key not in clicks:
                    clicks.append(key)
            rows.append(row)
    return rows, clicks


def ratio_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per cell, seed and task: our score and latency over each peer's (>1: we score higher / are slower)."""
    ours = [r for r in rows if r["kind"] == "ours" and r.get("status") == "ok"]
    peers = [r for r in rows if r["kind"] == "peer" and r.get("status") == "ok"]
    out = []
    for o in ours:
        for p in peers:
            if p["seed"] != o["seed"] or p["task"] != o["task"]:
                continue
            if p["name"].startswith("sam2_video[") and not p["name"].startswith("sam2_video[init") \
                    and p["name"] != f"sam2_video[{o['name']}]":
                continue  # the trained-weights predictor pairs with its own cell only
            out.append({
                "cell": o["name"], "seed": o["seed"], "task": o["task"], "peer": p["name"], "metric": o["metric"],
                "our_score": o["score"], "peer_score": p["score"], "score_ratio": _ratio(o["score"], p["score"]),
                "our_latency_ms": o["latency_ms"], "peer_latency_ms": p["latency_ms"],
                "latency_ratio": _ratio(o["latency_ms"], p["latency_ms"]),
            })
    return out


def _ratio(a: Any, b: Any) -> float | None:
    if a is None or b is None or not math.isfinite(float(a)) or not math.isfinite(float(b)) or float(b) == 0:
        return None
    return float(a) / float(b)


def scaling_rows(jobs: Sequence[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every measured (or skipped) point, and one fit per series."""
    points, fits = [], []
    for job in jobs:
        if job.kind != "scaling":
            continue
        res = _load(job)
        target, series = job.spec["target"], job.spec["series"]
        if res is None or res.get("failed"):
            fits.append({"target": target, "series": series, "status": "failed" if res else "not run"})
            continue
        for r in res["rows"]:
            points.append({"target": target, "series": series, **r})
        fits.append({"target": target, "series": series, "x_name": res["x_name"], "status": "ok",
                     "exponent_time": res["exponent_time"], "exponent_cpu": res.get("exponent_cpu"),
                     "exponent_mem": res["exponent_mem"],
                     "points": sum(1 for r in res["rows"] if "time_s" in r),
                     "skipped": sum(1 for r in res["rows"] if "skipped" in r)})
    return points, fits


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    atomic_write_text(path, buffer.getvalue())


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return "x".join(str(v) for v in value)
    return "" if value is None else value


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return format(value, spec)


def _mean_sd(values: list[float], spec: str) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.mean(values), spec)} ± {format(statistics.stdev(values), spec)}"


# -- plots -----------------------------------------------------------------------------------
def _plots(out: Path, rows: list[dict[str, Any]], clicks: list[str], points: list[dict], fits: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: list[str] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        files.append(name)

    ok = [r for r in rows if r.get("status") == "ok"]
    for task in sorted({r["task"] for r in ok}):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for r in [r for r in ok if r["task"] == task and r.get("latency_ms")]:
            ax.scatter(r["latency_ms"], r["score"], marker="o" if r["kind"] == "ours" else "s",
                       color="tab:blue" if r["kind"] == "ours" else "tab:orange")
            ax.annotate(r["name"], (r["latency_ms"], r["score"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("inference latency per volume (ms, log)")
        ax.set_ylabel(next(r["metric"] for r in ok if r["task"] == task))
        ax.set_title(f"{task}: quality vs cost (circles: ours, squares: peers)", fontsize=9)
        save(fig, f"quality_vs_cost_{task}.png")
    click_rows = [r for r in ok if any(k in r for k in clicks)]
    if click_rows:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        steps = [k for k in clicks if k.startswith("dice_click")]
        xs = [int(k[len("dice_click"):]) for k in steps]
        for r in click_rows:
            ax.plot(xs, [r.get(k, math.nan) for k in steps], marker="o", linestyle="-" if r["kind"] == "ours" else "--",
                    label=f"{r['name']} (seed {r['seed']})")
        ax.set_xlabel("clicks")
        ax.set_ylabel("Dice")
        ax.set_xticks(xs)
        ax.legend(fontsize=7)
        ax.set_title("interactive segmentation: Dice vs clicks (solid: ours, dashed: peers)", fontsize=9)
        save(fig, "dice_vs_clicks.png")
    for series in sorted({p["series"] for p in points}):
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        for kind, ax in zip(("time_s", "cpu_s", "mem_mb"), axes):
            for fit in [f for f in fits if f["series"] == series and f.get("status") == "ok"]:
                pts = [p for p in points if p["series"] == series and p["target"] == fit["target"] and "time_s" in p]
                xs = [p["x"] for p in pts]
                ys = [max(p.get(kind, math.nan), 1e-3) for p in pts]
                exp = fit[{"time_s": "exponent_time", "cpu_s": "exponent_cpu", "mem_mb": "exponent_mem"}[kind]]
                ax.loglog(xs, ys, marker="o", label=f"{fit['target']} (exponent {_fmt(exp, '.2f')})")
            ax.set_xlabel(next((f["x_name"] for f in fits if f["series"] == series and "x_name" in f), series))
            ax.set_ylabel({"time_s": "inference wall time (s)", "cpu_s": "inference CPU time (s, all threads)",
                           "mem_mb": "peak memory above baseline (MB)"}[kind])
            ax.legend(fontsize=7)
        fig.suptitle(f"scaling with {series} (log-log; exponent = fitted slope)", fontsize=10)
        save(fig, f"scaling_{series}.png")
    return files


# -- the report ------------------------------------------------------------------------------
def write_report(out: Path, cfg: Any, jobs: Sequence[Any], *, command: str, echo: Callable[[str], Any] = print) -> None:
    """``benchmark.csv``, ``ratios.csv``, ``scaling.csv``, ``benchmark.md`` and the plots under ``out``."""
    rows, clicks = result_rows(jobs)
    ratios = ratio_rows(rows)
    points, fits = scaling_rows(jobs)
    _write_csv(out / "benchmark.csv", rows, COLUMNS + clicks)
    _write_csv(out / "ratios.csv", ratios, RATIO_COLUMNS)
    if points or fits:
        _write_csv(out / "scaling.csv", points, SCALING_COLUMNS)
    images = _plots(out, rows, clicks, points, fits)
    machines = [r for j in jobs if (r := _load(j)) and not r.get("failed")]
    info = machines[0]["machine"] if machines else {}
    date = max((m.get("date", "") for m in machines), default=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    lines = [f"# Benchmark `{cfg.name}`", "", f"* command: `{command}`",
             f"* machine: {machine_text(info)}",
             f"* date of the latest job: {date}"]
    if rows:
        lines += [f"* budget: {_budget_text(cfg)}; seeds: {list(cfg.seeds)}", ""] + _main_table(rows, clicks)
    if ratios:
        lines += ["", "## Ours vs peers (ratios: ours / peer)", "",
                  "| cell | task | peer | metric | ours | peer | score ratio | latency ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in ratios:
            lines.append(f"| {r['cell']} | {r['task']} | {r['peer']} | {r['metric']} | {_fmt(r['our_score'])} | "
                         f"{_fmt(r['peer_score'])} | {_fmt(r['score_ratio'], '.2f')} | {_fmt(r['latency_ratio'], '.2f')} |")
    if fits:
        lines += ["", "## Scaling (fitted log-log exponents)", "", "| target | series | x | points | skipped | wall-time exponent | CPU-time exponent | memory exponent |",
                  "|---|---|---|---|---|---|---|---|"]
        for f in fits:
            lines.append(f"| {f['target']} | {f['series']} | {f.get('x_name', '–')} | {f.get('points', 0)} | {f.get('skipped', 0)} | "
                         f"{_fmt(f.get('exponent_time'), '.2f')} | {_fmt(f.get('exponent_cpu'), '.2f')} | {_fmt(f.get('exponent_mem'), '.2f')} |")
        lines += ["", "| target | series | D | H×W | x | wall time (s) | CPU time (s) | memory (MB) |", "|---|---|---|---|---|---|---|---|"]
        for p in points:
            when = _fmt(p.get("time_s"), ".3f") if "time_s" in p else f"skipped ({p.get('skipped')})"
            lines.append(f"| {p['target']} | {p['series']} | {p['D']} | {p['H']}×{p['W']} | {p['x']} | {when} | "
                         f"{_fmt(p.get('cpu_s'), '.3f')} | {_fmt(p.get('mem_mb'), '.0f')} |")
    if images:
        lines += [""] + [f"![{name}]({name})" for name in images]
    failed = [r for r in rows if r.get("status") != "ok"] + [f for f in fits if f.get("status") != "ok"]
    if failed:
        lines += ["", "Jobs without results: " + ", ".join(f"{r.get('name', r.get('target'))} ({r['status']})" for r in failed)]
    atomic_write_text(out / "benchmark.md", "\n".join(lines) + "\n")
    for r in ratios:
        echo(f"{r['task']}: {r['cell']} vs {r['peer']}: score {_fmt(r['our_score'])} / {_fmt(r['peer_score'])} = "
             f"{_fmt(r['score_ratio'], '.2f')}x, latency {_fmt(r['our_latency_ms'], '.0f')} / {_fmt(r['peer_latency_ms'], '.0f')} ms = "
             f"{_fmt(r['latency_ratio'], '.2f')}x")
    for f in fits:
        if f.get("status") == "ok":
            echo(f"scaling {f['target']} with {f['series']}: time exponent {_fmt(f['exponent_time'], '.2f')} "
                 f"(CPU time {_fmt(f.get('exponent_cpu'), '.2f')}), "
                 f"memory exponent {_fmt(f['exponent_mem'], '.2f')}")
    echo(f"report: {out / 'benchmark.md'}")


def _budget_text(cfg: Any) -> str:
    b = cfg.budget
    parts = []
    if b.steps is not None:
        parts.append(f"{b.steps} steps per stage")
    if b.minutes is not None:
        parts.append(f"{b.minutes} min per cell")
    parts.append(f"latency = median of {b.latency_repeats} runs after a warm-up on {b.latency_cases} test volume(s)")
    return ", ".join(parts)


def _main_table(rows: list[dict[str, Any]], clicks: list[str]) -> list[str]:
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return ["No finished cells yet."]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in ok:
        groups[(r["kind"], r["name"], r["task"])].append(r)
    head = ["model", "task", "metric", "score", *clicks, "latency (ms)", "params (M) total / trained",
            "train samples/s", "GFLOPs/sample", "MFU", "peak RSS (MB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (kind, name, task), group in sorted(groups.items()):
        first = group[0]
        cells = [
            f"{name}{' (peer)' if kind == 'peer' else ''}", task, first["metric"],
            _mean_sd([g["score"] for g in group], ".3f"),
            *[_mean_sd([g.get(k) for g in group], ".3f") for k in clicks],
            _mean_sd([g["latency_ms"] for g in group], ".0f"),
            f"{first['params_total'] / 1e6:.2f} / {first['params_trainable'] / 1e6:.2f}",
            _mean_sd([g["train_samples_per_s"] for g in group], ".2f"),
            _mean_sd([g["gflops_per_sample"] for g in group], ".2f"),
            _mean_sd([100 * g["mfu"] if g.get("mfu") else None for g in group], ".1f") + ("%" if first.get("mfu") else ""),
            _mean_sd([g["peak_rss_mb"] for g in group], ".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
