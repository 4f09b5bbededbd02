"""``medvlsam2 export`` and loading a model back from an export folder or a ``.ckpt``.

An export folder holds::

    config.yaml                  the run's resolved config
    adapter_model.safetensors    the PEFT adapter (LoRA and the new token rows) + adapter_config.json
    trainables.safetensors       every other parameter any stage trained (projector, [SEG] projector,
                                 decoder, task heads, ...)
    metadata.json                inputs/outputs per task, preprocessing, and checksums of the
                                 frozen weights that are rebuilt from their sources
    README.md                    the model card

Frozen weights are not copied: they are rebuilt from the config (pretrained packages or the
run's seed). Loading checks their checksums, so a mismatch is an error, never a silent change.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from medvlsam2.core.checkpoint import atomic_write_text, parameter_digests
from medvlsam2.core.config import load_config, to_yaml
from medvlsam2.core.errors import InputError

ADAPTER = "adapter_model.safetensors"
TRAINABLES = "trainables.safetensors"


def run_folder_of(ckpt: Path) -> Path:
    """The run folder (the one with config.yaml) above a checkpoint file."""
    for parent in ckpt.resolve().parents:
        if (parent / "config.yaml").is_file():
            return parent
    raise InputError(f"{ckpt}: no config.yaml in any folder above it (not inside a run folder)")


def _build_module(cfg: DictConfig) -> Any:
    import lightning as L

    from medvlsam2.core.engine import MedVLModule

    L.seed_everything(int(cfg.seed), verbose=False)  # random-init parts come out as in training
    return MedVLModule(cfg)


def trained_names(module: Any) -> set[str]:
    """Every parameter that some stage of the module's run config trains."""
    frozen = module.never_trained()
    return {n for n, _ in module.named_parameters() if n not in frozen}


def _peft_model(module: Any) -> Any | None:
    trunk = module.model.trunk
    model = getattr(getattr(trunk, "llm", None), "model", None)
    return model if model is not None and hasattr(model, "peft_config") else None


def export(ckpt: str | Path, out: str | Path) -> Path:
    """Write the export folder for the weights in ``ckpt``."""
    from safetensors.torch import save_file

    from medvlsam2.core.run import load_weights

    ckpt, out = Path(ckpt), Path(out)
    run = run_folder_of(ckpt)
    cfg = load_config([run / "config.yaml"])
    module = _build_module(cfg)
    load_weights(module, ckpt)
    trained = trained_names(module)
    out.mkdir(parents=True, exist_ok=True)
    peft = _peft_model(module)
    in_adapter: set[str] = set()
    if peft is not None:
        # Only what training changed: the LoRA matrices and the trainable rows of the new tokens.
        # The resized embedding and output layers they sit on are rebuilt from the config, like
        # every frozen weight, and checked against frozen_checksums on load (peft would
        # otherwise save both layers whole, 226 MB for SmolLM2-135M).
        peft.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
        in_adapter = {n for n, _ in module.named_parameters() if n.startswith("model.trunk.llm.model.") and ("lora_" in n or "trainable_tokens" in n)}
    state = module.state_dict()
    trainables = {n: state[n].contiguous() for n in sorted(trained - in_adapter) if n in state}
    save_file(trainables, str(out / TRAINABLES))
    frozen = parameter_digests(module, {n for n, _ in module.named_parameters() if n not in trained and n not in in_adapter})
    atomic_write_text(out / "config.yaml", to_yaml(cfg))
    metadata = _metadata(module, cfg, frozen, run)
    atomic_write_text(out / "metadata.json", json.dumps(metadata, indent=2, default=str))
    atomic_write_text(out / "README.md", model_card(cfg, module, metadata, run, len(trainables)))
    return out


def _metadata(module: Any, cfg: DictConfig, frozen: dict[str, str], run: Path) -> dict[str, Any]:
    tasks = {}
    for key, task in module.tasks.items():
        entry: dict[str, Any] = {"name": task.__class__.__name__, "main_metric": task.main_metric}
        try:
            pre = task.preprocess_config()
            entry["preprocess"] = dataclasses.asdict(pre)
        except Exception as err:  # data not reachable here: predict then needs the data options
            entry["preprocess_error"] = str(err)
        tasks[key] = entry
    metrics_file = run / "metrics.json"
    return {
        "format": "medvlsam2-export/1",
        "inputs": {"volume": "(B, 1, D, H, W) float, after the task's preprocessing"},
        "outputs": {"masks": "(K, X, Y, Z) on the input file's grid", "text": "generated answer"},
        "tasks": tasks,
        "metrics": json.loads(metrics_file.read_text()) if metrics_file.is_file() else {},
        "frozen_checksums": frozen,
    }


