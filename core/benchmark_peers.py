"""Peers scored on the same data, splits, metrics and budget as the benchmark's cells.

* ``segresnet``: a MONAI SegResNet specialist per segmentation task: multi-label over the
  dataset's classes (semantic), the referred mask from the image alone (referring, text-blind),
  and the image plus point/box channels (interactive, the same click protocol as ours).
* ``vista3d``: MONAI VISTA3D (random init, a small SegResNetDS2 backbone) with class prompts
  (semantic) and point prompts (interactive; it takes no boxes, so its box score is empty).
* ``sam2_video``: SAM2's own ``SAM2VideoPredictor`` from the ``sam2`` package, built from the
  decoder's SAM2 config with its initial (seeded) weights, or with a trained cell's decoder
  weights; slices are written as JPEG frames, prompts are added on their slices and masks are
  propagated forward and backward. It runs under ``inference_mode`` and cannot be trained.

Each peer task reuses the task plugin's own data (model grid), click simulation and scoring,
so a peer's ``test/<task>/<metric>`` means exactly what ours does.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medvlsam2.core.benchmark_worker import (
    count_flops,
    device_of,
    load_run_config,
    matmul_peak,
    peak_memory_mb,
    sync,
    throughput,
)
from medvlsam2.core.decoder import NO_OBJECT_LOGIT
from medvlsam2.core.errors import ConfigError

SUPPORTED = {
    "segresnet": ("semantic_seg", "referring_seg", "interactive_seg"),
    "vista3d": ("semantic_seg", "interactive_seg"),
    "sam2_video": ("interactive_seg",),
}
#: One object's prompt: points (N, 3) with labels (N,), and/or a box (6,), on the model grid.
Prompt = dict[str, Any]


# -- helpers ---------------------------------------------------------------------------------
def normalise(volume: torch.Tensor) -> torch.Tensor:
    """Per-volume robust scaling to [0, 1] (as both of our decoders do)."""
    flat = volume.flatten(1).float()
    lo, hi = torch.quantile(flat, torch.tensor([0.005, 0.995], device=flat.device), dim=1)
    shape = (-1,) + (1,) * (volume.ndim - 1)
    return ((volume.float() - lo.view(shape)) / (hi - lo).clamp_min(1e-6).view(shape)).clamp(0, 1)


def prompt_channels(prompt: Prompt, shape: tuple[int, int, int], device: torch.device, sigma: float = 2.0) -> torch.Tensor:
    """``(3, D, H, W)``: Gaussian positive points, negative points, the filled box."""
    maps = torch.zeros(3, *shape, device=device)
    if prompt.get("points") is not None:
        axes = [torch.arange(n, device=device, dtype=torch.float32) for n in shape]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
        for p, lab in zip(np.asarray(prompt["points"]), np.asarray(prompt["labels"])):
            blob = torch.exp(-((grid - torch.as_tensor(p, device=device).float()) ** 2).sum(-1) / (2 * sigma**2))
            c = 0 if lab > 0 else 1
            maps[c] = torch.maximum(maps[c], blob)
    if prompt.get("box") is not None:
        b = [int(v) for v in prompt["box"]]
        maps[2, b[0] : b[3] + 1, b[1] : b[4] + 1, b[2] : b[5] + 1] = 1.0
    return maps


def pad_to(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    shape = tuple(x.shape[-3:])
    pad = [(-n) % multiple for n in shape]
    return F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0])), shape


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice + BCE on logits, the usual specialist loss."""
    probs = logits.sigmoid()
    dims = tuple(range(1, logits.ndim))
    dice = 1 - (2 * (probs * target).sum(dims) + 1) / (probs.sum(dims) + target.sum(dims) + 1)
    return dice.mean() + F.binary_cross_entropy_with_logits(logits, target)


def train_prompt(task: Any, rng: np.random.Generator, mask: np.ndarray) -> Prompt:
    """A training prompt drawn as the interactive task draws its own."""
    return task._train_object(rng, mask)


