"""The LightningModule: one model, a dict of tasks, per-component freezing and optimiser groups."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from medvlsam2.core.checkpoint import FROZEN_CHECKSUMS, check_saved_state, parameter_digests
from medvlsam2.core.config import StageConfig, task_keys
from medvlsam2.core.errors import ConfigError, did_you_mean
from medvlsam2.core.model import COMPONENTS, MedVLModel
from medvlsam2.core.registry import get_host
from medvlsam2.core.task import BaseTask


def build_tasks(cfg: DictConfig) -> tuple[dict[str, BaseTask], dict[str, float]]:
    host = get_host()
    tasks, weights = {}, {}
    for i, (key, entry) in enumerate(zip(task_keys(cfg.tasks), cfg.tasks)):
        args = OmegaConf.to_container(entry, resolve=True)
        weights[key] = float(args.pop("weight", 1.0))
        tasks[key] = host.build("tasks", args["name"], args, path=f"tasks[{i}]")
    return tasks, weights


class MedVLModule(L.LightningModule):
    """Runs the task mix through the model; one instance per training stage."""

    def __init__(self, cfg: DictConfig, stage: StageConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = MedVLModel(cfg.model)
        tasks, self.task_weights = build_tasks(cfg)
        for task in tasks.values():
            task.bind(self.model)
        self.tasks = nn.ModuleDict(tasks)
        self.stage = stage
        self._predictions: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.last_metrics: dict[str, float] = {}
        self.last_predictions: dict[str, list[dict[str, Any]]] = {}
        self.trainable_components = self.apply_stage(stage)
        # Checkpoints leave out what no stage trains (core/checkpoint.py); Lightning's resume
        # then loads a partial state_dict, checked in on_load_checkpoint.
        self.strict_loading = False
        self._left_out_digests: dict[str, str] | None = None

    # -- freezing -------------------------------------------------------------------------
    def component_parameters(self) -> dict[str, list[nn.Parameter]]:
        named = dict(self.model.named_parameters())
        parts = {c: [named[n] for n in names] for c, names in self.model.component_params.items()}
        parts["heads"] = list(self.tasks.parameters())
        return parts

    def stage_components(self, stage: StageConfig | None) -> list[str]:
        if stage is not None and stage.trainable:
            return list(stage.trainable)
        names: list[str] = []
        for task in self.tasks.values():
            names += [c for c in task.trains if c not in names]
        return names or ["heads"]

    def apply_stage(self, stage: StageConfig | None) -> list[str]:
        """Freeze everything, then unfreeze the stage's components; returns their names."""
        parts = self.component_parameters()
        wanted = self.stage_components(stage)
        for name in wanted:
            if name not in parts:
                known = sorted(parts)
                raise ConfigError(
                    f"config: stage '{stage.name if stage else 'train'}': unknown component '{name}'"
                    f"{did_you_mean(name, known)}; components: {', '.join(known)}"
                )
        for param in self.parameters():
            param.requires_grad_(False)
        for name in wanted:
            for param in parts[name]:
                param.requires_grad_(True)
        return wanted

    def never_trained(self) -> set[str]:
        """Names (tied aliases included) of the parameters that no stage of the run trains."""
        from medvlsam2.core.run import stages_of

        parts = self.component_parameters()
        trained = {id(p) for stage in stages_of(self.cfg) for c in self.stage_components(stage) for p in parts.get(c, [])}
        return {n for n, p in self.named_parameters(remove_duplicate=False) if id(p) not in trained}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The frozen parameters are rebuilt from the config on load; their digests stay, so a
        # changed pretrained source is caught. They do not change during a run: hashed once.
        if self._left_out_digests is None:
            self._left_out_digests = parameter_digests(self, self.never_trained())
        state = checkpoint["state_dict"]
        for name in self._left_out_digests:
            state.pop(name, None)
        checkpoint[FROZEN_CHECKSUMS] = dict(self._left_out_digests)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_saved_state(self, checkpoint, self.trainer.ckpt_path or "being resumed")

    def trainable_summary(self) -> dict[str, tuple[int, int]]:
        """Per component: (trainable, total) parameter counts."""
        parts = self.component_parameters()
        summary = {}
        for name in list(COMPONENTS) + ["heads"]:
            params = parts.get(name, [])
            if params:
                summary[name] = (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
        return summary

    # -- steps ----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if "skipped" in batch:  # every sample was unreadable (data.skip_bad): no step
            return None
        key = batch["task"]
        losses = self.tasks[key].training_step(self.model, batch)
        if torch.is_grad_enabled() and not losses["loss"].requires_grad:
            # e.g. interactive_seg (decoder only) in a stage whose trainable leaves the decoder out;
            # backward would fail with an internal error naming no key
            stage = self.stage.name if self.stage is not None else "train"
            task = self.tasks[key]
            raise ConfigError(
                f"config: stage '{stage}': the loss of task {key} reaches none of the stage's trainable "
                f"components ({', '.join(self.trainable_components)}); add one it trains "
                f"({', '.join(task.trains) or 'its own parameters'}) to the stage's trainable, or leave {key} out of its tasks"
            )
        size = _batch_size(batch)
        for name, value in losses.items():
            self.log(f"train/{key}/{name}", value.detach(), batch_size=size, on_step=True, prog_bar=name == "loss")
        self.log("train/loss", losses["loss"].detach(), batch_size=size, prog_bar=True)
        return losses["loss"]

    def on_train_start(self) -> None:
        # Lightning keeps the mode a module is in when fit starts, and a freshly built module has
        # every submodule in training mode, frozen pretrained parts included. Plugins keep those
        # in eval mode through their own train() (BatchNorm statistics stay pretrained), so
        # training calls it.
        self.train()

    def on_train_epoch_start(self) -> None:
        # Random state depends only on (seed, epoch): a run resumed at an epoch boundary
        # continues exactly as an uninterrupted one.
        torch.manual_seed(int(self.cfg.seed) * 1_000_003 + self.current_epoch + 1)

    def _eval_step(self, batch: dict[str, Any]) -> None:
        if "skipped" in batch:
            return
        key = batch["task"]
        self._predictions[key].extend(self.tasks[key].predict_step(self.model, batch))

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch)

    def _finish_eval(self, prefix: str) -> None:
        predictions = dict(self._predictions)
        self._predictions.clear()
        if self.trainer.world_size > 1:
            gathered: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, predictions)
            predictions = defaultdict(list)
            for part in gathered:
                for key, values in part.items():
                    predictions[key].extend(values)
        metrics: dict[str, float] = {}
        for key in self.tasks:
            if predictions.get(key):
                for name, value in self.tasks[key].compute_metrics(predictions[key]).items():
                    metrics[f"{prefix}/{key}/{name}"] = float(value)
                metrics[f"{prefix}/{key}/num_cases"] = float(len(predictions[key]))
        self.last_metrics = metrics
        self.last_predictions = dict(predictions)
        for name, value in metrics.items():
            self.log(name, value, sync_dist=False, rank_zero_only=True)

    def on_validation_epoch_end(self) -> None:
        self._finish_eval("val")

    def on_test_epoch_end(self) -> None:
        self._finish_eval("test")

    # -- optimisation ---------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        stage = self.stage or StageConfig(name="train")
        parts = self.component_parameters()
        groups = []
        seen: set[int] = set()
        for component in self.trainable_components:
            lr = float(stage.lr_per_component.get(component, stage.lr))
            decay, no_decay = [], []
            for param in parts[component]:
                if id(param) in seen or not param.requires_grad:
                    continue
                seen.add(id(param))
                # No weight decay on norms, biases and other vectors.
                (no_decay if param.ndim <= 1 else decay).append(param)
            if decay:
                groups.append({"params": decay, "lr": lr, "weight_decay": stage.weight_decay, "name": component})
            if no_decay:
                groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{component}.no_decay"})
        if not groups:
            raise ConfigError(f"config: stage '{stage.name}': nothing to train in {self.trainable_components}")
        optimizer = torch.optim.AdamW(groups)
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        if total is None:
            total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(0, int(stage.warmup_steps))

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _batch_size(batch: dict[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.ndim:
            return int(value.shape[0])
        if isinstance(value, list):
            return len(value)
    return 1
