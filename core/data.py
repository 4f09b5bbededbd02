"""The task mix: every task's samples in one dataset, batches drawn task by task by weight.

A batch always comes from one task (each task has its own collate). Which task a step draws
is random with probability proportional to the task's ``weight``, so the expected loss is the
weighted sum of the task losses. The draw for epoch ``e`` depends only on ``(seed, e)``: a run
resumed at an epoch boundary sees exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from medvlsam2.core.errors import InputError
from medvlsam2.core.task import BaseTask

log = logging.getLogger(__name__)


class TaskMixDataset(Dataset):
    """Items are ``(task_key, sample)``; a global index maps to one task's sample."""

    def __init__(self, samples: Mapping[str, Sequence[dict[str, Any]]]) -> None:
        self.keys = list(samples)
        self.samples = {key: list(samples[key]) for key in self.keys}
        self.offsets: dict[str, int] = {}
        total = 0
        for key in self.keys:
            self.offsets[key] = total
            total += len(self.samples[key])
        self.total = total

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, index: int) -> tuple[str, dict[str, Any]]:
        for key in reversed(self.keys):
            if index >= self.offsets[key] and self.samples[key]:
                return key, self.samples[key][index - self.offsets[key]]
        raise IndexError(index)


class WeightedTaskBatchSampler(Sampler[list[int]]):
    """Yields ``num_batches`` single-task batches of global indices, tasks drawn by weight.

    Each task's samples are visited in a shuffled order that is renewed when exhausted. Under
    distributed training each rank draws its own stream (``rank`` enters the seed).
    """

    def __init__(
        self,
        dataset: TaskMixDataset,
        weights: Mapping[str, float],
        batch_size: int,
        num_batches: int,
        *,
        seed: int = 0,
        rank: int = 0,
        shuffle: bool = True,
    ) -> None:
        self.dataset, self.batch_size, self.num_batches = dataset, batch_size, num_batches
        self.keys = [k for k in dataset.keys if dataset.samples[k] and weights.get(k, 0) > 0]
        if not self.keys:
            raise InputError("no task in this stage has training samples")
        self.probs = torch.tensor([float(weights[k]) for k in self.keys])
        self.probs = self.probs / self.probs.sum()
        self.seed, self.rank, self.shuffle, self.epoch = seed, rank, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 9_973 + self.rank)
        orders: dict[str, list[int]] = {k: [] for k in self.keys}

        def take(key: str) -> int:
            if not orders[key]:
                n = len(self.dataset.samples[key])
                perm = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
                orders[key] = perm
            return self.dataset.offsets[key] + orders[key].pop()

        for _ in range(self.num_batches):
            key = self.keys[int(torch.multinomial(self.probs, 1, generator=g))]
            yield [take(key) for _ in range(self.batch_size)]


class TaskCollate:
    """Dispatches a single-task list of ``(key, sample)`` to that task's ``collate``.

    For a task with ``skip_bad`` (``data.skip_bad: true``) every sample is checked first
    (``task.check_sample``); an unreadable one is logged with the running count of skips and
    left out. A batch with no usable sample comes out as ``{"task": key, "skipped": n}``, which
    the engine passes over. Counts are per process (each data-loader worker counts its own).

    ``padding=True`` marks every batch as filler: a rank with no evaluation case of its own
    still runs one batch (Lightning needs one per rank), and its predictions are dropped.
    """

    def __init__(self, tasks: Mapping[str, BaseTask], padding: bool = False) -> None:
        self.tasks, self.padding = tasks, padding
        self.skipped: dict[str, int] = {}

    def _usable(self, key: str, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        task = self.tasks[key]
        if not getattr(task, "skip_bad", False):
            return samples
        usable = []
        for sample in samples:
            try:
                task.check_sample(sample)  # type: ignore[attr-defined]
            except InputError as err:
                self.skipped[key] = self.skipped.get(key, 0) + 1
                log.warning("%s: skipping bad sample (%d skipped so far): %s", key, self.skipped[key], err)
                continue
            usable.append(sample)
        return usable

    def __call__(self, items: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
        key = items[0][0]
        samples = self._usable(key, [sample for _, sample in items])
        if not samples:
            return {"task": key, "skipped": len(items)}
        batch = self.tasks[key].collate(samples)
        batch["task"] = key
        batch["padding"] = self.padding
        return batch


class MedVLDataModule(L.LightningDataModule):
    """Builds every task's splits and combines the training splits by weight."""

    def __init__(
        self,
        tasks: Mapping[str, BaseTask],
        weights: Mapping[str, float],
        *,
        batch_size: int = 1,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        steps_per_epoch: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.tasks, self.weights = dict(tasks), dict(weights)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.eval_batch_size = eval_batch_size or batch_size
        self.steps_per_epoch, self.seed = steps_per_epoch, seed
        self._splits: dict[str, TaskMixDataset] = {}

    def split(self, name: str) -> TaskMixDataset:
        if name not in self._splits:
            self._splits[name] = TaskMixDataset({k: t.samples(name) for k, t in self.tasks.items()})
        return self._splits[name]

    def train_dataloader(self) -> DataLoader:
        data = self.split("train")
        steps = self.steps_per_epoch or max(
            1, sum(math.ceil(len(data.samples[k]) / self.batch_size) for k in data.keys)
        )
        rank = self.trainer.global_rank if self.trainer is not None else 0
        sampler = WeightedTaskBatchSampler(data, self.weights, self.batch_size, steps, seed=self.seed, rank=rank)
        return self._loader(data, sampler)

    def _eval_loaders(self, split: str) -> list[DataLoader]:
        data = self.split(split)
        loaders = []
        for key in data.keys:
            n = len(data.samples[key])
            if n == 0:
                continue
            start = data.offsets[key]
            size = self.eval_batch_size
            batches = [list(range(start + i, start + min(i + size, n))) for i in range(0, n, size)]
            padding = False
            if self.trainer is not None and self.trainer.world_size > 1:  # each rank scores its share
                batches = batches[self.trainer.global_rank :: self.trainer.world_size]
                if not batches:
                    batches, padding = [[start]], True
            loaders.append(self._loader(data, batches, padding=padding))
        return loaders

    def _loader(self, data: TaskMixDataset, batch_sampler: Any, padding: bool = False) -> DataLoader:
        return DataLoader(
            data,
            batch_sampler=batch_sampler,
            collate_fn=TaskCollate(self.tasks, padding),
            num_workers=self.num_workers,
            persistent_workers=False,
        )

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("validation")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")