def model_card(cfg: DictConfig, module: Any, metadata: dict[str, Any], run: Path, n_trainables: int) -> str:
    model = OmegaConf.to_container(cfg.model, resolve=True)
    lines = ["# MedVL-SAM2 model", "", f"Exported from run `{run}`.", "", "## Components", ""]
    lines += ["| part | plugin | options |", "|---|---|---|"]
    for part in ("encoder", "projector", "llm", "decoder"):
        node = model.get(part)
        if node:
            options = ", ".join(f"{k}={v}" for k, v in node.items() if k != "name") or "defaults"
            lines.append(f"| {part} | `{node['name']}` | {options} |")
    lines += ["", "## Tasks and data", ""]
    for entry in OmegaConf.to_container(cfg.tasks, resolve=True):
        data = entry.get("data", {})
        lines.append(f"* `{entry['name']}` (weight {entry.get('weight', 1.0)}): `{data.get('format', '?')}` data at `{data.get('root', '?')}`")
    lines += ["", "## Training", ""]
    for stage in OmegaConf.to_container(cfg.stages, resolve=True) or [{"name": "train", "trainable": "task defaults"}]:
        lines.append(f"* stage `{stage['name']}`: trains {stage.get('trainable') or 'the tasks default components'}")
    summary = module.trainable_summary()
    lines += ["", "| component | trainable | total |", "|---|---|---|"]
    lines += [f"| {name} | {t:,} | {n:,} |" for name, (t, n) in summary.items()]
    lines += ["", f"`trainables.safetensors` holds {n_trainables} tensors; the adapter (if any) is in `{ADAPTER}`.", "", "## Metrics", ""]
    metrics = metadata.get("metrics") or {}
    if metrics:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items())]
    else:
        lines.append("No evaluation was recorded for this run (run `medvlsam2 test`).")
    lines += ["", "## Use", "", "```bash", "medvlsam2 predict --model THIS_FOLDER --volume scan.nii.gz --task TASK --out result/", "```", ""]
    return "\n".join(lines)


def model_config(model: str | Path) -> DictConfig:
    """The config of an export folder or of the run a ``.ckpt`` belongs to (nothing built)."""
    path = Path(model)
    if path.is_dir():
        if not (path / "config.yaml").is_file():
            raise InputError(f"--model: {path} is not an export folder (no config.yaml)")
        return load_config([path / "config.yaml"])
    if path.suffix == ".ckpt":
        if not path.is_file():
            raise InputError(f"--model: checkpoint not found: {path}")
        return load_config([run_folder_of(path) / "config.yaml"])
    raise InputError(f"--model: {path} is neither an export folder nor a .ckpt file")


def load_module(model: str | Path) -> tuple[Any, DictConfig, dict[str, Any]]:
    """A ready ``MedVLModule`` from an export folder or a ``.ckpt`` (eval mode), its config, metadata."""
    from medvlsam2.core.run import load_weights

    path = Path(model)
    cfg = model_config(path)
    if path.is_dir():
        module = _build_module(cfg)
        metadata = json.loads((path / "metadata.json").read_text()) if (path / "metadata.json").is_file() else {}
        load_export_weights(module, path, metadata)
    else:
        module = _build_module(cfg)
        load_weights(module, path)
        metadata = {}
    module.eval()
    return module, cfg, metadata


def load_export_weights(module: Any, folder: Path, metadata: dict[str, Any] | None = None) -> None:
    """Load an export folder's adapter and trainables into a module built from its config."""
    from safetensors.torch import load_file

    if metadata is None:
        meta_file = folder / "metadata.json"
        metadata = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    file = folder / TRAINABLES
    if not file.is_file():
        raise InputError(f"--model: {file} is missing")
    state = load_file(str(file))
    own = module.state_dict()
    unknown = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and own[k].shape != state[k].shape]
    if unknown or wrong:
        detail = ", ".join(unknown[:3] + [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:3]])
        raise InputError(f"--model: {folder} was exported from a different model config: {detail}")
    module.load_state_dict(state, strict=False)
    peft = _peft_model(module)
    adapter = folder / ADAPTER
    if peft is not None:
        if not adapter.is_file():
            raise InputError(f"--model: {adapter} is missing")
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(peft, load_file(str(adapter)))
    expected = metadata.get("frozen_checksums", {})
    rebuilt = parameter_digests(module, set(expected))
    differ = [n for n, digest in expected.items() if n in rebuilt and rebuilt[n] != digest]
    if differ:
        raise InputError(
            f"--model: {len(differ)} frozen weight(s) rebuilt from the config differ from the ones the model "
            f"was trained with (e.g. {differ[0]}); the pretrained source or library version changed"
        )
