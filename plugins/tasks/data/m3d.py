"""The M3D data formats (BAAI-DCAI/M3D), read as users download them.

* ``m3d_cap``: ``M3D_Cap.json`` = ``{"train": [{"image": "ct_case/000006/Axial.npy",
  "text": "ct_case/000006/text.txt"}], "validation": [...], "test": [...]}``.
* ``m3d_vqa``: ``M3D_VQA_{train,val,test}.csv`` with ``Image Path, Question Type, Question,
  Choice A..D, Answer Choice, Answer``.
* ``m3d_seg``: ``<code>/<code>.json`` (MSD-like: ``labels`` + ``train``/``test`` lists of
  ``{"image": "<code>/<case>/image.npy", "label": "<code>/<case>/mask_(C, H, W, D).npz"}``)
  plus ``term_dictionary.json`` (``{name: [descriptions]}``); paths relative to the M3D_Seg root.
* ``m3d_refseg``: case folders ``s0000/ct.nii.gz`` + ``s0000/mask.nii.gz`` and
  ``M3D_RefSeg_{train,test,all}.csv`` with ``Image, Mask, Mask_ID, Question, Answer``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medvlsam2.core.errors import InputError
from medvlsam2.plugins.tasks.data.base import (
    DatasetReader,
    ReaderConfig,
    Sample,
    cell,
    check_complete,
    entry,
    read_csv,
    read_json,
)
from medvlsam2.plugins.tasks.data.nifti_json import parse_label_names

CHOICES = ("A", "B", "C", "D")
# M3D-VQA's "Question Type" codes (M3D paper, table of VQA question types).
VQA_QUESTION_TYPES = {"1": "plane", "2": "phase", "3": "organ", "4": "abnormality", "5": "location"}


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".npy", ".npz"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _case_id(path: str, root: Path) -> str:
    """``ct_case/000006/Axial.npy`` -> ``ct_case/000006/Axial`` (unique within a dataset)."""
    try:
        rel = Path(path).relative_to(root)
    except ValueError:
        rel = Path(path)
    return str(rel.parent / _stem(str(rel)))


def _split_file(split: str, file: str | None, files: dict[str, str], fmt: str) -> str:
    if file:
        return file
    if split not in files:
        raise InputError(f"{fmt}: unknown split '{split}' (known: {', '.join(files)}); or set data.file")
    return files[split]


# -- M3D-Cap ---------------------------------------------------------------------------------
@dataclass
class M3DCapConfig(ReaderConfig):
    datalist: str = "M3D_Cap.json"


class M3DCapReader(DatasetReader):
    """M3D-Cap image-report pairs; the report text is read from its ``.txt`` file."""

    config_class = M3DCapConfig
    format_name = "m3d_cap"
    default_preset = "m3d_npy"
    cfg: M3DCapConfig

    def read_samples(self) -> Iterator[Sample]:
        path = self.index_file(self.cfg.datalist, what="datalist")
        data = read_json(path)
        if not isinstance(data, dict) or self.cfg.split not in data:
            found = ", ".join(data) if isinstance(data, dict) else type(data).__name__
            raise InputError(f"{path.name}: split '{self.cfg.split}' missing (found: {found})")
        items = data[self.cfg.split]
        if not isinstance(items, list):
            raise InputError(f"{path.name}: '{self.cfg.split}' must be a list")
        for i, item in enumerate(items):
            where = f"{path.name} {self.cfg.split}[{i}]"
            sample = self.row(where, lambda item=item, where=where: self._sample(item, where))
            if sample is not None:
                yield sample

    def _sample(self, item: Any, where: str) -> Sample:
        image = self.path(entry(item, "image", where), where=where, column="image")
        text_path = self.path(entry(item, "text", where), where=where, column="text")
        text = ""
        if self.cfg.check_files:
            try:
                text = Path(text_path).read_text(encoding="utf-8", errors="replace").strip()
            except OSError as err:
                raise InputError(f"{where}: cannot read text file {text_path}: {err}") from err
            if not text:
                raise InputError(f"{where}: text file is empty: {text_path}")
        return {
            "id": _case_id(image, self.root),
            "format": self.format_name,
            "image": image,
            "text": text,
            "text_path": text_path,
            "source": where,
        }


# -- M3D-VQA ---------------------------------------------------------------------------------
@dataclass
class M3DVQAConfig(ReaderConfig):
    file: str | None = None
    require_choices: bool = True


class M3DVQAReader(DatasetReader):
    """M3D-VQA rows: closed-ended (choices A-D, ``"C. answer"``) and open-ended answers."""

    config_class = M3DVQAConfig
    format_name = "m3d_vqa"
    default_preset = "m3d_npy"
    cfg: M3DVQAConfig
    split_files = {"train": "M3D_VQA_train.csv", "validation": "M3D_VQA_val.csv", "test": "M3D_VQA_test.csv"}

    def read_samples(self) -> Iterator[Sample]:
        name = _split_file(self.cfg.split, self.cfg.file, self.split_files, self.format_name)
        path = self.index_file(name, what="CSV file")
        required = ["Image Path", "Question Type", "Question", "Answer"]
        if self.cfg.require_choices:
            required += [f"Choice {c}" for c in CHOICES] + ["Answer Choice"]
        for number, row in read_csv(path, required):
            where = f"{path.name} row {number}"
            sample = self.row(
                where, lambda row=row, where=where, number=number: self._sample(row, where, number)
            )
            if sample is not None:
                yield sample

    def _sample(self, row: dict[str, Any], where: str, number: int) -> Sample:
        check_complete(row, where)
        image = self.path(cell(row, "Image Path", where), where=where, column="Image Path")
        question = cell(row, "Question", where)
        answer = cell(row, "Answer", where)
        qtype = cell(row, "Question Type", where)
        sample: Sample = {
            "id": f"{_case_id(image, self.root)}#{number}",
            "format": self.format_name,
            "image": image,
            "question": question,
            "question_type": VQA_QUESTION_TYPES.get(qtype.split(".")[0], qtype),
            "answer": answer,
            "source": where,
        }
        if self.cfg.require_choices:
            choices = {c: cell(row, f"Choice {c}", where) for c in CHOICES}
            letter = cell(row, "Answer Choice", where).upper().rstrip(".")
            if letter not in CHOICES:
                raise InputError(f"{where}: column 'Answer Choice' must be one of A, B, C, D, got {letter!r}")
            sample.update(
                choices=choices,
                answer_choice=letter,
                closed_question=closed_question(question, choices),
                closed_answer=f"{letter}. {answer}",
            )
        return sample


def closed_question(question: str, choices: dict[str, str]) -> str:
    """M3D-VQA's closed-ended prompt: ``"<question> Choices: A. … B. … C. … D. …"``."""
    listed = " ".join(f"{c}. {text}" for c, text in choices.items())
    return f"{question} Choices: {listed}"


