"""The task contract: data -> batches -> losses; predictions -> metrics.

A task is an ``nn.Module`` so that heads it owns train with the model. The template follows
torchgeo's ``BaseTask``: ``__init__`` calls ``configure_losses`` and ``configure_metrics``, and
``bind(model)`` calls ``configure_heads(model)`` once the model exists (so a head can size
itself from ``model.encoder.out_dim``). A task then answers four questions — which samples
(``samples``), how they batch (``collate``), what the loss is (``training_step``) and how it
is scored (``predict_step`` + ``compute_metrics``).

``model`` below is the composed model the engine passes in: it exposes ``encoder``,
``trunk`` (encoder -> projector -> LLM -> ``[SEG]`` prompts) and ``decoder``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

SPLITS = ("train", "validation", "test")


class BaseTask(nn.Module):
    """Base class of task plugins."""

    config_class: ClassVar[type | None] = None
    #: Components this task trains by default (names the stage ``trainable`` list uses).
    trains: ClassVar[tuple[str, ...]] = ()
    #: Metric whose higher value is better, used to pick checkpoints and summarise runs.
    main_metric: ClassVar[str] = ""
    #: The prompts ``infer`` reads, of "text", "points" and "box" (None: not declared, so
    #: ``predict`` passes what it is given). ``predict`` refuses any other before the model loads.
    infer_prompts: ClassVar[frozenset[str] | None] = None
    #: Groups of prompts of which ``infer`` needs one each, e.g. ``(("points", "box"),)``.
    infer_needs: ClassVar[tuple[tuple[str, ...], ...]] = ()

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self._bound = False
        self.configure_losses()
        self.configure_metrics()

    def bind(self, model: Any) -> None:
        """Called once by the engine with the built model, before training or loading weights."""
        if not self._bound:
            self.configure_heads(model)
            self._bound = True

    # -- template methods ---------------------------------------------------------------
    def configure_heads(self, model: Any) -> None:
        """Create task-owned modules (e.g. a classification head sized from ``model``)."""

    def configure_losses(self) -> None:
        """Create loss modules."""

    def configure_metrics(self) -> None:
        """Create metric state."""

    def samples(self, split: str) -> Sequence[dict[str, Any]]:  # pragma: no cover - abstract
        """The samples of ``split`` (one of ``SPLITS``), as plain dicts."""
        raise NotImplementedError

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:  # pragma: no cover
        """Turn samples into one batch (tensors stacked, text kept as lists)."""
        raise NotImplementedError

    def training_step(self, model: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:  # pragma: no cover
        """Losses for one batch; the dict holds ``loss`` and may hold named parts."""
        raise NotImplementedError

    def predict_step(self, model: Any, batch: dict[str, Any]) -> list[dict[str, Any]]:  # pragma: no cover
        """One prediction dict per sample, with what ``compute_metrics`` needs."""
        raise NotImplementedError

    def compute_metrics(self, predictions: list[dict[str, Any]]) -> dict[str, float]:  # pragma: no cover
        """Scalar metrics over all predictions of a split."""
        raise NotImplementedError

    def blind_predictions(self, split: str = "test", fit_split: str = "train") -> list[dict[str, Any]] | None:
        """Optional: predictions on ``split`` of a baseline that never sees the volume, fitted on
        ``fit_split`` (in ``predict_step``'s form, so ``compute_metrics`` scores them).

        Reported beside the model (the demo's results.md), it shows how much of a score comes from
        the image rather than from what the training answers share. ``None``: no such baseline.
        """
        return None


def check_infer_prompts(task_class: type, task: str, given: Sequence[str]) -> None:
    """Raise when ``task_class.infer`` cannot take the prompts ``given`` ("text", "points", "box").

    Declared by the task (``infer_prompts``, ``infer_needs``), so a prompt the task would ignore
    or a missing one is refused with the option's name before any model is loaded.
    """
    from medvlsam2.core.errors import InputError

    if getattr(task_class, "infer", None) is None:
        raise InputError(f"--task: task '{task}' cannot predict single volumes")
    takes = getattr(task_class, "infer_prompts", None)
    if takes is not None:
        for prompt in given:
            if prompt not in takes:
                reads = ", ".join(f"--{p}" for p in sorted(takes)) or "no prompt"
                raise InputError(f"--{prompt}: task '{task}' takes no {prompt} (it reads {reads})")
    for group in getattr(task_class, "infer_needs", ()):
        if not any(p in given for p in group):
            raise InputError(f"--task: task '{task}' needs {' or '.join(f'--{p}' for p in group)}")
