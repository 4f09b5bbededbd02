"""Run configuration: YAML files merged left to right, dotted overrides, strict validation.

Components are chosen by registry name only (``model.encoder.name: vit3d``); keys that would
import code (``_target_``, ``class_path`` ...) and YAML python tags are refused.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from medvlsam2.core.errors import ConfigError, MedVLError, did_you_mean

FORBIDDEN_KEYS = ("_target_", "_partial_", "_recursive_", "_args_", "_convert_", "class_path", "init_args")
MODEL_COMPONENTS = {"encoder": "encoders", "projector": "projectors", "llm": "llms", "decoder": "decoders"}


@dataclass
class SegProjectorConfig:
    """The ``[SEG]`` hidden state -> decoder prompt MLP (one for every LLM)."""

    hidden_dim: int | None = None
    num_layers: int = 2
    dropout: float = 0.0


@dataclass
class ModelConfig:
    encoder: dict[str, Any] = field(default_factory=lambda: {"name": "vit3d"})
    # projector/llm/decoder may be null for models that need only an encoder (e.g. a probe).
    projector: dict[str, Any] | None = field(default_factory=lambda: {"name": "spatial_pool_mlp"})
    llm: dict[str, Any] | None = field(default_factory=lambda: {"name": "hf_causal"})
    decoder: dict[str, Any] | None = field(default_factory=lambda: {"name": "sam2_volume"})
    seg_projector: SegProjectorConfig = field(default_factory=SegProjectorConfig)


def task_keys(task_entries: Any) -> list[str]:
    """One key per task entry: its name, or ``name_2``, ``name_3`` … when a name repeats."""
    seen: dict[str, int] = defaultdict(int)
    keys = []
    for entry in task_entries:
        seen[entry["name"]] += 1
        keys.append(entry["name"] if seen[entry["name"]] == 1 else f"{entry['name']}_{seen[entry['name']]}")
    return keys


def stage_runs(stage_tasks: Sequence[str], key: str, name: str) -> bool:
    """Whether a stage whose ``tasks`` list is ``stage_tasks`` trains the task entry with this
    key and name: a name picks every entry of that name, a key (``semantic_seg_2``) just one."""
    return key in stage_tasks or name in stage_tasks


def stage_weight(stage: Any, key: str, name: str, weight: float) -> float:
    """The draw weight in ``stage`` of the task entry ``key`` (named ``name``, whose own weight
    is ``weight``): the stage's ``task_weights`` by key, else by name, else ``weight``."""
    overrides = stage.task_weights
    return float(overrides[key] if key in overrides else overrides.get(name, weight))


@dataclass
class StageConfig:
    """One training stage: which tasks run and which components train."""

    name: str = MISSING
    #: Task names (every entry of that name) or task keys (``semantic_seg_2``: the second
    #: entry named ``semantic_seg``, as the metrics name it).
    tasks: list[str] = field(default_factory=list)
    trainable: list[str] = field(default_factory=list)
    max_steps: int = -1
    max_epochs: int | None = None
    lr: float = 1e-4
    lr_per_component: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    #: Training samples per batch in this stage; None: ``trainer.batch_size``. A stage whose
    #: steps are cheap (short text answers, no decoder) can take more samples per step.
    batch_size: int | None = None
    #: This stage's draw weights for some of its tasks, by name (every entry of that name) or
    #: key (one entry; a key wins over its name); a task left out keeps its entry's ``weight``.
    #: E.g. a grounding stage that replays a little of the text tasks it followed:
    #: ``{grounding: 8, report_generation: 1, vqa: 1}``.
    task_weights: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainerConfig:
    """The Lightning ``Trainer`` arguments a run may set."""

    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    max_steps: int = -1
    max_epochs: int | None = None
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    deterministic: bool = False
    log_every_n_steps: int = 10
    val_check_interval: float | None = None
    check_val_every_n_epoch: int | None = 1
    limit_train_batches: float | None = None
    limit_val_batches: float | None = None
    limit_test_batches: float | None = None
    num_sanity_val_steps: int = 0
    fast_dev_run: bool = False
    enable_progress_bar: bool = True
    batch_size: int = 1
    #: Samples per validation / test batch (no gradients, so it can be larger; generation
    #: runs a batch at once, which is several times faster per sample on a CPU). None: batch_size.
    eval_batch_size: int | None = None
    num_workers: int = 0
    #: Score the test split with the final weights at the end of ``fit``.
    test_after_fit: bool = True
    #: Training batches per epoch (checkpoints are written at epoch ends). None: one pass
    #: over every task's training samples.
    steps_per_epoch: int | None = None


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: list[dict[str, Any]] = field(default_factory=list)
    stages: list[StageConfig] = field(default_factory=list)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0
    output_dir: str = "runs"
    run_name: str = "run"
    #: Free variables for interpolation elsewhere in the file, e.g. ``${vars.data_root}``.
    vars: dict[str, Any] = field(default_factory=dict)


