"""``nifti_json``: a MONAI / Medical Segmentation Decathlon ``dataset.json`` datalist.

``{"labels": {"0": "background", "1": "edema"}, "training": [{"image": "./imagesTr/a.nii.gz",
"label": "./labelsTr/a.nii.gz"}], "test": ["./imagesTs/b.nii.gz"]}``. Paths are relative to the
folder that holds the datalist (as MONAI's ``load_decathlon_datalist``) and must stay under the
data root. Volumes (NIfTI or NRRD) load through MONAI ``LoadImage`` in ``load_volume``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from medvlsam2.core.errors import InputError
from medvlsam2.plugins.tasks.data.base import DatasetReader, ReaderConfig, Sample, entry, read_json

if TYPE_CHECKING:
    from medvlsam2.plugins.tasks.data.transforms import PreprocessConfig


@dataclass
class NiftiJsonConfig(ReaderConfig):
    datalist: str = "dataset.json"
    split: str = "training"
    require_label: bool = False


def parse_label_names(raw: Any, where: str) -> dict[int, str]:
    """MSD ``labels`` (``{"1": "edema"}`` or a list of names) -> ``{1: "edema"}``; background dropped."""
    if raw is None:
        return {}
    items = enumerate(raw) if isinstance(raw, list) else raw.items() if isinstance(raw, dict) else None
    if items is None:
        raise InputError(f"{where}: 'labels' must map label values to names, got {type(raw).__name__}")
    names: dict[int, str] = {}
    for key, name in items:
        try:
            value = int(str(key).strip())
        except ValueError as err:
            raise InputError(f"{where}: labels key {key!r} is not an integer label value") from err
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"{where}: labels[{key!r}] must be a non-empty name, got {name!r}")
        if value != 0:
            names[value] = name.strip()
    return names


class NiftiJsonReader(DatasetReader):
    """MSD / MONAI datalist of NIfTI or NRRD volumes with optional label maps and label names."""

    config_class = NiftiJsonConfig
    format_name = "nifti_json"
    cfg: NiftiJsonConfig
    modality: dict[str, str] = {}

    def read_samples(self) -> Iterator[Sample]:
        path = self.index_file(self.cfg.datalist, what="datalist")
        data = read_json(path)
        if not isinstance(data, dict):
            raise InputError(f"{path.name}: expected a JSON object with a '{self.cfg.split}' list")
        labels = parse_label_names(data.get("labels"), path.name)
        if self.cfg.split not in data:
            splits = [k for k, v in data.items() if isinstance(v, list)]
            raise InputError(
                f"{path.name}: split '{self.cfg.split}' missing (lists found: {', '.join(splits) or 'none'})"
            )
        items = data[self.cfg.split]
        if not isinstance(items, list):
            raise InputError(f"{path.name}: '{self.cfg.split}' must be a list, got {type(items).__name__}")
        modality = data.get("modality") if isinstance(data.get("modality"), dict) else {}
        self.modality = {str(k): str(v) for k, v in modality.items()}
        for i, item in enumerate(items):
            where = f"{path.name} {self.cfg.split}[{i}]"
            sample = self.row(
                where,
                lambda item=item, where=where, i=i: self._sample(item, where, i, path, labels, modality),
            )
            if sample is not None:
                yield sample

    def preprocess_config(self) -> PreprocessConfig:
        """CT preset when the datalist's ``modality`` says CT (or says nothing), MRI otherwise."""
        if "preset" not in (self.cfg.preprocess or {}) and self.modality:
            if not any("CT" in m.upper() for m in self.modality.values()):
                from medvlsam2.plugins.tasks.data.transforms import get_preset

                return get_preset("mri", **dict(self.cfg.preprocess or {}))
        return super().preprocess_config()

    def _sample(
        self, item: Any, where: str, index: int, path: Any, labels: dict[int, str], modality: dict[str, Any]
    ) -> Sample:
        base = path.parent
        image_value = item if isinstance(item, str) else entry(item, "image", where)
        image = self.path(image_value, where=where, column="image", base=base)
        label = None
        label_value = item.get("label") if isinstance(item, dict) else None
        if label_value is not None:
            label = self.path(label_value, where=where, column="label", base=base)
        elif self.cfg.require_label:
            raise InputError(f"{where}: key 'label' missing")
        name = image.rsplit("/", 1)[-1]
        for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
        return {
            "id": name or f"{self.cfg.split}_{index}",
            "format": self.format_name,
            "image": image,
            "label": label,
            "labels": dict(labels),
            "modality": {str(k): str(v) for k, v in modality.items()},
            "source": where,
        }