def click_protocol(task: Any, predict: Callable[[Prompt], torch.Tensor], sample: dict, record: Any,
                   label: np.ndarray, values: list[int], names: list[str], with_box: bool = True) -> dict[str, Any]:
    """Our interactive protocol for a peer: Dice with the tight box, then after each click."""
    from medvlsam2.plugins.tasks.segmentation import mask_box, next_click

    rounds = sorted(set(int(c) for c in task.cfg.eval_clicks))
    result: dict[str, Any] = {"id": sample["id"], "dice_box": {}, **{f"dice_click{r}": {} for r in rounds}}
    for value, name in zip(values, names):
        mask = label == value
        targets, spacing = task.metric_targets(sample, record, [value])

        def dice(probs: torch.Tensor, nm: str = name, tg: np.ndarray = targets, sp: list = spacing) -> float:
            pred = (probs[None] > task.cfg.threshold).cpu().numpy()
            return task.score(pred, record, tg, sp, [nm])["dice"][nm]

        if with_box:
            result["dice_box"][name] = dice(predict({"box": mask_box(mask)}))
        clicks: list[tuple[np.ndarray, int]] = []
        pred = np.zeros_like(mask)
        for r in range(1, rounds[-1] + 1):
            click = next_click(pred, mask)
            if click is not None:
                clicks.append(click)
            probs = predict({"points": np.stack([c for c, _ in clicks]), "labels": np.asarray([lab for _, lab in clicks])})
            pred = (probs > task.cfg.threshold).cpu().numpy()
            if r in rounds:
                result[f"dice_click{r}"][name] = dice(probs)
    return result


