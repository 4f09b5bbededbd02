"""``fit`` / ``validate`` / ``test``: stages in order, a run folder, resumable checkpoints.

Run folder (``output_dir/run_name``)::

    config.yaml                 the resolved config the run used
    state.json                  finished stages (for --resume)
    checkpoints/<stage>/last.ckpt
    checkpoints/last.ckpt       the final weights of the last finished stage (a hard link)
    logs/<stage>/metrics.csv    Lightning CSV log; logs/tensorboard/ for TensorBoard
    metrics.csv                 every stage's log in one table (with a `stage` column)
    metrics.json                the latest validation/test metrics per task

Checkpoints leave out the parameters no stage trains (see ``core/checkpoint.py``).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from medvlsam2.core.checkpoint import (
    AtomicCheckpointIO,
    atomic_write_text,
    check_saved_state,
    load_checkpoint,
)
from medvlsam2.core.config import StageConfig, load_config, stage_runs, stage_weight, task_keys, to_yaml
from medvlsam2.core.errors import ConfigError, InputError, RunInterrupted, did_you_mean

LIGHTNING_TRAINER_KEYS = (
    "accelerator", "devices", "num_nodes", "strategy", "precision", "accumulate_grad_batches",
    "gradient_clip_val", "deterministic", "log_every_n_steps", "val_check_interval",
    "check_val_every_n_epoch", "limit_train_batches", "limit_val_batches", "limit_test_batches",
    "num_sanity_val_steps", "fast_dev_run", "enable_progress_bar",
)


def _drop_advert(record: logging.LogRecord) -> bool:
    return "litlogger" not in record.getMessage()


def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.output_dir) / cfg.run_name


def stages_of(cfg: DictConfig) -> list[StageConfig]:
    """The configured stages, or one stage ``train`` with every task."""
    if cfg.stages:
        return [OmegaConf.to_object(s) for s in cfg.stages]
    names = list(dict.fromkeys(t["name"] for t in cfg.tasks))
    return [StageConfig(name="train", tasks=names, max_steps=cfg.trainer.max_steps, max_epochs=cfg.trainer.max_epochs)]


def _trainer(
    cfg: DictConfig,
    stage: StageConfig,
    folder: Path,
    *,
    training: bool,
    extra_callbacks: list[Any] = (),
    validate: bool = True,
) -> Any:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    # A deprecation inside Lightning itself and an advertisement: neither is actionable by users.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_drop_advert)
    t = cfg.trainer
    kwargs = {k: t[k] for k in LIGHTNING_TRAINER_KEYS if t[k] is not None}
    kwargs["max_steps"] = stage.max_steps if stage.max_steps > 0 else t.max_steps
    if not validate:
        kwargs["limit_val_batches"] = 0
    max_epochs = stage.max_epochs if stage.max_epochs is not None else t.max_epochs
    if max_epochs is not None:
        kwargs["max_epochs"] = max_epochs
    elif kwargs["max_steps"] > 0:
        kwargs["max_epochs"] = -1
    callbacks: list[Any] = list(extra_callbacks)
    if training:
        callbacks.append(
            ModelCheckpoint(
                dirpath=folder / "checkpoints" / stage.name,
                filename="last",
                save_top_k=1,
                enable_version_counter=False,
                every_n_epochs=1,
                save_on_exception=True,
            )
        )
    if t.enable_progress_bar and sys.stderr.isatty():
        callbacks.append(RichProgressBar())
    # Evaluation results go to metrics.json; only training writes CSV / TensorBoard logs.
    loggers: Any = (
        [
            CSVLogger(folder / "logs", name=stage.name, version=""),
            TensorBoardLogger(folder / "logs", name="tensorboard", version=stage.name),
        ]
        if training
        else False
    )
    return L.Trainer(
        **kwargs,
        default_root_dir=folder,
        logger=loggers,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,
        enable_checkpointing=training,
        enable_model_summary=False,
    )


def _deferred_sigint() -> Any:
    """A callback whose ``handle`` is fit's SIGINT handler: Ctrl-C takes effect at the end of the
    current batch, as KeyboardInterrupt, which Lightning ends with its exception checkpoint.
    Python's own handler raises wherever the main thread is, and a KeyboardInterrupt raised
    inside a finalizer (``__del__``) is printed and dropped, so a run could miss a Ctrl-C. A
    second Ctrl-C before the batch ends raises at once."""
    import lightning as L

    class DeferredSigint(L.Callback):
        def __init__(self) -> None:
            self.pending = False

        def handle(self, signum: int, frame: Any) -> None:
            if self.pending:
                raise KeyboardInterrupt
            self.pending = True

        def _raise_if_pending(self, *args: Any) -> None:
            if self.pending:
                raise KeyboardInterrupt

        on_train_batch_end = on_validation_batch_end = _raise_if_pending

    return DeferredSigint()


def _datamodule(cfg: DictConfig, module: Any, stage: StageConfig) -> Any:
    from medvlsam2.core.data import MedVLDataModule

    keys = task_keys(cfg.tasks)
    weights = {
        key: stage_weight(stage, key, entry["name"], module.task_weights[key])
        if stage_runs(stage.tasks, key, entry["name"])
        else 0.0
        for key, entry in zip(keys, cfg.tasks)
    }
    stage_tasks = {k: module.tasks[k] for k in keys if weights[k] > 0}
    return MedVLDataModule(
        stage_tasks,
        weights,
        batch_size=stage.batch_size or cfg.trainer.batch_size,
        eval_batch_size=cfg.trainer.eval_batch_size,
        num_workers=cfg.trainer.num_workers,
        steps_per_epoch=cfg.trainer.steps_per_epoch,
        seed=cfg.seed,
    )


def prepare_demo_data(cfg: DictConfig) -> None:
    """Build the demo dataset where ``vars.demo_data`` points, if it is not there yet.

    ``vars.demo_cases`` / ``vars.demo_ct_cases`` size it; an existing identical build is reused.
    """
    target = (cfg.vars or {}).get("demo_data")
    if not target:
        return
    from medvlsam2.plugins.tasks.data.demo import build_demo_data

    build_demo_data(
        target,
        num_cases=int(cfg.vars.get("demo_cases", 24)),
        num_ct_cases=int(cfg.vars.get("demo_ct_cases", 8)),
        seed=int(cfg.vars.get("demo_seed", 0)),
    )


def check_evaluation_limit(cfg: DictConfig, split: str) -> None:
    """Refuse to score ``split`` when the trainer's batch limit for it is 0. Lightning applies
    ``limit_val_batches`` to ``trainer.validate`` as well as to validation during ``fit`` (where
    0 is the usual way to switch it off), and would return empty metrics without a word."""
    key = "limit_test_batches" if split == "test" else "limit_val_batches"
    if cfg.trainer[key] is not None and cfg.trainer[key] == 0:
        raise ConfigError(
            f"config: trainer.{key}: 0 leaves no batch of the {split} split to score; "
            f"pass trainer.{key}=null to score all of it (0 only switches off "
            f"{'the test after fit' if split == 'test' else 'validation during fit'})"
        )


def _read_state(folder: Path) -> dict[str, Any]:
    path = folder / "state.json"
    return json.loads(path.read_text()) if path.is_file() else {"completed": []}


def load_weights(module: Any, ckpt: Path) -> None:
    """Copy the weights of a ``.ckpt`` (read safely) into ``module``; shapes must agree, and the
    frozen weights the checkpoint left out must be the ones ``module`` was rebuilt with."""
    state = check_saved_state(module, load_checkpoint(ckpt), ckpt)
    module.load_state_dict(state, strict=False)


def _log_trainable(module: Any, stage: StageConfig) -> None:
    from lightning.pytorch.utilities import rank_zero_info

    rows = module.trainable_summary()
    text = ", ".join(f"{name} {trainable:,}/{total:,}" for name, (trainable, total) in rows.items())
    rank_zero_info(f"stage '{stage.name}': trainable parameters per component: {text}")


def fit(
    cfg: DictConfig | None,
    *,
    only_stage: str | None = None,
    resume: str | Path | None = None,
    callbacks: list[Any] = (),
    keep: dict[str, Any] | None = None,
) -> Path:
    """Train every stage in order (or ``only_stage``), each from the previous stage's weights.

    ``callbacks`` are extra Lightning callbacks for every stage's trainer and for the test
    after the last stage. ``keep``, when given, receives the final module (``keep["module"]``)
    and test predictions (``keep["predictions"]``) for callers that go on with them (the demo).
    """
    import lightning as L

    from medvlsam2.core.engine import MedVLModule

    if resume is not None:
        folder = Path(resume)
        if not (folder / "config.yaml").is_file():
            raise InputError(f"--resume: {folder} is not a run folder (no config.yaml)")
        cfg = load_config([folder / "config.yaml"])
    else:
        folder = run_dir(cfg)
    if cfg.trainer.test_after_fit:
        check_evaluation_limit(cfg, "test")  # before training, not after it
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "config.yaml", to_yaml(cfg))
    prepare_demo_data(cfg)
    stages = stages_of(cfg)
    names = [s.name for s in stages]
    if only_stage is not None and only_stage not in names:
        raise ConfigError(f"--stage: no stage '{only_stage}'{did_you_mean(only_stage, names)}; stages: {', '.join(names)}")
    state = _read_state(folder)
    previous: Path | None = None
    module = None
    for stage in stages:
        last = folder / "checkpoints" / stage.name / "last.ckpt"
        if only_stage is not None and stage.name != only_stage:
            if last.is_file():
                previous = last
            continue
        if stage.name in state["completed"] and last.is_file():
            previous = last
            continue
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)
        module = MedVLModule(cfg, stage)
        resume_from = last if last.is_file() else None
        if resume_from is None and previous is not None:
            load_weights(module, previous)
        _log_trainable(module, stage)
        datamodule = _datamodule(cfg, module, stage)
        datamodule.split("train")  # bad dataset files fail here, before Lightning starts
        has_validation = len(datamodule.split("validation")) > 0
        interrupt = _deferred_sigint()
        trainer = _trainer(
            cfg, stage, folder, training=True, extra_callbacks=[*callbacks, interrupt], validate=has_validation
        )
        # a process started with SIGINT ignored (a background job) keeps ignoring it
        own_sigint = (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
        )
        sigint_before = signal.signal(signal.SIGINT, interrupt.handle) if own_sigint else None
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
        except SystemExit as stop:
            # Lightning ends SIGINT (KeyboardInterrupt) with sys.exit(1) and SIGTERM with
            # SIGTERMException, both after ModelCheckpoint(save_on_exception=True) has saved.
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            name = "SIGTERM" if isinstance(stop, SIGTERMException) else "SIGINT"
            raise RunInterrupted(name, str(folder), str(last) if last.is_file() else None) from stop
        finally:
            if own_sigint:
                signal.signal(signal.SIGINT, sigint_before)
        if trainer.global_rank == 0:
            state["completed"].append(stage.name)
            atomic_write_text(folder / "state.json", json.dumps(state, indent=2))
            _write_metrics(folder, module.last_metrics, names)
        if interrupt.pending:  # Ctrl-C after the stage's last batch: it is finished, stop here
            raise RunInterrupted("SIGINT", str(folder), str(last) if last.is_file() else None)
        if last.is_file():  # fast_dev_run writes no checkpoint; the next stage then starts fresh
            previous = last
    if keep is not None:
        keep["module"] = module
    if module is not None and cfg.trainer.test_after_fit:
        if len(_datamodule(cfg, module, stages[-1]).split("test")) > 0:
            _, predictions = evaluate_module(cfg, module, split="test", callbacks=callbacks)
            if keep is not None:
                keep["predictions"] = predictions
    if previous is not None and previous.is_file():
        tmp = folder / "checkpoints" / ".last.ckpt.tmp"
        tmp.unlink(missing_ok=True)
        try:  # a hard link: checkpoints are replaced by rename, never written in place
            os.link(previous, tmp)
        except OSError:  # a file system without hard links
            shutil.copyfile(previous, tmp)
        tmp.replace(folder / "checkpoints" / "last.ckpt")
    return folder


def evaluate(cfg: DictConfig, ckpt: str | Path | None, *, split: str = "test") -> dict[str, float]:
    """Score every task on ``split`` ("validation" or "test") with weights from ``ckpt``
    (a ``.ckpt`` file or an export folder)."""
    import lightning as L

    from medvlsam2.core.engine import MedVLModule

    check_evaluation_limit(cfg, split)
    prepare_demo_data(cfg)
    L.seed_everything(int(cfg.seed), verbose=False)  # random-init frozen parts as in training
    module = MedVLModule(cfg, StageConfig(name=split, tasks=[]))
    if ckpt is not None and Path(ckpt).is_dir():
        from medvlsam2.core.export import load_export_weights

        load_export_weights(module, Path(ckpt))
    elif ckpt is not None:
        load_weights(module, Path(ckpt))
    metrics, _ = evaluate_module(cfg, module, split=split)
    return metrics


def evaluate_module(
    cfg: DictConfig, module: Any, *, split: str = "test", callbacks: Sequence[Any] = ()
) -> tuple[dict[str, float], dict[str, list]]:
    """Score a built module on ``split``; returns the metrics and every task's predictions.
    ``callbacks`` are extra Lightning callbacks for the evaluation trainer."""
    check_evaluation_limit(cfg, split)
    folder = run_dir(cfg)
    stage = StageConfig(name=split, tasks=list(dict.fromkeys(t["name"] for t in cfg.tasks)))
    datamodule = _datamodule(cfg, module, stage)
    datamodule.split(split)  # bad dataset files fail here, before Lightning starts
    trainer = _trainer(cfg, stage, folder, training=False, extra_callbacks=list(callbacks))
    if split == "test":
        trainer.test(module, datamodule=datamodule)
    else:
        trainer.validate(module, datamodule=datamodule)
    if trainer.global_rank == 0:
        _write_metrics(folder, module.last_metrics, [s.name for s in stages_of(cfg)])
    return module.last_metrics, module.last_predictions


def _write_metrics(folder: Path, latest: dict[str, float], stage_names: list[str]) -> None:
    """metrics.json (merged with what earlier commands wrote) and metrics.csv (all stages)."""
    path = folder / "metrics.json"
    merged = json.loads(path.read_text()) if path.is_file() else {}
    merged.update(latest)
    atomic_write_text(path, json.dumps(merged, indent=2, sort_keys=True))
    rows, columns = [], ["stage"]
    for name in stage_names:
        log = folder / "logs" / name / "metrics.csv"
        if not log.is_file():
            continue
        with log.open(newline="") as handle:
            for row in csv.DictReader(handle):
                rows.append({"stage": name, **row})
                columns += [c for c in row if c not in columns]
    if rows:
        out = folder / "metrics.csv"
        with out.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