# -- M3D-Seg ---------------------------------------------------------------------------------
MASK_NAME = re.compile(r"mask_\(\s*(\d+(?:\s*,\s*\d+)*)\s*,?\s*\)\.npz$")


def mask_shape_from_name(path: str, where: str) -> tuple[int, ...]:
    """``mask_(13, 512, 512, 96).npz`` -> ``(13, 512, 512, 96)``."""
    match = MASK_NAME.search(Path(path).name)
    if match is None:
        raise InputError(
            f"{where}: label '{Path(path).name}' does not encode its shape as mask_(C, H, W, D).npz"
        )
    shape = tuple(int(v) for v in match.group(1).split(","))
    if len(shape) != 4 or min(shape) < 1:
        raise InputError(
            f"{where}: label '{Path(path).name}' must encode a 4D shape (C, H, W, D), got {shape}"
        )
    return shape


@dataclass
class M3DSegConfig(ReaderConfig):
    dataset: str = "0000"
    datalist: str | None = None
    term_dictionary: str | None = "term_dictionary.json"


class M3DSegReader(DatasetReader):
    """One M3D-Seg sub-dataset: ``image.npy`` + sparse multi-class mask + label names and terms."""

    config_class = M3DSegConfig
    format_name = "m3d_seg"
    cfg: M3DSegConfig

    def read_samples(self) -> Iterator[Sample]:
        code = self.cfg.dataset
        path = self.index_file(self.cfg.datalist or f"{code}/{code}.json", what="dataset JSON")
        data = read_json(path)
        if not isinstance(data, dict):
            raise InputError(f"{path.name}: expected a JSON object with 'labels' and '{self.cfg.split}'")
        if "labels" not in data:
            raise InputError(f"{path.name}: key 'labels' missing")
        labels = parse_label_names(data["labels"], path.name)
        terms = self._terms(labels)
        if self.cfg.split not in data or not isinstance(data[self.cfg.split], list):
            raise InputError(f"{path.name}: split '{self.cfg.split}' missing or not a list")
        for i, item in enumerate(data[self.cfg.split]):
            where = f"{path.name} {self.cfg.split}[{i}]"
            sample = self.row(where, lambda item=item, where=where: self._sample(item, where, labels, terms))
            if sample is not None:
                yield sample

    def _terms(self, labels: dict[int, str]) -> dict[str, list[str]]:
        if not self.cfg.term_dictionary:
            return {}
        path = self.index_file(self.cfg.term_dictionary, what="term dictionary")
        raw = read_json(path)
        if not isinstance(raw, dict):
            raise InputError(f"{path.name}: expected an object mapping names to lists of descriptions")
        terms: dict[str, list[str]] = {}
        for name in labels.values():
            descriptions = raw.get(name, [])
            if not isinstance(descriptions, list) or not all(isinstance(d, str) for d in descriptions):
                raise InputError(f"{path.name}: '{name}' must map to a list of descriptions")
            terms[name] = list(descriptions)
        return terms

    def _sample(self, item: Any, where: str, labels: dict[int, str], terms: dict[str, list[str]]) -> Sample:
        image = self.path(entry(item, "image", where), where=where, column="image")
        label = self.path(entry(item, "label", where), where=where, column="label")
        shape = mask_shape_from_name(label, where)
        if labels and shape[0] != len(labels):
            raise InputError(
                f"{where}: mask has {shape[0]} channels but the dataset JSON names {len(labels)} labels"
            )
        return {
            "id": f"{self.cfg.dataset}/{Path(image).parent.name}",
            "format": self.format_name,
            "image": image,
            "label": label,
            "mask_shape": shape,
            "labels": dict(labels),
            "terms": {name: list(d) for name, d in terms.items()},
            "source": where,
        }


