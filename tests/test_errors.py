"""The bad-input catalogue of docs/errors.md: every entry through the real command line.

Each case asserts what a user sees: exit code 2 and exactly one stderr line
``medvlsam2: error: ...`` that names the file, key, prompt or row, and no traceback. The
command runs in-process (``core.cli.main`` with ``capfd``, which captures the file descriptors
like a terminal would); one case runs ``python -m medvlsam2`` to show it is the same program.
"""

from __future__ import annotations

import csv
import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_engine import write_config
from test_language_tasks import run_config, task_yaml, write_cases

from medvlsam2.core.checkpoint import atomic_torch_save
from medvlsam2.core.cli import main
from medvlsam2.core.config import load_config, to_yaml

VQA = ", mode: open, generation: {max_new_tokens: 2}"
CAP = ", text_metrics: [bleu], generation: {max_new_tokens: 2}"


def save_untrained(cfg, folder: Path) -> Path:
    """A run folder with config.yaml and a checkpoint of the freshly built model (no training)."""
    from medvlsam2.core.export import _build_module

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(to_yaml(cfg))
    ckpt = folder / "checkpoints" / "last.ckpt"
    atomic_torch_save({"state_dict": _build_module(cfg).state_dict()}, ckpt)
    return ckpt


def save_without_encoder(cfg, folder: Path) -> Path:
    """As save_untrained, for a run whose stages never train the encoder: the checkpoint leaves
    the encoder's parameters out and keeps their digests (core/checkpoint.py)."""
    from medvlsam2.core.checkpoint import FROZEN_CHECKSUMS, parameter_digests
    from medvlsam2.core.export import _build_module

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(to_yaml(cfg))
    module = _build_module(cfg)
    frozen = {n for n, _ in module.named_parameters() if n.startswith("model._encoder.")}
    state = {k: v for k, v in module.state_dict().items() if k not in frozen}
    ckpt = folder / "checkpoints" / "last.ckpt"
    atomic_torch_save({"state_dict": state, FROZEN_CHECKSUMS: parameter_digests(module, frozen)}, ckpt)
    return ckpt


