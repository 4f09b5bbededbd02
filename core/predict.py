"""``medvlsam2 predict``: one volume (or a folder / datalist of them) through one task.

Masks are written on the input's own grid and affine (the model's resampling and
re-orientation undone) with ``answer.json`` beside them. Over several volumes a failing case
(bad file, out of memory) is reported and the others go on; results already written stay.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medvlsam2.core.checkpoint import atomic_write_text
from medvlsam2.core.errors import InputError, MedVLError, did_you_mean
from medvlsam2.core.prompts import check_inside, check_text, parse_box, parse_points
from medvlsam2.plugins.tasks.data.transforms import VOLUME_SUFFIXES


@dataclass
class Request:
    task: str
    text: str | None = None
    points: str | None = None
    box: str | None = None
    overlay: bool = False
    threshold: float = 0.5


def volumes_of(source: str | Path) -> list[Path]:
    """A volume file, every volume in a folder, or the images of a JSON datalist / text list."""
    path = Path(source)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.name.lower().endswith(VOLUME_SUFFIXES))
        if not found:
            raise InputError(f"--volume: no volume ({', '.join(VOLUME_SUFFIXES)}) in folder {path}")
        return found
    if not path.exists():
        raise InputError(f"--volume: file not found: {path}")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"--volume: {path}: not a valid JSON datalist ({err})") from err
        if isinstance(data, dict):  # a datalist dict: its first list (MONAI's "training", "test" ...)
            data = next((v for v in data.values() if isinstance(v, list)), [])
        items = data if isinstance(data, list) else []
        images = []
        for n, item in enumerate(items):
            image = item.get("image") if isinstance(item, dict) else item
            if not isinstance(image, str) or not image:
                raise InputError(f"--volume: {path}: entry {n} has no 'image' path")
            images.append(path.parent / image)
        return _listed(images, path)
    if path.suffix == ".txt":
        return _listed([path.parent / line.strip() for line in path.read_text().splitlines() if line.strip()], path)
    return [path]


def _listed(images: list[Path], datalist: Path) -> list[Path]:
    if not images:
        raise InputError(f"--volume: {datalist} lists no volume")
    return images


def _case_name(path: Path) -> str:
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def case_folders(volumes: list[Path]) -> list[str]:
    """One distinct output folder name per volume: the file name without its suffix, with the
    parent folder's name in front when two volumes share a name (``p1/t1.nii.gz``,
    ``p2/t1.nii.gz`` -> ``p1_t1``, ``p2_t1``), and a number after any name still taken."""
    names = [_case_name(p) for p in volumes]
    shared = {n for n in names if names.count(n) > 1}
    names = [f"{p.parent.name}_{n}" if n in shared and p.parent.name else n for p, n in zip(volumes, names)]
    taken: set[str] = set()
    out = []
    for name in names:
        unique, k = name, 2
        while unique in taken:
            unique, k = f"{name}_{k}", k + 1
        taken.add(unique)
        out.append(unique)
    return out


def prompts_to_model(
    record: Any, points: list[tuple[int, int, int, int]] | None, box: tuple[int, ...] | None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """File-index points ``(i, j, k, label)`` and an inclusive box -> model-grid ``(N, 4)`` and ``(6,)``.

    Shared by ``predict`` and the web app so a click means the same voxel in both.
    """
    from medvlsam2.plugins.tasks.data.transforms import box_to_model, points_to_model

    model_points = model_box = None
    if points:
        check_inside(record.original_shape, points=points)
        grid = points_to_model(np.asarray([p[:3] for p in points]), record)
        model_points = np.concatenate([grid, np.asarray([[p[3]] for p in points])], axis=1)
    if box:
        check_inside(record.original_shape, box=box)
        model_box = box_to_model(np.asarray(box), record)
    return model_points, model_box


def label_map_of(masks: Any, record: Any, threshold: float = 0.5) -> np.ndarray:
    """Model-grid probabilities ``(K, D, H, W)`` -> one uint8 label map on the file's grid.

    Object ``k`` gets label ``k + 1``; later objects win where objects overlap.
    """
    import torch

    from medvlsam2.plugins.tasks.data.transforms import restore

    binary = (torch.as_tensor(masks) >= threshold).to(torch.uint8).cpu().numpy()
    on_file = restore(binary, record)  # (K, X, Y, Z)
    label_map = np.zeros(on_file.shape[1:], dtype=np.uint8)
    for k in range(on_file.shape[0]):
        label_map[on_file[k] > 0] = k + 1
    return label_map


def describe_objects(label_map: np.ndarray, affine: np.ndarray, names: list[str], scores: list[float], count: int) -> list[dict[str, Any]]:
    """Label, name, score, voxel count and volume (ml) of each of ``count`` objects."""
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    objects = []
    for k in range(count):
        voxels = int((label_map == k + 1).sum())
        objects.append({
            "label": k + 1,
            "name": names[k] if k < len(names) else f"object {k + 1}",
            "score": float(scores[k]) if k < len(scores) and scores[k] is not None else None,
            "voxels": voxels,
            "volume_ml": round(voxels * voxel_ml, 3),
        })
    return objects


def mark_empty(objects: list[dict[str, Any]], threshold: float) -> list[str]:
    """Note on every object without a voxel (its score is the decoder's object score, which does
    not look at the mask, so an empty mask can come with a high one); the names of those objects."""
    empty = [obj for obj in objects if not obj["voxels"]]
    for obj in empty:
        obj["note"] = f"empty mask: no voxel reached the threshold {threshold:g}"
    return [obj["name"] for obj in empty]


def predict_one(module: Any, task: Any, preprocess_cfg: Any, volume_path: Path, request: Request, out: Path) -> dict[str, Any]:
    import nibabel as nib
    import torch

    from medvlsam2.plugins.tasks.data.transforms import LARGE_INPUT_FACTOR, preprocess

    volume, record = preprocess(volume_path, preprocess_cfg)
    if math.prod(record.original_shape) > LARGE_INPUT_FACTOR * math.prod(record.model_shape):
        print(
            f"medvlsam2: note: {volume_path}: volume {record.original_shape} resized to the model input "
            f"{record.model_shape}; the mask is written on the original grid",
            file=sys.stderr,
        )
    points, box = prompts_to_model(
        record,
        parse_points(request.points) if request.points else None,
        parse_box(request.box) if request.box else None,
    )
    with torch.no_grad():  # predict() has checked that the task has an infer for these prompts
        result = task.infer(module.model, volume[None], text=request.text, points=points, box=box)
    out.mkdir(parents=True, exist_ok=True)
    answer: dict[str, Any] = {"volume": str(volume_path), "task": request.task, "text": result.get("text")}
    for key in ("choice",):
        if key in result:
            answer[key] = result[key]
    masks = result.get("masks")
    if masks is not None:
        label_map = label_map_of(masks, record, request.threshold)
        mask_path = out / "mask.nii.gz"
        nib.save(nib.Nifti1Image(label_map, record.original_affine), str(mask_path))
        answer["mask"] = str(mask_path)
        answer["objects"] = describe_objects(
            label_map, record.original_affine, list(result.get("names") or []), list(result.get("scores") or []), len(masks)
        )
        for name in mark_empty(answer["objects"], request.threshold):
            print(f"medvlsam2: note: {volume_path}: '{name}' is empty at threshold {request.threshold:g}", file=sys.stderr)
        if request.overlay:
            answer["overlays"] = write_overlays(volume_path, label_map, out)
    atomic_write_text(out / "answer.json", json.dumps(answer, indent=2))
    return answer


def write_overlays(volume_path: Path, label_map: np.ndarray, out: Path) -> list[str]:
    """PNGs of the slice with the most mask along each axis, with the mask outline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medvlsam2.plugins.tasks.data.transforms import read_volume

    volume = read_volume(volume_path)
    image = np.asarray(volume)
    spacing = np.linalg.norm(np.asarray(volume.affine, dtype=np.float64)[:3, :3], axis=0)
    files = []
    for axis, name in enumerate(("i", "j", "k")):
        across, up = (a for a in range(3) if a != axis)
        area = (label_map > 0).sum(axis=tuple(a for a in range(3) if a != axis))
        index = int(area.argmax()) if area.any() else image.shape[axis] // 2
        img = np.take(image, index, axis=axis)
        lab = np.take(label_map, index, axis=axis)
        fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
        # Pixels drawn at the voxel's physical proportions (a 0.7 x 5 mm voxel is 7 times taller).
        ax.imshow(img.T, cmap="gray", origin="lower", aspect=float(spacing[up] / spacing[across]))
        if lab.any():
            ax.contour(lab.T > 0, levels=[0.5], colors="red", linewidths=1.0, origin="lower")
        ax.set_title(f"{name} = {index}")
        ax.axis("off")
        path = out / f"overlay_{name}{index}.png"
        fig.savefig(path, bbox_inches="tight")
        plt.close(fig)
        files.append(str(path))
    return files


