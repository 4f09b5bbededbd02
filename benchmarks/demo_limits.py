"""What the demo's data allows at the demo's grid: specialist 3D U-Nets on its training cases.

The demo's quality targets are measured on volumes resampled to ``vars.size`` (12 x 64 x 64).
This script separates what that grid and the demo's few training cases allow from what the
vision-language model learns, by training small MONAI U-Nets directly on the label maps:

* ``structures``: one multi-class U-Net for the large brain structures (the semantic target's
  classes), scored by mean Dice on the validation split;
* ``lesion``: one U-Net for the lesion label, scored by voxel Dice, by volume-level detection
  (AUROC of each volume's highest voxel probability against "the volume holds a lesion") and by
  localisation (the cases with a lesion whose most probable voxel lies in one, on the training and
  the validation split); ``--augment`` trains it on random flips along every axis and random
  intensity scaling, the usual remedy for a U-Net that memorises a few training cases;
* ``visibility``: how the lesions look on the model grid (voxels per case, contrast against the
  surrounding tissue in standard deviations, cases whose lesion vanishes from the resampled
  label).

Only the train and validation splits are read. Data is the demo dataset
(``medvlsam2 data build-demo --out DIR``; more cases with ``--cases``)::

    python benchmarks/demo_limits.py --data DIR [--out limits.json]

Results of runs on the project's 2-core CPU machine are in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def load_split(task, split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Model-grid volumes ``(N, 1, D, H, W)`` and label maps ``(N, D, H, W)`` of one split."""
    volumes, labels = [], []
    for sample in list(task.samples(split))[:limit]:
        volume, record = task.load_image(sample)
        volumes.append(volume)
        labels.append(torch.from_numpy(np.asarray(task.model_label(sample, record), dtype=np.int64)))
    if not volumes:
        raise SystemExit(f"demo_limits: the {split} split of {task.cfg.data.root} is empty")
    return torch.stack(volumes), torch.stack(labels)


def unet(out_channels: int) -> torch.nn.Module:
    from monai.networks.nets import UNet

    # Strides keep the 12-slice axis divisible: 12 -> 12 -> 6 -> 6.
    return UNet(spatial_dims=3, in_channels=1, out_channels=out_channels, channels=(16, 32, 64, 64),
                strides=((1, 2, 2), (2, 2, 2), (1, 2, 2)), num_res_units=1)


def dice(pred: torch.Tensor, truth: torch.Tensor) -> float:
    total = float(pred.sum() + truth.sum())
    return 2.0 * float((pred & truth).sum()) / total if total else float("nan")