# -- reading --------------------------------------------------------------------------------
def read_yaml(path: str | Path) -> DictConfig:
    """One YAML file as a DictConfig; python tags and unreadable files give a ``ConfigError``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}:{where}: invalid YAML: {problem}") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping, got {type(data).__name__}")
    _refuse_code_keys(data, str(path))
    return OmegaConf.create(data)


def _refuse_code_keys(node: Any, where: str, path: str = "") -> None:
    if isinstance(node, Mapping):
        for key, value in node.items():
            dotted = f"{path}.{key}" if path else str(key)
            if str(key) in FORBIDDEN_KEYS:
                raise ConfigError(
                    f"{where}: {dotted}: import paths are not allowed in configs; "
                    "choose components by registry name (e.g. `name: vit3d`)"
                )
            _refuse_code_keys(value, where, dotted)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            _refuse_code_keys(value, where, f"{path}[{i}]")


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """``key.path=value`` strings (values parsed as YAML) -> ``(key, value)`` pairs."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override '{item}' must look like key.path=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{item}': value is not valid YAML") from err
        _refuse_code_keys({key.split(".")[-1]: value}, "override", key.rpartition(".")[0])
        parsed.append((key, value))
    return parsed


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """Set each ``key.path=value`` on ``cfg`` (list items by index: ``tasks.0.weight=3``)."""
    for key, value in parse_overrides(overrides):
        try:
            OmegaConf.update(cfg, key, value, force_add=True)
        except (OmegaConfBaseException, IndexError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"override '{key}': {first}") from err
    return cfg


# -- validation -----------------------------------------------------------------------------
def _schema_error(err: OmegaConfBaseException, prefix: str) -> ConfigError:
    key = getattr(err, "full_key", "") or getattr(err, "key", "") or ""
    dotted = ".".join(p for p in (prefix, str(key)) if p)
    if isinstance(err, ConfigKeyError):
        parent_type = getattr(err, "object_type", None)
        choices = [f.name for f in dataclasses.fields(parent_type)] if dataclasses.is_dataclass(parent_type) else []
        leaf = str(getattr(err, "key", key)).split(".")[-1]
        return ConfigError(f"config: unknown key '{dotted}'{did_you_mean(leaf, choices)}")
    if isinstance(err, MissingMandatoryValue):
        return ConfigError(f"config: '{dotted}' is required but missing")
    message = str(err).strip().splitlines()[0]
    if isinstance(err, ValidationError):
        return ConfigError(f"config: {dotted}: wrong type: {message}")
    return ConfigError(f"config: {dotted}: {message}")


def merge_schema(schema: type, data: Any, path: str = "") -> DictConfig:
    """Merge ``data`` onto the dataclass ``schema``: unknown keys and wrong types raise."""
    if data is None:
        data = {}
    if not isinstance(data, (Mapping, DictConfig)):
        raise ConfigError(f"config: {path or 'root'}: expected a mapping, got {type(data).__name__}")
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), data)
    except OmegaConfBaseException as err:
        raise _schema_error(err, path) from err


def make_plugin_config(config_cls: type, args: Mapping[str, Any] | DictConfig, *, path: str) -> Any:
    """A validated instance of a plugin's config dataclass built from ``args`` (no ``name``)."""
    if isinstance(args, DictConfig):
        args = OmegaConf.to_container(args, resolve=True)
    args = {k: v for k, v in dict(args).items() if k != "name"}
    merged = merge_schema(config_cls, args, path)
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _schema_error(err, path) from err