def preprocess_config_of(key: str, task: Any, metadata: dict[str, Any]) -> Any:
    """The preprocessing a task was exported with (its data need not be reachable), else its own."""
    from medvlsam2.plugins.tasks.data.transforms import PreprocessConfig, get_preset

    saved = (metadata.get("tasks") or {}).get(key, {}).get("preprocess")
    if saved:
        return get_preset(PreprocessConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}))
    return task.preprocess_config()


def predict(model: str | Path, source: str | Path, request: Request, out: str | Path) -> int:
    """Run every volume of ``source``; returns the number of failed cases."""
    import torch

    from medvlsam2.core.config import task_keys
    from medvlsam2.core.export import load_module, model_config
    from medvlsam2.core.registry import get_host
    from medvlsam2.core.task import check_infer_prompts
    from medvlsam2.plugins.tasks.data.transforms import check_volume

    request.text = check_text(request.text)
    if request.points:
        parse_points(request.points)
    if request.box:
        parse_box(request.box)
    volumes = volumes_of(source)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out: {out} is a file; give a folder for the results")
    if len(volumes) == 1:  # a bad file or prompt fails before the model loads
        shape = check_volume(volumes[0])
        points = parse_points(request.points) if request.points else ()
        check_inside(shape, points=points, box=parse_box(request.box) if request.box else None)
    entries = model_config(model).tasks
    names = task_keys(entries)
    if request.task not in names:
        raise InputError(f"--task: the model has no task '{request.task}'{did_you_mean(request.task, names)}; tasks: {', '.join(names)}")
    # a prompt the task ignores, or one it needs and lacks, is refused before the model loads
    task_class = get_host().get("tasks", entries[names.index(request.task)]["name"]).load()
    given = [prompt for prompt in ("text", "points", "box") if getattr(request, prompt)]
    check_infer_prompts(task_class, request.task, given)
    module, cfg, metadata = load_module(model)
    task = module.tasks[request.task]
    preprocess_cfg = preprocess_config_of(request.task, task, metadata)
    failed = 0
    targets = [out] if len(volumes) == 1 else [out / name for name in case_folders(volumes)]
    for path, target in zip(volumes, targets):
        try:
            answer = predict_one(module, task, preprocess_cfg, path, request, target)
            print(f"{path}: {answer.get('mask') or answer.get('text')}")
        except Exception as err:
            if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
                message = "out of memory (try a smaller preprocess.spatial_size)"
                if len(volumes) == 1:
                    raise InputError(f"{path}: {message}") from err
            elif len(volumes) == 1:
                raise
            else:
                message = str(err) if isinstance(err, MedVLError) else f"internal error: {type(err).__name__}: {err}"
            # Over many volumes one bad case must not cost the others: report it and go on.
            failed += 1
            print(f"medvlsam2: case {path} failed: {message}", file=sys.stderr)
    if len(volumes) > 1:
        print(f"{len(volumes) - failed} of {len(volumes)} volumes done; results in {out}")
    return failed