# -- peers -----------------------------------------------------------------------------------
class Peer:
    """A peer model for one task: ``train_step`` on a batch, ``predict`` per test sample."""

    trainable = True

    def __init__(self, task_name: str, task: Any, num_classes: int, opts: dict[str, Any], device: torch.device) -> None:
        self.task_name, self.task, self.num_classes, self.opts, self.device = task_name, task, num_classes, opts, device

    def parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def train_step(self, batch: dict[str, Any], rng: np.random.Generator) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def predict_sample(self, batch: dict[str, Any], i: int) -> dict[str, Any]:
        """One test sample scored the way the task scores ours (a ``predict_step`` result)."""
        task, sample, record = self.task, batch["samples"][i], batch["records"][i]
        volume, label, present = batch["volume"][i : i + 1], batch["label"][i], batch["present"][i]
        names = [task._name(batch["label_names"][i], v) for v in present]
        if self.task_name == "interactive_seg":
            return click_protocol(task, lambda p: self.prompted(volume, p), sample, record, label, present, names,
                                  with_box=self.takes_boxes)
        if self.task_name == "referring_seg":
            targets, spacing = task.metric_targets(sample, record, [1])
            probs = self.classes(volume, [1])
            scores = task.score((probs > task.cfg.threshold).cpu().numpy(), record, targets, spacing, ["target"])
            return {"id": sample["id"], "forced": False, "question_type": sample.get("question_type"),
                    **{m: scores[m]["target"] for m in task._metric_names()}}
        result: dict[str, Any] = {"id": sample["id"], "names": names}
        if present:
            targets, spacing = task.metric_targets(sample, record, present)
            probs = self.classes(volume, present)
            scores = task.score((probs > task.cfg.threshold).cpu().numpy(), record, targets, spacing, names)
            result.update({m: scores[m] for m in task._metric_names()})
        return result

    takes_boxes = True

    def classes(self, volume: torch.Tensor, values: list[int]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def prompted(self, volume: torch.Tensor, prompt: Prompt) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class SegResNetPeer(Peer):
    """A MONAI SegResNet specialist for one task."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        from monai.networks.nets import SegResNet

        interactive = self.task_name == "interactive_seg"
        out = 1 if self.task_name != "semantic_seg" else self.num_classes
        args = {"spatial_dims": 3, "in_channels": 4 if interactive else 1, "out_channels": out, **self.opts}
        self.net = SegResNet(**args).to(self.device)
        self.multiple = 2 ** (len(args.get("blocks_down", (1, 2, 2, 4))) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, shape = pad_to(x, self.multiple)
        return self.net(x)[..., : shape[0], : shape[1], : shape[2]]

    def train_step(self, batch: dict[str, Any], rng: np.random.Generator) -> torch.Tensor:
        volume = normalise(batch["volume"][:, :1])
        if self.task_name == "interactive_seg":
            xs, ts = [], []
            for i, present in enumerate(batch["present"]):
                value = int(rng.choice(present))
                mask = batch["label"][i] == value
                maps = prompt_channels(train_prompt(self.task, rng, mask), mask.shape, self.device)
                xs.append(torch.cat([volume[i], maps]))
                ts.append(torch.from_numpy(mask).float()[None])
            return seg_loss(self.forward(torch.stack(xs)), torch.stack(ts).to(self.device))
        if self.task_name == "referring_seg":
            target = torch.stack([torch.from_numpy(lab > 0).float()[None] for lab in batch["label"]])
        else:
            target = torch.stack([torch.from_numpy(np.stack([lab == c for c in range(1, self.num_classes + 1)])).float()
                                  for lab in batch["label"]])
        return seg_loss(self.forward(volume), target.to(self.device))

    def classes(self, volume: torch.Tensor, values: list[int]) -> torch.Tensor:
        probs = self.forward(normalise(volume[:, :1])).sigmoid()[0]
        return probs[[0]] if self.task_name == "referring_seg" else probs[[v - 1 for v in values]]

    def prompted(self, volume: torch.Tensor, prompt: Prompt) -> torch.Tensor:
        norm = normalise(volume[:, :1])[0]
        x = torch.cat([norm, prompt_channels(prompt, tuple(norm.shape[-3:]), self.device)])[None]
        return self.forward(x).sigmoid()[0, 0]


class Vista3DPeer(Peer):
    """MONAI VISTA3D, random init, with a small SegResNetDS2 backbone."""

    takes_boxes = False

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        from monai.networks.nets.segresnet_ds import SegResNetDS2
        from monai.networks.nets.vista3d import VISTA3D, ClassMappingClassify, PointMappingSAM

        width = int(self.opts.get("feature_size", 16))
        blocks = tuple(self.opts.get("blocks_down", (1, 2, 2)))
        n_classes = self.num_classes + 1
        encoder = SegResNetDS2(in_channels=1, blocks_down=blocks, norm="instance", out_channels=width,
                               init_filters=width, dsdepth=1)
        self.net = VISTA3D(
            image_encoder=encoder,
            class_head=ClassMappingClassify(n_classes=n_classes, feature_size=width, use_mlp=True),
            point_head=PointMappingSAM(feature_size=width, n_classes=n_classes, last_supported=n_classes),
        ).to(self.device)
        self.multiple = 2 ** len(blocks)

    def forward(self, volume: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        x, shape = pad_to(normalise(volume[:, :1]), self.multiple)
        return self.net(x, **kwargs)[..., : shape[0], : shape[1], : shape[2]]

    def train_step(self, batch: dict[str, Any], rng: np.random.Generator) -> torch.Tensor:
        losses = []
        for i, present in enumerate(batch["present"]):  # VISTA3D takes one volume per call
            volume = batch["volume"][i : i + 1]
            label = batch["label"][i]
            if self.task_name == "semantic_seg":
                values = [int(v) for v in rng.choice(present, size=min(4, len(present)), replace=False)]
                logits = self.forward(volume, class_vector=torch.tensor(values, device=self.device)[:, None])
                target = torch.from_numpy(np.stack([label == v for v in values])).float()[:, None]
            else:
                value = int(rng.choice(present))
                mask = label == value
                points, labels = self._points(train_prompt(self.task, rng, mask), mask)
                logits = self.forward(volume, point_coords=points, point_labels=labels)
                target = torch.from_numpy(mask).float()[None, None]
            losses.append(seg_loss(logits, target.to(self.device)))
        return torch.stack(losses).mean()

    def _points(self, prompt: Prompt, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if prompt.get("points") is None:  # a box-only training draw: its centre as a positive click
            from medvlsam2.plugins.tasks.segmentation import simulate_clicks

            pts, labs = simulate_clicks(mask, np.random.default_rng(0), 1, 0, 3)
        else:
            pts, labs = np.asarray(prompt["points"]), np.asarray(prompt["labels"])
        points = torch.as_tensor(pts, dtype=torch.float32, device=self.device)[None]
        return points, torch.as_tensor(labs, dtype=torch.long, device=self.device)[None]

    def classes(self, volume: torch.Tensor, values: list[int]) -> torch.Tensor:
        return self.forward(volume, class_vector=torch.tensor(values, device=self.device)[:, None]).sigmoid()[:, 0]

    def prompted(self, volume: torch.Tensor, prompt: Prompt) -> torch.Tensor:
        points = torch.as_tensor(np.asarray(prompt["points"]), dtype=torch.float32, device=self.device)[None]
        labels = torch.as_tensor(np.asarray(prompt["labels"]), dtype=torch.long, device=self.device)[None]
        return self.forward(volume, point_coords=points, point_labels=labels).sigmoid()[0, 0]


class SAM2VideoPeer(Peer):
    """SAM2's own video predictor over the slices, with our decoder's SAM2 config and weights."""

    trainable = False

    def __init__(self, *args: Any, decoder_cfg: dict[str, Any], checkpoint: str | None) -> None:
        super().__init__(*args)
        from medvlsam2.core.registry import get_host
        from medvlsam2.plugins.decoders.sam2_build import isolated_sam2_hydra, resolve_sam2_config

        if decoder_cfg.get("image_encoder", "tinyvit") != "hiera":
            raise ConfigError("peer sam2_video: needs a sam2_volume decoder with image_encoder: hiera "
                              "(the video predictor runs SAM2's own Hiera)")
        decoder = get_host().build("decoders", "sam2_volume", dict(decoder_cfg), path="model.decoder")
        if checkpoint:
            from medvlsam2.core.checkpoint import load_checkpoint

            state = load_checkpoint(checkpoint)["state_dict"]
            own = {k[len("model.decoder."):]: v for k, v in state.items() if k.startswith("model.decoder.")}
            decoder.load_state_dict(own, strict=False)
        overrides = [f"++model.image_size={int(decoder_cfg.get('image_size', 256))}",
                     f"++model.num_maskmem={int(decoder_cfg.get('num_maskmem', 7))}",
                     f"++model.max_cond_frames_in_attn={int(decoder_cfg.get('max_cond_frames_in_attn', 4))}"]
        if decoder_cfg.get("memory_attention_layers") is not None:
            overrides.append(f"++model.memory_attention.num_layers={int(decoder_cfg['memory_attention_layers'])}")
        with isolated_sam2_hydra():
            from sam2.build_sam import build_sam2_video_predictor

            self.net = build_sam2_video_predictor(
                resolve_sam2_config(decoder_cfg.get("sam2_config", "sam2.1_hiera_t")), None, device=str(self.device),
                hydra_overrides_extra=overrides, apply_postprocessing=False,
            )
        missing, unexpected = self.net.load_state_dict(decoder.sam.state_dict(), strict=False)
        if missing or unexpected:
            raise ConfigError(f"peer sam2_video: weights do not match the predictor ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected)")
        self.net.eval()
        self.percentiles = decoder.cfg.intensity_percentiles
        self.bounds_depth = bool(decoder_cfg.get("box_bounds_depth", True))
        self._frames: tuple[torch.Tensor, str] | None = None  # the last volume and its JPEG folder
        self._count = 0
        self._tmp = tempfile.TemporaryDirectory()

    def _video(self, volume: torch.Tensor) -> Any:
        """The volume's slices as JPEG frames (written once per volume) and a fresh predictor state."""
        from PIL import Image

        if self._frames is None or self._frames[0] is not volume:
            folder = Path(self._tmp.name) / str(self._count)
            self._count += 1
            folder.mkdir()
            flat = volume.flatten().float()
            lo, hi = (torch.quantile(flat[:: max(1, flat.numel() // 1_000_000)], p / 100) for p in self.percentiles)
            norm = ((volume[0, 0].float() - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
            for d, img in enumerate((norm * 255).round().byte().cpu().numpy()):
                Image.fromarray(img).convert("RGB").save(folder / f"{d:05d}.jpg", quality=95)
            self._frames = (volume, str(folder))
        return self._frames[1]

    def prompted(self, volume: torch.Tensor, prompt: Prompt) -> torch.Tensor:
        import contextlib
        import io

        folder = self._video(volume)
        depth, h, w = volume.shape[-3:]
        with torch.inference_mode(), contextlib.redirect_stderr(io.StringIO()):
            state = self.net.init_state(video_path=folder)
            frames: dict[int, dict[str, Any]] = {}
            lo, hi = 0, depth - 1
            if prompt.get("box") is not None:
                d0, h0, w0, d1, h1, w1 = (int(v) for v in prompt["box"])
                for d in range(d0, d1 + 1):
                    frames[d] = {"box": np.asarray([w0, h0, w1 + 1, h1 + 1], dtype=np.float32)}
                if self.bounds_depth:
                    lo, hi = d0, d1
            if prompt.get("points") is not None:
                for (pd, ph, pw), lab in zip(np.asarray(prompt["points"]), np.asarray(prompt["labels"])):
                    entry = frames.setdefault(int(pd), {"points": [], "labels": []})
                    entry.setdefault("points", []).append([pw + 0.5, ph + 0.5])
                    entry.setdefault("labels", []).append(int(lab))
            for d, entry in frames.items():
                self.net.add_new_points_or_box(
                    state, frame_idx=d, obj_id=1,
                    points=np.asarray(entry["points"], dtype=np.float32) if entry.get("points") else None,
                    labels=np.asarray(entry["labels"], dtype=np.int32) if entry.get("labels") else None,
                    box=entry.get("box"),
                )
            out = torch.full((depth, h, w), NO_OBJECT_LOGIT)
            for reverse in (False, True):
                for d, _, logits in self.net.propagate_in_video(state, reverse=reverse):
                    out[d] = logits[0, 0].float().cpu()
            out[:lo] = NO_OBJECT_LOGIT
            out[hi + 1 :] = NO_OBJECT_LOGIT
            return out.sigmoid().clone()


# -- the peer job ----------------------------------------------------------------------------
def _num_classes(task: Any) -> int:
    names: set[int] = set()
    for split in ("train", "test"):
        for sample in task.samples(split):
            names |= set(task.object_names(sample))
    return max(names) if names else 1


def run_peer(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Train the peer on each supported task with the budget, then score and time it on the test split."""
    import lightning as L

    from medvlsam2.core.engine import build_tasks

    budget, peer_name, opts = spec["budget"], spec["peer"], spec["peers"]
    cfg = load_run_config(spec["run_config"], folder)
    from medvlsam2.core.run import prepare_demo_data

    prepare_demo_data(cfg)
    device = device_of(cfg)
    L.seed_everything(int(spec["seed"]), verbose=False)
    tasks, _ = build_tasks(cfg)
    peak = matmul_peak(int(spec["gemm_size"]), device)
    results: dict[str, Any] = {"metrics": {}, "main": {}, "latency_ms": {}, "params": {}, "train_samples_per_s": {},
                               "flops_per_sample": {}, "mfu": {}, "train_steps": {}, "main_metric_names": {}}
    wanted = [k for k in tasks if _task_name(cfg, k) in opts["tasks"]
              and _task_name(cfg, k) in SUPPORTED[peer_name]]
    if not wanted:
        raise ConfigError(f"peer {peer_name}: none of its tasks ({', '.join(SUPPORTED[peer_name])}) is in the base config")
    for key in wanted:
        task, name = tasks[key], _task_name(cfg, key)
        L.seed_everything(int(spec["seed"]), verbose=False)
        if peer_name == "segresnet":
            peer: Peer = SegResNetPeer(name, task, _num_classes(task), dict(opts["segresnet"]), device)
        elif peer_name == "vista3d":
            peer = Vista3DPeer(name, task, _num_classes(task), dict(opts["vista3d"]), device)
        else:
            peer = SAM2VideoPeer(name, task, 0, {}, device, decoder_cfg=spec["decoder"], checkpoint=spec.get("checkpoint"))
        steps = _train(peer, task, cfg, budget, device, int(spec["seed"]), float(opts["lr"])) if peer.trainable else []
        results["train_steps"][key] = len(steps)
        results["train_samples_per_s"][key] = throughput(steps) if steps else None
        results["params"][key] = sum(p.numel() for p in peer.parameters())
        if peer.trainable:
            batch = _batch(task, "train", int(cfg.trainer.batch_size), device)
            rng = np.random.default_rng(0)
            flops = count_flops(lambda p=peer, b=batch, r=rng: p.train_step(b, r).backward()) / len(batch["samples"])
            results["flops_per_sample"][key] = flops
            sps = results["train_samples_per_s"][key]
            results["mfu"][key] = flops * sps / peak if sps else None
        _eval(peer, task, key, budget, device, results)
    results["matmul_peak_flops"] = peak
    return {**results, **peak_memory_mb(device)}


def _task_name(cfg: Any, key: str) -> str:
    from medvlsam2.core.config import task_keys

    return {k: e["name"] for k, e in zip(task_keys(cfg.tasks), cfg.tasks)}[key]


def _batch(task: Any, split: str, size: int, device: torch.device, start: int = 0) -> dict[str, Any]:
    samples = list(task.samples(split))
    chosen = [samples[(start + i) % len(samples)] for i in range(size)]
    batch = task.collate(chosen)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _train(peer: Peer, task: Any, cfg: Any, budget: dict[str, Any], device: torch.device, seed: int,
           lr: float) -> list[tuple[int, float]]:
    """Adam on the task's training samples for ``budget.steps`` steps (or ``budget.minutes``)."""
    opt = torch.optim.AdamW(peer.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    size = int(cfg.trainer.batch_size)
    count = len(task.samples("train"))
    limit = int(budget["steps"]) if budget.get("steps") is not None else 1_000_000
    seconds = float(budget["minutes"]) * 60 if budget.get("minutes") else None
    steps: list[tuple[int, float]] = []
    begin = time.perf_counter()
    for _ in range(limit):
        batch = _batch(task, "train", size, device, start=int(rng.integers(count)))
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        peer.train_step(batch, rng).backward()
        opt.step()
        sync(device)
        steps.append((size, time.perf_counter() - start))
        if seconds is not None and time.perf_counter() - begin > seconds:
            break
    return steps


def _eval(peer: Peer, task: Any, key: str, budget: dict[str, Any], device: torch.device, results: dict[str, Any]) -> None:
    if hasattr(peer.net, "eval"):
        peer.net.eval()
    predictions, times = [], []
    samples = list(task.samples("test"))
    with torch.no_grad():
        for i, sample in enumerate(samples):
            batch = task.collate([sample])
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            predictions.append(peer.predict_sample(batch, 0))
            if i < int(budget["latency_cases"]):
                for _ in range(int(budget["latency_repeats"])):
                    start = time.perf_counter()
                    peer.predict_sample(batch, 0)
                    sync(device)
                    times.append(time.perf_counter() - start)
    metrics = task.compute_metrics(predictions)
    for name, value in metrics.items():
        results["metrics"][f"test/{key}/{name}"] = float(value)
    main = getattr(type(task), "main_metric", "")
    results["main_metric_names"][key] = main
    if main in metrics:
        results["main"][key] = float(metrics[main])
    if times:
        results["latency_ms"][key] = statistics.median(times) * 1000