def augment(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips along each spatial axis and a random intensity scale and shift, per batch."""
    for axis in (2, 3, 4):
        if float(torch.rand(1, generator=generator)) < 0.5:
            x, y = x.flip(axis), y.flip(axis)
    shape = (len(x), 1, 1, 1, 1)
    scale = torch.empty(shape).uniform_(0.85, 1.15, generator=generator)
    shift = torch.empty(shape).uniform_(-0.1, 0.1, generator=generator)
    return x * scale + shift, y


def train(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, loss_fn, lr: float, seed: int,
          name: str, augmented: bool = False) -> float:
    """``steps`` AdamW steps on random batches of 4 (``augmented``: through ``augment``); seconds taken."""
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    start = time.perf_counter()
    net.train()
    for step in range(1, steps + 1):
        if step % 250 == 0:
            print(f"  {name}: step {step}/{steps}, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        idx = torch.randint(len(x), (4,), generator=generator)
        xb, yb = augment(x[idx], y[idx], generator) if augmented else (x[idx], y[idx])
        loss = loss_fn(net(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    return time.perf_counter() - start


def structures(xtr, ytr, xva, yva, classes: dict[str, int], steps: int, seed: int) -> dict:
    from monai.losses import DiceCELoss

    values = list(classes.values())
    remap = torch.zeros(int(max(ytr.max(), yva.max())) + 1, dtype=torch.long)
    remap[torch.tensor(values)] = torch.arange(1, len(values) + 1)
    torch.manual_seed(seed)
    net = unet(len(values) + 1)
    loss = DiceCELoss(softmax=True, to_onehot_y=True)
    seconds = train(net, xtr, remap[ytr][:, None], steps, loss, 2e-3, seed, "structures")
    with torch.no_grad():
        pred = net(xva).argmax(1)
    truth = remap[yva]
    per_class = {name: dice(pred == k, truth == k) for k, name in enumerate(classes, start=1)}
    return {"steps": steps, "train_seconds": round(seconds, 1), "mean_dice": float(np.nanmean(list(per_class.values()))),
            "dice": per_class}


def localised(prob: torch.Tensor, truth: torch.Tensor) -> list[int]:
    """Of the cases with a lesion: how many have their most probable voxel in one, and how many there are."""
    has = truth.flatten(1).any(1)
    top = prob.flatten(1).argmax(1)
    hit = truth.flatten(1)[torch.arange(len(top)), top]
    return [int((hit & has).sum()), int(has.sum())]


def lesion(xtr, ytr, xva, yva, label: int, steps: int, seed: int, augmented: bool = False) -> dict:
    from monai.losses import DiceCELoss
    from torchmetrics.functional.classification import binary_auroc

    dice_ce = DiceCELoss(sigmoid=True, batch=True)

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Lesions cover about 1 voxel in 5000: weighted BCE keeps the positives from vanishing.
        bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(50.0))
        return bce + dice_ce(logits, target)

    torch.manual_seed(seed)
    net = unet(1)
    target = (ytr == label).float()[:, None]
    seconds = train(net, xtr, target, steps, loss, 2e-3, seed, "lesion", augmented)
    with torch.no_grad():
        prob = torch.sigmoid(net(xva))[:, 0]
        train_prob = torch.sigmoid(net(xtr))[:, 0]
    truth = yva == label
    has = truth.flatten(1).any(1)
    detection = (float(binary_auroc(prob.flatten(1).max(1).values, has.long()))
                 if 0 < int(has.sum()) < len(has) else float("nan"))
    return {"steps": steps, "augmented": augmented, "train_seconds": round(seconds, 1),
            "voxel_dice": dice(prob > 0.5, truth), "train_voxel_dice": dice(train_prob > 0.5, ytr == label),
            "presence_auroc": detection, "localised": localised(prob, truth),
            "train_localised": localised(train_prob, ytr == label),
            "validation_cases_with_lesion": int(has.sum()), "validation_cases": len(has)}


def visibility(root: Path, task, xva, yva, label: int) -> dict:
    """Lesion voxels and contrast on the model grid; lesions lost by resampling the label."""
    from scipy import ndimage

    cases = {c["image"]: c for c in json.loads((root / "cases.json").read_text())["cases"]}
    voxels, contrast, lost = [], [], 0
    for sample, volume, lab in zip(task.samples("validation"), xva, yva):
        case = cases.get(str(Path(sample["image"]).relative_to(root)))
        mask = (lab == label).numpy()
        if case and case["lesions"] and not mask.any():
            lost += 1
        if not mask.any():
            continue
        image = volume[0].numpy()
        ring = ndimage.binary_dilation(mask, iterations=2) & ~mask & (lab.numpy() > 0)
        voxels.append(int(mask.sum()))
        contrast.append(abs(float(image[mask].mean() - image[ring].mean())) / float(image[ring].std()))
    return {"lesion_voxels_per_case": float(np.mean(voxels)) if voxels else 0.0,
            "voxels_in_volume": int(np.prod(yva.shape[1:])),
            "contrast_sd": [round(c, 2) for c in contrast],
            "median_contrast_sd": float(np.median(contrast)) if contrast else float("nan"),
            "cases_whose_lesion_vanishes": lost}


def main(argv: list[str] | None = None) -> dict:
    from medvlsam2.core.registry import build

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a demo dataset folder (medvlsam2 data build-demo --out DIR)")
    parser.add_argument("--size", type=int, nargs=3, default=[12, 64, 64], help="model grid D H W (the demo's vars.size)")
    parser.add_argument("--train-cases", type=int, default=None, help="use only the first N training cases")
    parser.add_argument("--structure-steps", type=int, default=500)
    parser.add_argument("--lesion-steps", type=int, default=1500)
    parser.add_argument("--augment", action="store_true", help="train the lesion U-Net on random flips and intensities")
    parser.add_argument("--anti-aliasing", action="store_true",
                        help="resize the volumes with preprocess.anti_aliasing (a Gaussian along each downsampled axis)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    data = Path(args.data)
    info_path = data / "demo.json"
    if not info_path.is_file():
        raise SystemExit(f"demo_limits: {info_path} not found; build one with `medvlsam2 data build-demo --out {data}`")
    info = json.loads(info_path.read_text())["datasets"]["brain"]
    root = data / info["root"]
    task = build("tasks", "semantic_seg", {
        "data": {"format": "nifti_json", "root": str(root),
                 "preprocess": {"preset": info["preprocess_preset"], "spatial_size": args.size,
                                "anti_aliasing": args.anti_aliasing}},
        "metrics_grid": "model"})
    xtr, ytr = load_split(task, "train", args.train_cases)
    xva, yva = load_split(task, "validation", None)
    by_name = {name: int(value) for value, name in info["labels"].items()}
    large = {name: by_name[name] for name in info["large_labels"]}
    result = {
        "data": str(data), "grid": args.size, "anti_aliasing": args.anti_aliasing, "train_cases": len(xtr), "validation_cases": len(xva),
        "visibility": visibility(root, task, xva, yva, int(info["lesion_label"])),
        "structures": structures(xtr, ytr, xva, yva, large, args.structure_steps, args.seed),
        "lesion": lesion(xtr, ytr, xva, yva, int(info["lesion_label"]), args.lesion_steps, args.seed, args.augment),
    }
    s, les, vis = result["structures"], result["lesion"], result["visibility"]
    print(f"grid {args.size}{' (anti-aliased)' if args.anti_aliasing else ''}, {len(xtr)} training / {len(xva)} validation cases")
    print(f"large structures: validation mean Dice {s['mean_dice']:.3f} after {s['steps']} steps ({s['train_seconds']} s)")
    print(f"lesion: validation voxel Dice {les['voxel_dice']:.3f}, presence AUROC {les['presence_auroc']:.3f} "
          f"after {les['steps']} steps ({les['train_seconds']} s{', augmented' if les['augmented'] else ''}); "
          f"most probable voxel in a lesion in {les['localised'][0]} of {les['localised'][1]} validation cases "
          f"({les['train_localised'][0]} of {les['train_localised'][1]} training cases), "
          f"training voxel Dice {les['train_voxel_dice']:.3f}")
    print(f"lesions on the grid: {vis['lesion_voxels_per_case']:.1f} voxels per case of {vis['voxels_in_volume']}, "
          f"median contrast {vis['median_contrast_sd']:.2f} SD, {vis['cases_whose_lesion_vanishes']} validation "
          "case(s) whose lesion vanishes from the resampled label")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
