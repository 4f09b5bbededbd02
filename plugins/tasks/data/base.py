"""The ``DatasetReader`` template shared by every data format, and safe path handling.

A reader parses a dataset's index file (JSON / CSV) once, resolves every path under the data
root, loads the small text parts, and holds a list of plain-dict samples. Volumes are loaded
lazily with ``load_volume(sample)`` so a reader of 100k cases starts in seconds.

Dataset files are untrusted input: a path that leaves the data root (``..`` or an absolute path
elsewhere) is refused unless ``allow_outside_root: true``; every problem is an ``InputError``
naming the file and the row, and ``skip_bad: true`` turns bad rows into logged skips.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from medvlsam2.core.errors import InputError

if TYPE_CHECKING:
    from monai.data import MetaTensor

    from medvlsam2.plugins.tasks.data.transforms import PreprocessConfig

log = logging.getLogger(__name__)

Sample = dict[str, Any]


@dataclass
class ReaderConfig:
    """Options every reader takes (``tasks[i].data`` in YAML, besides ``format``)."""

    root: str = "???"
    split: str = "train"
    allow_outside_root: bool = False
    skip_bad: bool = False
    check_files: bool = True
    max_samples: int | None = None
    preprocess: dict[str, Any] = field(default_factory=dict)


def resolve_under(
    root: Path, value: Any, *, where: str, base: Path | None = None, allow_outside_root: bool = False
) -> Path:
    """``value`` from a dataset file as an absolute path that stays under ``root``.

    Relative paths are joined to ``base`` (default ``root``). The check is lexical (``..`` is
    collapsed first), so a symlink the user placed inside the root is still followed.
    """
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: expected a file path, got {value!r}")
    text = value.strip()
    if "\x00" in text:
        raise InputError(f"{where}: file path contains a NUL byte")
    path = Path(text)
    candidate = Path(os.path.normpath(path if path.is_absolute() else (base or root) / path))
    if not allow_outside_root:
        root_norm = Path(os.path.normpath(root))
        if candidate != root_norm and root_norm not in candidate.parents:
            raise InputError(
                f"{where}: path '{text}' points outside the data root {root_norm}; "
                "set data.allow_outside_root: true to allow it"
            )
    return candidate


class DatasetReader(Sequence[Sample]):
    """Template for a data format: subclasses implement ``read_samples``.

    The reader is a sequence of sample dicts (usable directly as a map-style dataset). Every
    sample has ``id``, ``format``, ``image`` (absolute path) and ``source`` (file and row, for
    error messages); the rest depends on the format.
    """

    config_class: ClassVar[type] = ReaderConfig
    format_name: ClassVar[str] = ""
    default_preset: ClassVar[str] = "ct"

    def __init__(self, cfg: ReaderConfig) -> None:
        self.cfg = cfg
        if not isinstance(cfg.root, str) or cfg.root in ("", "???"):
            raise InputError(f"{self.format_name}: data.root is required (the dataset folder)")
        self.root = Path(cfg.root).expanduser().resolve()
        if not self.root.is_dir():
            raise InputError(f"{self.format_name}: data root {self.root} is not a folder")
        self.skipped: list[str] = []
        samples: list[Sample] = []
        for sample in self.read_samples():
            samples.append(sample)
            if cfg.max_samples is not None and len(samples) >= cfg.max_samples:
                break
        if self.skipped:
            log.warning("%s: skipped %d bad row(s) under %s", self.format_name, len(self.skipped), self.root)
        self.samples = samples

    # -- the template method -----------------------------------------------------------------
    def read_samples(self) -> Iterator[Sample]:
        """Yield the samples of ``cfg.split``; use ``self.row`` around each row."""
        raise NotImplementedError

    # -- helpers for subclasses -------------------------------------------------------------
    def row(self, where: str, build: Callable[[], Sample | None]) -> Sample | None:
        """Build one sample; a bad row raises, or is skipped and logged with ``skip_bad``."""
        try:
            return build()
        except InputError as err:
            if not self.cfg.skip_bad:
                raise
            self.skipped.append(str(err))
            log.warning("skipping bad row: %s", err)
            return None

    def path(
        self, value: Any, *, where: str, column: str, base: Path | None = None, must_exist: bool = True
    ) -> str:
        resolved = resolve_under(
            self.root,
            value,
            where=f"{where}: {column}",
            base=base,
            allow_outside_root=self.cfg.allow_outside_root,
        )
        if must_exist and self.cfg.check_files and not resolved.is_file():
            raise InputError(f"{where}: {column} file not found: {resolved}")
        return str(resolved)

    def index_file(self, name: str, *, what: str) -> Path:
        """A dataset index file (JSON / CSV) under the root; must exist."""
        path = resolve_under(
            self.root,
            name,
            where=f"{self.format_name}: {what}",
            allow_outside_root=self.cfg.allow_outside_root,
        )
        if not path.is_file():
            raise InputError(f"{self.format_name}: {what} not found: {path}")
        return path

    def preprocess_config(self) -> PreprocessConfig:
        """The preprocessing preset for this data: ``preprocess: {preset: ct, ...overrides}``."""
        from medvlsam2.plugins.tasks.data.transforms import get_preset

        options = dict(self.cfg.preprocess or {})
        return get_preset(options.pop("preset", self.default_preset), **options)

    # -- Sequence ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        return self.samples[index]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.cfg.split!r}, samples={len(self)})"
        )


# -- index files ------------------------------------------------------------------------------
def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text") from err
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from err
    except OSError as err:
        raise InputError(f"{path}: cannot read: {err}") from err


def read_csv(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """``(row number, row)`` pairs; row 1 is the first line after the header.

    A missing column is an error at the header; a short row reports its own row number.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text") from err
    except OSError as err:
        raise InputError(f"{path}: cannot read: {err}") from err
    if "\x00" in text:
        raise InputError(f"{path}: contains NUL bytes; not a CSV file")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise InputError(f"{path.name}: empty CSV file (no header)")
        header = [h.strip() for h in header]
        for column in required:
            if column not in header:
                raise InputError(
                    f"{path.name}: column '{column}' missing (found: {', '.join(header) or 'none'})"
                )
        for number, values in enumerate(reader, start=1):
            if not any(v.strip() for v in values):
                continue
            row = {name: (values[i] if i < len(values) else None) for i, name in enumerate(header)}
            yield number, row  # type: ignore[misc]
    except csv.Error as err:
        raise InputError(f"{path.name}: malformed CSV: {err}") from err