# -- M3D-RefSeg ------------------------------------------------------------------------------
@dataclass
class M3DRefSegConfig(ReaderConfig):
    file: str | None = None


class M3DRefSegReader(DatasetReader):
    """M3D-RefSeg question / answer pairs, each with its CT and the mask value ``Mask_ID``."""

    config_class = M3DRefSegConfig
    format_name = "m3d_refseg"
    cfg: M3DRefSegConfig
    split_files = {
        "train": "M3D_RefSeg_train.csv",
        # M3D-RefSeg ships train/test; a validation split a user carves out goes here.
        "validation": "M3D_RefSeg_val.csv",
        "test": "M3D_RefSeg_test.csv",
        "all": "M3D_RefSeg_all.csv",
    }

    def read_samples(self) -> Iterator[Sample]:
        name = _split_file(self.cfg.split, self.cfg.file, self.split_files, self.format_name)
        path = self.index_file(name, what="CSV file")
        for number, row in read_csv(path, ["Image", "Mask", "Mask_ID", "Question", "Answer"]):
            where = f"{path.name} row {number}"
            sample = self.row(
                where, lambda row=row, where=where, number=number: self._sample(row, where, number)
            )
            if sample is not None:
                yield sample

    def _sample(self, row: dict[str, Any], where: str, number: int) -> Sample:
        check_complete(row, where)
        image = self.path(cell(row, "Image", where), where=where, column="Image")
        mask = self.path(cell(row, "Mask", where), where=where, column="Mask")
        raw_id = cell(row, "Mask_ID", where)
        try:
            value = float(raw_id)
        except ValueError as err:
            raise InputError(f"{where}: column 'Mask_ID' must be an integer, got {raw_id!r}") from err
        if not value.is_integer() or value < 1:
            raise InputError(f"{where}: column 'Mask_ID' must be a positive integer, got {raw_id!r}")
        sample: Sample = {
            "id": f"{Path(image).parent.name}#{number}",
            "format": self.format_name,
            "image": image,
            "label": mask,
            "mask_id": int(value),
            "question": cell(row, "Question", where),
            "answer": cell(row, "Answer", where),
            "source": where,
        }
        qtype = cell(row, "Question_Type", where, required=False)
        if qtype:
            sample["question_type"] = qtype
        return sample