def _component_entry(node: Any, path: str) -> tuple[str, dict[str, Any]]:
    if isinstance(node, str):
        return node, {}
    if not isinstance(node, Mapping) or "name" not in node:
        raise ConfigError(f"config: {path}: expected a mapping with a 'name' (a registry name)")
    name = node["name"]
    if not isinstance(name, str):
        raise ConfigError(f"config: {path}.name: expected a registry name (string), got {name!r}")
    return name, {k: v for k, v in node.items() if k != "name"}


def validate_components(cfg: DictConfig) -> None:
    """Every named component exists in the registry and its arguments fit its config class."""
    from medvlsam2.core.registry import get_host

    host = get_host()
    container = OmegaConf.to_container(cfg, resolve=True)
    for field_name, kind in MODEL_COMPONENTS.items():
        path = f"model.{field_name}"
        if container["model"][field_name] is None:
            if field_name == "encoder":
                raise ConfigError("config: model.encoder: every model needs an encoder")
            continue
        name, args = _component_entry(container["model"][field_name], path)
        _check_plugin(host, kind, name, args, path)
    task_names = []
    for i, entry in enumerate(container["tasks"]):
        path = f"tasks[{i}]"
        name, args = _component_entry(entry, path)
        args = {k: v for k, v in args.items() if k != "weight"}
        _check_weight(f"config: {path}.weight", entry.get("weight", 1.0) if isinstance(entry, Mapping) else 1.0)
        _check_plugin(host, "tasks", name, args, path)
        task_names.append(name)
    for key in ("batch_size", "eval_batch_size"):
        value = container["trainer"][key]
        if value is not None and value < 1:
            raise ConfigError(f"config: trainer.{key}: expected at least 1, got {value}")
    known = task_keys([{"name": n} for n in task_names])  # every name, and name_2 … for a repeated one
    for i, stage in enumerate(container["stages"]):
        if stage["batch_size"] is not None and stage["batch_size"] < 1:
            raise ConfigError(f"config: stages[{i}].batch_size: expected at least 1, got {stage['batch_size']}")
        for j, task in enumerate(stage["tasks"]):
            if task not in known:
                raise ConfigError(
                    f"config: stages[{i}].tasks[{j}]: task '{task}' is not in `tasks`"
                    f"{did_you_mean(task, known)}"
                )
        runs = {x for k, n in zip(known, task_names) if stage_runs(stage["tasks"], k, n) for x in (k, n)}
        for task, weight in stage["task_weights"].items():
            path = f"config: stages[{i}].task_weights.{task}"
            if task not in runs:
                raise ConfigError(f"{path}: task '{task}' is not in this stage's `tasks` {list(stage['tasks'])}")
            _check_weight(path, weight)


def _check_weight(path: str, weight: Any) -> None:
    """A task's draw weight is a positive number (not a bool)."""
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0:
        raise ConfigError(f"{path}: expected a positive number, got {weight!r}")


def _check_plugin(host: Any, kind: str, name: str, args: dict[str, Any], path: str) -> None:
    try:
        target = host.get(kind, name).load()
    except MedVLError as err:
        raise ConfigError(f"config: {path}.name: {err}") from err
    config_cls = getattr(target, "config_class", None)
    if config_cls is not None:
        instance = make_plugin_config(config_cls, args, path=path)
        check = getattr(target, "check_config", None)
        if callable(check):  # deeper checks a plugin offers without building (e.g. its data options)
            check(instance, path=path)
    elif args:
        raise ConfigError(f"config: {path}: {kind[:-1]} '{name}' takes no arguments, got {sorted(args)}")


def load_config(
    files: Sequence[str | Path] = (), overrides: Sequence[str] = (), *, validate_plugins: bool = True
) -> DictConfig:
    """Merge ``files`` left to right, apply ``overrides``, validate, and resolve interpolations."""
    merged = OmegaConf.create({})
    for path in files:
        try:
            merged = OmegaConf.merge(merged, read_yaml(path))
        except OmegaConfBaseException as err:
            raise _schema_error(err, "") from ConfigError(f"{path}: cannot merge onto the earlier files")
    merged = apply_overrides(merged, overrides)
    raw = OmegaConf.to_container(merged, resolve=False)
    cfg = merge_schema(RunConfig, raw)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise _schema_error(err, "") from err
    if validate_plugins:
        validate_components(cfg)
    return cfg


def to_yaml(cfg: DictConfig | ListConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