def nifti(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


def bad_volumes(folder: Path, good: Path) -> None:
    import nrrd

    folder.mkdir()
    raw = good.read_bytes()
    (folder / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    (folder / "corrupt.nii.gz").write_bytes(gzip.compress(b"not a nifti header" * 30))
    rng = np.random.default_rng(0)
    nrrd.write(str(folder / "whole.nrrd"), rng.random((8, 8, 8)).astype(np.float32))
    whole = (folder / "whole.nrrd").read_bytes()
    (folder / "truncated.nrrd").write_bytes(whole[: len(whole) - 1000])
    (folder / "corrupt.nrrd").write_text("NRRD0004\ntype: flot\ndimension: 3\nsizes: 4 4 4\n\n")
    data = rng.random((8, 8, 8)).astype(np.float32)
    data[1, 2, 3], data[2, 2, 2] = np.nan, np.inf
    nifti(folder / "nan.nii.gz", data)
    nifti(folder / "flat2d.nii.gz", rng.random((16, 16)).astype(np.float32))
    nifti(folder / "series.nii.gz", rng.random((8, 8, 8, 3)).astype(np.float32))
    nifti(folder / "constant.nii.gz", np.full((8, 8, 8), 7.0, np.float32))
    nifti(folder / "large.nii.gz", rng.random((64, 64, 16)).astype(np.float32))


def bad_datasets(root: Path, data: Path) -> dict[str, Path]:
    """Copies of the language data, each with one dataset-file problem."""
    roots = {name: root / name for name in ("csv_column", "csv_file", "json_key", "json_file")}
    for path in roots.values():
        shutil.copytree(data, path)
    table = roots["csv_column"] / "M3D_VQA_test.csv"
    rows = list(csv.reader(table.open(newline="")))
    with table.open("w", newline="") as handle:
        csv.writer(handle).writerows([row[:-1] for row in rows])  # no 'Answer' column
    table = roots["csv_file"] / "M3D_VQA_test.csv"
    rows = list(csv.reader(table.open(newline="")))
    rows[2][0] = "case9.nii.gz"
    with table.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    for name, change in (("json_key", lambda item: item.pop("text")), ("json_file", lambda item: item.update(image="case9.nii.gz"))):
        index = roots[name] / "M3D_Cap.json"
        datalist = json.loads(index.read_text())
        change(datalist["test"][1])
        index.write_text(json.dumps(datalist))
    return roots


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from transformers.utils import logging as hf_logging

    # The command line sets TRANSFORMERS_VERBOSITY=error before transformers is imported; in
    # this process transformers may already be imported, so set the same level directly.
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("errors")
    data = root / "data"
    data.mkdir()
    write_cases(data)
    config = run_config(root, task_yaml(data, "m3d_vqa", "vqa", VQA))
    ckpt = save_untrained(load_config([config], ["run_name=model"]), root / "runs" / "model")
    example = root / "example"
    example.mkdir()
    example_config = write_config(example, epochs=1)
    example_ckpt = save_untrained(load_config([example_config]), example / "runs" / "run")
    frozen_ckpt = save_without_encoder(load_config([example_config]), example / "runs" / "frozen")
    bad_volumes(root / "vol", data / "case4.nii.gz")
    typo = root / "typo.yaml"
    typo.write_text(config.read_text().replace("max_steps: 2", "max_stepz: 2"))
    wrong_type = root / "wrong_type.yaml"
    wrong_type.write_text(config.read_text().replace("batch_size: 2", "batch_size: two"))
    yield {
        "root": root, "data": data, "config": config, "ckpt": ckpt, "vol": root / "vol",
        "example_config": example_config, "example_ckpt": example_ckpt, "frozen_ckpt": frozen_ckpt, "typo": typo,
        "wrong_type": wrong_type, "bad": bad_datasets(root, data),
    }
    hf_logging.set_verbosity(level)


def predict(env, volume: str, *extra: str, text: str = "Which side is the lesion on?") -> list[str]:
    where = env["vol"] / volume if not volume.startswith("case") else env["data"] / volume
    out = env["root"] / "out"
    return ["predict", "--model", str(env["ckpt"]), "--volume", str(where), "--task", "vqa", "--text", text, "--out", str(out), *extra]


def datalist(env, name: str, text: str) -> list[str]:
    """``predict`` over a datalist file ``name`` holding ``text``."""
    path = env["root"] / name
    path.write_text(text)
    return predict(env, "case4.nii.gz")[:4] + [str(path), *predict(env, "case4.nii.gz")[5:]]


def evaluate_on(env, root_name: str, fmt: str = "m3d_vqa", task: str = "vqa", extra: str = VQA) -> list[str]:
    config = run_config(env["root"] / root_name, task_yaml(env["bad"][root_name], fmt, task, extra))
    return ["test", "--config", str(config)]


CATALOGUE = {
    # volumes
    "nifti-missing": (lambda e: predict(e, "missing.nii.gz"), ["--volume: file not found", "missing.nii.gz"]),
    "nifti-truncated": (lambda e: predict(e, "truncated.nii.gz"), ["truncated.nii.gz: cannot read NIfTI file (truncated or corrupt?)"]),
    "nifti-corrupt": (lambda e: predict(e, "corrupt.nii.gz"), ["corrupt.nii.gz: cannot read NIfTI file (truncated or corrupt?)"]),
    "nrrd-missing": (lambda e: predict(e, "missing.nrrd"), ["--volume: file not found", "missing.nrrd"]),
    "nrrd-truncated": (lambda e: predict(e, "truncated.nrrd"), ["truncated.nrrd: cannot read NRRD file (truncated or corrupt?)"]),
    "nrrd-corrupt": (lambda e: predict(e, "corrupt.nrrd"), ["corrupt.nrrd: cannot read NRRD file (truncated or corrupt?)"]),
    "nan-inf": (lambda e: predict(e, "nan.nii.gz"), ["nan.nii.gz: volume contains 2 NaN/Inf voxel(s)"]),
    "2d-image": (lambda e: predict(e, "flat2d.nii.gz"), ["flat2d.nii.gz: expected a 3D volume, got a 2D image of shape (16, 16)"]),
    "4d-series": (lambda e: predict(e, "series.nii.gz"), ["series.nii.gz: expected a 3D volume, got a 4D series with 3 volumes"]),
    "constant": (lambda e: predict(e, "constant.nii.gz"), ["constant.nii.gz: volume is constant (every voxel = 7)"]),
    # prompts
    "point-outside": (lambda e: predict(e, "case4.nii.gz", "--points", "3,3,3,1;99,0,0,1"), ["--points: point 2 (99, 0, 0) lies outside the volume of shape (32, 32, 8)"]),
    "point-negative": (lambda e: predict(e, "case4.nii.gz", "--points", "-1,0,0,1"), ["--points: '-1,0,0,1': negative voxel index"]),
    "box-min-above-max": (lambda e: predict(e, "case4.nii.gz", "--box", "5,5,5,1,1,1"), ["--box: '5,5,5,1,1,1': minimum corner (5, 5, 5) is above maximum corner (1, 1, 1)"]),
    "box-outside": (lambda e: predict(e, "case4.nii.gz", "--box", "0,0,0,40,4,4"), ["--box: (0, 0, 0, 40, 4, 4) reaches outside the volume of shape (32, 32, 8)"]),
    "negative-label": (lambda e: predict(e, "case4.nii.gz", "--points", "1,2,3,-1"), ["--points: '1,2,3,-1': label must be 1 (foreground) or 0 (background), got -1"]),
    "empty-text": (lambda e: predict(e, "case4.nii.gz", text="   "), ["--text: empty prompt"]),
    "long-text": (lambda e: predict(e, "case4.nii.gz", text="x" * 2001), ["--text: prompt is 2001 characters; the limit is 2000"]),
    "vqa-no-question": (lambda e: [a for a in predict(e, "case4.nii.gz") if a not in ("--text", "Which side is the lesion on?")],
                        ["--task: task 'vqa' needs --text"]),
    "prompt-not-taken": (lambda e: predict(e, "case4.nii.gz", "--points", "1,2,3,1"),
                         ["--points: task 'vqa' takes no points (it reads --text)"]),
    "out-is-file": (lambda e: [*predict(e, "case4.nii.gz")[:-2], "--out", str(e["data"] / "case4.nii.gz")],
                    ["--out:", "case4.nii.gz is a file; give a folder for the results"]),
    "datalist-not-json": (lambda e: datalist(e, "list.json", '{"test": ['), ["--volume:", "list.json: not a valid JSON datalist"]),
    "datalist-no-image": (lambda e: datalist(e, "noimage.json", '{"test": [{"label": "x.nii.gz"}]}'),
                          ["noimage.json: entry 0 has no 'image' path"]),
    "datalist-empty": (lambda e: datalist(e, "empty.txt", "\n"), ["--volume:", "empty.txt lists no volume"]),
    # names
    "unknown-task": (lambda e: [*predict(e, "case4.nii.gz"), "--task", "vq"], ["--task: the model has no task 'vq' (did you mean 'vqa'?)"]),
    "unknown-task-plugin": (lambda e: ["config", "--config", str(e["config"]), "tasks.0.name=vqaa"], ["config: tasks[0].name: unknown task 'vqaa' (did you mean 'vqa'?)"]),
    "unknown-plugin": (lambda e: ["config", "--config", str(e["config"]), "model.encoder.name=vit_3d"], ["config: model.encoder.name: unknown encoder 'vit_3d' (did you mean 'vit3d'?)"]),
    "unknown-data-format": (lambda e: ["config", "--config", str(e["config"]), "tasks.0.data.format=m3d_vqaa"], ["config: tasks[0].data.format: unknown data_format 'm3d_vqaa' (did you mean 'm3d_vqa'?)"]),
    # configs
    "yaml-typo": (lambda e: ["config", "--config", str(e["typo"])], ["config: unknown key 'trainer.max_stepz' (did you mean 'max_steps'?)"]),
    "override-typo": (lambda e: ["config", "--config", str(e["config"]), "trainer.max_stepz=3"], ["config: unknown key 'trainer.max_stepz' (did you mean 'max_steps'?)"]),
    "yaml-wrong-type": (lambda e: ["config", "--config", str(e["wrong_type"])], ["config: trainer.batch_size: wrong type", "'two'"]),
    "override-wrong-type": (lambda e: ["config", "--config", str(e["config"]), "trainer.max_steps=many"], ["config: trainer.max_steps: wrong type", "'many'"]),
    "plugin-option-wrong-type": (lambda e: ["config", "--config", str(e["config"]), "model.encoder.hidden_size=big"], ["config: model.encoder.hidden_size: wrong type"]),
    # checkpoints
    "checkpoint-other-shapes": (
        lambda e: ["test", "--config", str(e["example_config"]), "model.encoder.widths=[4,16]", "--ckpt", str(e["example_ckpt"])],
        ["last.ckpt comes from a different model config: model._encoder.", "(8, 1, 3, 3, 3) vs (4, 1, 3, 3, 3)"],
    ),
    "checkpoint-other-depth": (
        lambda e: ["test", "--config", str(e["example_config"]), "model.encoder.widths=[8,16,32]", "--ckpt", str(e["example_ckpt"])],
        ["last.ckpt comes from a different model config:", "missing from the checkpoint"],
    ),
    "checkpoint-frozen-changed": (
        lambda e: ["test", "--config", str(e["example_config"]), "seed=4", "--ckpt", str(e["frozen_ckpt"])],
        ["checkpoint", "frozen/checkpoints/last.ckpt: 4 frozen weight(s) rebuilt from the config differ from the ones it "
         "was trained with (e.g. model._encoder.", "the pretrained source, the seed or a library version changed"],
    ),
    # evaluation limits: Lightning would score no batch and print nothing
    "validate-limit-zero": (
        lambda e: ["validate", "--config", str(e["example_config"]), "trainer.limit_val_batches=0", "--ckpt", str(e["example_ckpt"])],
        ["config: trainer.limit_val_batches: 0 leaves no batch of the validation split to score; "
         "pass trainer.limit_val_batches=null to score all of it"],
    ),
    "test-after-fit-limit-zero": (
        lambda e: ["fit", "--config", str(e["example_config"]), "trainer.limit_test_batches=0"],
        ["config: trainer.limit_test_batches: 0 leaves no batch of the test split to score; "
         "pass trainer.limit_test_batches=null", "(0 only switches off the test after fit)"],
    ),
    # dataset files
    "csv-missing-column": (lambda e: evaluate_on(e, "csv_column"), ["M3D_VQA_test.csv: column 'Answer' missing"]),
    "csv-missing-file": (lambda e: evaluate_on(e, "csv_file"), ["M3D_VQA_test.csv row 2: Image Path file not found:", "case9.nii.gz"]),
    "json-missing-key": (lambda e: evaluate_on(e, "json_key", "m3d_cap", "report_generation", CAP), ["M3D_Cap.json test[1]: key 'text' missing"]),
    "json-missing-file": (lambda e: evaluate_on(e, "json_file", "m3d_cap", "report_generation", CAP), ["M3D_Cap.json test[1]: image file not found:", "case9.nii.gz"]),
}


@pytest.mark.parametrize("case", list(CATALOGUE))
def test_catalogue_entry_is_one_clear_line(env, capfd, case):
    build, expected = CATALOGUE[case]
    code = main(build(env))
    captured = capfd.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err[-2000:]
    assert len(lines) == 1, captured.err[-2000:]
    assert lines[0].startswith("medvlsam2: error: ")
    for words in expected:
        assert words in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out


def test_the_catalogue_is_what_docs_errors_md_lists():
    docs = (Path(__file__).parents[1] / "docs" / "errors.md").read_text()
    listed = {line.split("`")[1] for line in docs.splitlines() if line.startswith("| `")}
    assert set(CATALOGUE) | {"large-volume"} <= listed


def test_same_program_under_python_dash_m(env):
    args = CATALOGUE["checkpoint-other-shapes"][0](env)
    out = subprocess.run([sys.executable, "-m", "medvlsam2", *args], capture_output=True, text=True, timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
    assert "comes from a different model config: model._encoder." in lines[0]


def test_large_volume_is_resized_with_a_note(env, capfd):
    code = main(predict(env, "large.nii.gz"))
    captured = capfd.readouterr()
    assert code == 0, captured.err[-2000:]
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medvlsam2: note: "), captured.err[-2000:]
    assert "large.nii.gz: volume (64, 64, 16) resized to the model input (8, 32, 32)" in lines[0]
    answer = json.loads((env["root"] / "out" / "answer.json").read_text())
    assert answer["volume"].endswith("large.nii.gz") and isinstance(answer["text"], str)