def check_complete(row: dict[str, Any], where: str) -> None:
    """A short row names the first column (in file order) that it lacks."""
    for column, value in row.items():
        if value is None:
            raise InputError(f"{where}: column '{column}' missing")


def cell(row: dict[str, Any], column: str, where: str, *, required: bool = True) -> str:
    """One CSV cell as stripped text; a missing or empty required cell names the row."""
    value = row.get(column)
    if value is None:
        if required:
            raise InputError(f"{where}: column '{column}' missing")
        return ""
    text = str(value).strip()
    if required and not text:
        raise InputError(f"{where}: column '{column}' is empty")
    return text


def entry(item: Any, key: str, where: str) -> Any:
    """``item[key]`` from a JSON datalist entry, or an ``InputError`` naming the entry."""
    if not isinstance(item, dict):
        raise InputError(f"{where}: expected an object with '{key}', got {type(item).__name__}")
    if key not in item:
        raise InputError(f"{where}: key '{key}' missing")
    return item[key]


# -- volumes ----------------------------------------------------------------------------------
def load_volume(sample: Sample, key: str = "image") -> MetaTensor:
    """Load ``sample[key]`` as a ``MetaTensor`` with its affine.

    * images: 3D, in the file's own index order (a leading singleton channel of ``.npy`` is dropped);
      NaN/Inf, 2D and 4D raise ``InputError``;
    * ``label`` of ``nifti_json``: the label map as stored;
    * ``label`` of ``m3d_seg``: the sparse ``mask_(C,H,W,D).npz`` as ``(C, H, W, D)`` uint8;
    * ``label`` of ``m3d_refseg``: the binary mask ``mask == Mask_ID``.
    """
    import torch
    from monai.data import MetaTensor

    from medvlsam2.plugins.tasks.data.transforms import read_volume

    where = sample.get("source", "sample")
    path = sample.get(key)
    if not isinstance(path, str):
        raise InputError(f"{where}: sample has no '{key}' file")
    if key == "image":
        return read_volume(path)
    if path.endswith(".npz"):
        shape = tuple(sample.get("mask_shape") or ())
        return MetaTensor(torch.from_numpy(read_sparse_mask(Path(path), shape)))
    volume = read_volume(path, check=False)
    if "mask_id" in sample:
        data = volume.as_tensor() if hasattr(volume, "as_tensor") else torch.as_tensor(volume)
        binary = (torch.round(data) == int(sample["mask_id"])).to(torch.uint8)
        if binary.ndim == 4 and binary.shape[0] == 1:
            binary = binary[0]
        return MetaTensor(binary, affine=volume.affine)
    return volume


def read_sparse_mask(path: Path, shape: tuple[int, ...]) -> Any:
    """M3D-Seg's ``mask_(C, H, W, D).npz``: a scipy sparse matrix ``(C, H*W*D)`` -> dense uint8."""
    import numpy as np
    from scipy import sparse

    if not path.is_file():
        raise InputError(f"{path}: mask file not found")
    try:
        matrix = sparse.load_npz(path)  # np.load(allow_pickle=False) inside
    except Exception as err:  # zip / format errors of a bad file
        raise InputError(
            f"{path}: cannot read sparse mask (truncated or corrupt?): {type(err).__name__}: {err}"
        ) from err
    size = int(np.prod(shape)) if shape else 0
    if not shape or matrix.shape[0] * matrix.shape[1] != size:
        raise InputError(
            f"{path}: sparse mask of shape {matrix.shape} does not fit the shape {shape} in its name"
        )
    return (matrix.toarray().reshape(shape) != 0).astype(np.uint8)
