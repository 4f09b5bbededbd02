"""What the built-in tasks share: a dataset reader per split, cached preprocessed volumes,
label maps on the model grid, and prompt templates.

A task's ``data`` section is a reader's options plus ``format`` (a ``data_formats`` name) and
``splits`` (engine split -> the reader's own split name; ``null`` = no samples)::

    data: {format: nifti_json, root: /data/brain, splits: {train: training, test: test},
           preprocess: {preset: mri, spatial_size: [32, 64, 64]}}
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from medvlsam2.core.config import make_plugin_config
from medvlsam2.core.errors import ConfigError, did_you_mean
from medvlsam2.core.task import SPLITS, BaseTask

DEFAULT_SPLITS = {
    "nifti_json": {"train": "training", "validation": "validation", "test": "test"},
}


@dataclass
class TaskConfig:
    """Options every built-in task takes."""

    data: dict[str, Any] = field(default_factory=dict)
    #: Prompt templates by kind, replacing the task's defaults (``{name}`` etc. are filled in).
    prompts: dict[str, list[str]] = field(default_factory=dict)
    #: Keep preprocessed volumes in memory (small datasets, repeated epochs).
    cache_volumes: bool = True


def _split_names(data: dict[str, Any]) -> dict[str, str | None]:
    names = {s: s for s in SPLITS}
    names.update(DEFAULT_SPLITS.get(data.get("format", ""), {}))
    names.update(data.get("splits") or {})
    return names


def join_names(names: Sequence[str]) -> str:
    """``["a", "b", "c"]`` -> ``"a, b and c"``."""
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def reader_args(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in ("format", "splits")}


class MedVLTask(BaseTask):
    """Base of the built-in tasks (``plugins/tasks``); see the module docstring for ``data``."""

    config_class: ClassVar[type] = TaskConfig
    #: Prompt templates per kind; ``cfg.prompts`` replaces a kind's list.
    default_prompts: ClassVar[dict[str, list[str]]] = {}

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.check_config(cfg, path=f"task '{type(self).__name__}'")
        self._readers: dict[str, Any] = {}
        self._volumes: dict[str, tuple[torch.Tensor, Any]] = {}

    @classmethod
    def check_config(cls, cfg: Any, path: str = "task") -> None:
        """Validate ``data`` and ``prompts`` without reading any file; ``path`` prefixes messages."""
        from medvlsam2.core.registry import get_host

        for kind in cfg.prompts or {}:
            if kind not in cls.default_prompts:
                raise ConfigError(
                    f"config: {path}.prompts.{kind}: unknown prompt kind{did_you_mean(kind, cls.default_prompts)}; "
                    f"kinds: {', '.join(cls.default_prompts) or 'none'}"
                )
        data = dict(cfg.data or {})
        path = f"{path}.data"
        if "format" not in data:
            raise ConfigError(f"config: {path}.format: missing; name a data format (e.g. nifti_json)")
        try:
            reader_cls = get_host().get("data_formats", data["format"]).load()
        except Exception as err:
            raise ConfigError(f"config: {path}.format: {err}") from err
        unknown = set(data.get("splits") or {}) - set(SPLITS)
        if unknown:
            raise ConfigError(f"config: {path}.splits: unknown split(s) {sorted(unknown)}; splits: {', '.join(SPLITS)}")
        make_plugin_config(reader_cls.config_class, reader_args(data), path=path)

    # -- data -----------------------------------------------------------------------------
    def reader(self, split: str) -> Any | None:
        """The dataset reader for an engine split, or None when the split is switched off."""
        from medvlsam2.core.registry import build

        if split not in self._readers:
            data = dict(self.cfg.data)
            own = _split_names(data).get(split)
            if own is None:
                self._readers[split] = None
            else:
                self._readers[split] = build("data_formats", data["format"], {**reader_args(data), "split": own})
        return self._readers[split]

    def records(self, split: str) -> Sequence[dict[str, Any]]:
        reader = self.reader(split)
        return list(reader) if reader is not None else []

    def samples(self, split: str) -> Sequence[dict[str, Any]]:
        return self.records(split)

    def preprocess_config(self) -> Any:
        reader = self.reader("train") or self.reader("test") or self.reader("validation")
        return reader.preprocess_config()

    @property
    def skip_bad(self) -> bool:
        """``data.skip_bad``: a volume that cannot be read is skipped (and counted), not fatal."""
        return bool((self.cfg.data or {}).get("skip_bad", False))

    def check_sample(self, sample: dict[str, Any]) -> None:
        """Raise ``InputError`` when ``sample``'s volume cannot be used (read into the cache)."""
        self.load_image(sample)

    def load_image(self, sample: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        """``(1, D, H, W)`` model input and the record that maps back to the file."""
        from medvlsam2.plugins.tasks.data.transforms import preprocess

        key = sample["image"]
        if key in self._volumes:
            return self._volumes[key]
        volume, record = preprocess(key, self.preprocess_config())
        if self.cfg.cache_volumes:
            self._volumes[key] = (volume, record)
        return volume, record

    @staticmethod
    def label_on_model_grid(sample: dict[str, Any], record: Any) -> np.ndarray:
        """The sample's label volume sampled (nearest) at every model voxel: ``(D, H, W)``."""
        from medvlsam2.plugins.tasks.data.base import load_volume

        label = np.asarray(load_volume(sample, "label"))
        if label.ndim == 4:  # one channel per class (M3D-Seg): class c -> value c + 1
            label = np.where(label.any(0), label.argmax(0) + 1, 0)
        d, h, w = record.model_shape
        grid = np.stack(np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 3)
        src = np.rint(record.model_to_file(grid)).astype(int)
        inside = np.all((src >= 0) & (src < np.asarray(label.shape)), axis=1)
        out = np.zeros(len(grid), dtype=np.int64)
        out[inside] = label[src[inside, 0], src[inside, 1], src[inside, 2]]
        return out.reshape(d, h, w)

    # -- prompts --------------------------------------------------------------------------
    def templates(self, kind: str) -> list[str]:
        return list((self.cfg.prompts or {}).get(kind) or self.default_prompts[kind])

    def template(self, kind: str) -> str:
        """A random template while training, the first one otherwise (reproducible scores)."""
        options = self.templates(kind)
        if self.training and len(options) > 1:
            return options[random.randrange(len(options))]
        return options[0]

    def stack_volumes(self, samples: list[dict[str, Any]]) -> tuple[torch.Tensor, list[Any]]:
        loaded = [self.load_image(s) for s in samples]
        return torch.stack([v for v, _ in loaded]), [r for _, r in loaded]
