"""fit -> export -> load -> predict, on a tiny language model (no unpickling anywhere)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_language_tasks import run_config, task_yaml, write_cases

from medvlsam2.core.checkpoint import FROZEN_CHECKSUMS, load_checkpoint
from medvlsam2.core.config import load_config
from medvlsam2.core.errors import InputError
from medvlsam2.core.export import export, load_module
from medvlsam2.core.run import fit, load_weights


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    data = root / "data"
    data.mkdir()
    write_cases(data)
    cfg = load_config([run_config(root, task_yaml(data, "m3d_vqa", "vqa", ", mode: open, generation: {max_new_tokens: 5}"))])
    folder = fit(cfg)
    out = export(folder / "checkpoints" / "last.ckpt", root / "export")
    return cfg, folder, out, data


def test_export_folder_contents(trained):
    cfg, folder, out, _ = trained
    for name in ("config.yaml", "adapter_model.safetensors", "adapter_config.json", "trainables.safetensors", "metadata.json", "README.md"):
        assert (out / name).is_file(), name
    trainables = load_file(str(out / "trainables.safetensors"))
    assert any(k.startswith("model.trunk.projector.") for k in trainables)
    assert not any("lora_" in k or k.startswith("model.trunk.encoder.") for k in trainables)
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert any("lora_A" in k for k in adapter) and any("trainable_tokens" in k for k in adapter)
    # the resized embedding and output layers are rebuilt from the config, not saved whole
    assert not any("base_layer" in k or "embed_tokens.weight" in k for k in adapter)
    # and the run's checkpoint leaves the frozen LLM out the same way, with its digests
    saved = load_checkpoint(folder / "checkpoints" / "last.ckpt")
    frozen = saved[FROZEN_CHECKSUMS]
    assert any("embed_tokens" in k for k in frozen) and not frozen.keys() & saved["state_dict"].keys()
    assert not any(k.startswith("model.trunk.llm.") and "lora_" not in k and "trainable_tokens" not in k for k in saved["state_dict"])
    card = (out / "README.md").read_text()
    assert "`vit3d`" in card and "`hf_causal`" in card and "vqa" in card
    assert json.loads((out / "metadata.json").read_text())["tasks"]["vqa"]["preprocess"]["spatial_size"] == [8, 32, 32]


def test_export_reloads_the_trained_weights(trained):
    cfg, folder, out, _ = trained
    from medvlsam2.core.export import _build_module

    reference = _build_module(cfg)
    load_weights(reference, folder / "checkpoints" / "last.ckpt")
    loaded, _, _ = load_module(out)
    a, b = reference.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_tampered_frozen_weight_or_other_config_is_refused(trained, tmp_path):
    cfg, folder, out, _ = trained
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    meta = json.loads((copy / "metadata.json").read_text())
    key = next(iter(meta["frozen_checksums"]))
    meta["frozen_checksums"][key] = "0" * 40
    (copy / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="frozen weight"):
        load_module(copy)
    shutil.copytree(out, tmp_path / "other")
    state = load_file(str(out / "trainables.safetensors"))
    name = next(k for k in state if k.startswith("model.trunk.projector."))
    state[name] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / "other" / "trainables.safetensors"))
    with pytest.raises(InputError, match="different model config: .*projector"):
        load_module(tmp_path / "other")


@pytest.mark.parametrize("source", ["export", "ckpt"])
def test_predict_command_writes_an_answer(trained, tmp_path, source):
    cfg, folder, out, data = trained
    model = out if source == "export" else folder / "checkpoints" / "last.ckpt"
    result = subprocess.run(
        [
            sys.executable, "-m", "medvlsam2", "predict", "--model", str(model), "--volume", str(data / "case4.nii.gz"),
            "--task", "vqa", "--text", "Which side is the lesion on?", "--out", str(tmp_path / "pred"),
        ],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    answer = json.loads((tmp_path / "pred" / "answer.json").read_text())
    assert answer["task"] == "vqa" and isinstance(answer["text"], str)


def test_predict_errors_name_the_problem(trained, tmp_path):
    cfg, folder, out, data = trained
    base = [sys.executable, "-m", "medvlsam2", "predict", "--model", str(out), "--out", str(tmp_path / "p")]
    cases = [
        (["--volume", str(data / "case4.nii.gz"), "--task", "vq"], "--task: the model has no task 'vq' (did you mean 'vqa'?)"),
        (["--volume", str(data / "missing.nii.gz"), "--task", "vqa"], "--volume: file not found"),
        (["--volume", str(data / "case4.nii.gz"), "--task", "vqa", "--text", " "], "--text: empty prompt"),
        (["--volume", str(data / "case4.nii.gz"), "--task", "vqa", "--points", "1,2,3,7"], "label must be 1"),
        (["--volume", str(data / "case4.nii.gz"), "--task", "vqa", "--box", "5,5,5,1,1,1"], "minimum corner"),
    ]
    for args, message in cases:
        result = subprocess.run(base + args, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, (args, result.stderr[-1500:])
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, result.stderr[-1500:])


def test_prompts_a_task_ignores_or_lacks_are_refused_before_the_model_loads(trained, tmp_path, monkeypatch):
    from medvlsam2.core import export as export_module
    from medvlsam2.core.predict import Request, predict

    cfg, folder, out, data = trained

    def no_loading(*_args, **_kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(export_module, "load_module", no_loading)
    volume = data / "case4.nii.gz"
    with pytest.raises(InputError, match=r"^--points: task 'vqa' takes no points \(it reads --text\)$"):
        predict(out, volume, Request(task="vqa", text="Which side?", points="1,2,3,1"), tmp_path / "p")
    with pytest.raises(InputError, match=r"^--task: task 'vqa' needs --text$"):
        predict(out, volume, Request(task="vqa"), tmp_path / "p")
    with pytest.raises(AssertionError, match="the model was loaded"):  # a good request gets that far
        predict(out, volume, Request(task="vqa", text="Which side?"), tmp_path / "p")


def test_every_builtin_task_that_predicts_declares_its_prompts():
    from medvlsam2.core.registry import get_host
    from medvlsam2.core.task import check_infer_prompts

    host = get_host()
    declared = {}
    for name in host.names("tasks"):
        cls = host.get("tasks", name).load()
        if getattr(cls, "infer", None) is not None and cls.__module__.startswith("medvlsam2."):
            assert cls.infer_prompts is not None and cls.infer_prompts <= {"text", "points", "box"}, name
            declared[name] = cls
    assert {"report_generation", "vqa", "semantic_seg", "referring_seg", "interactive_seg"} <= set(declared)
    check_infer_prompts(declared["interactive_seg"], "interactive_seg", ["box"])
    check_infer_prompts(declared["semantic_seg"], "semantic_seg", [])
    check_infer_prompts(declared["report_generation"], "report_generation", ["text"])
    for name, given, message in [
        ("interactive_seg", ["text"], "--task: task 'interactive_seg' needs --points or --box"),
        ("referring_seg", ["box"], "--task: task 'referring_seg' needs --text"),
        ("report_generation", ["box"], "--box: task 'report_generation' takes no box (it reads --text)"),
        ("grounding", [], "--task: task 'grounding' needs --text"),
        ("alignment", ["text"], "--task: task 'alignment' cannot predict single volumes"),
    ]:
        with pytest.raises(InputError) as err:
            check_infer_prompts(host.get("tasks", name).load(), name, given)
        assert str(err.value) == message


def test_predict_over_a_folder_keeps_going_after_a_bad_case(trained, tmp_path):
    cfg, folder, out, data = trained
    import shutil

    cases = tmp_path / "cases"
    cases.mkdir()
    shutil.copy(data / "case4.nii.gz", cases / "a.nii.gz")
    (cases / "b.nii.gz").write_bytes(b"not a nifti file")
    shutil.copy(data / "case5.nii.gz", cases / "c.nii.gz")
    result = subprocess.run(
        [sys.executable, "-m", "medvlsam2", "predict", "--model", str(out), "--volume", str(cases), "--task", "vqa",
         "--text", "Which side?", "--out", str(tmp_path / "many")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    assert "b.nii.gz failed" in result.stderr
    assert (tmp_path / "many" / "a" / "answer.json").is_file() and (tmp_path / "many" / "c" / "answer.json").is_file()
    assert "2 of 3 volumes done" in result.stdout


def test_predict_datalist_keeps_same_named_cases_apart_and_checks_questions_and_out(trained, tmp_path):
    cfg, folder, out, data = trained
    import shutil

    for patient in ("p1", "p2"):
        (tmp_path / patient).mkdir()
        shutil.copy(data / "case4.nii.gz", tmp_path / patient / "t1.nii.gz")
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"test": [{"image": "p1/t1.nii.gz"}, {"image": "p2/t1.nii.gz"}]}))
    base = [sys.executable, "-m", "medvlsam2", "predict", "--model", str(out), "--task", "vqa"]
    result = subprocess.run(base + ["--volume", str(datalist), "--text", "Which side?", "--out", str(tmp_path / "many")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-1500:]
    answers = [json.loads((tmp_path / "many" / name / "answer.json").read_text()) for name in ("p1_t1", "p2_t1")]
    assert [a["volume"] for a in answers] == [str(tmp_path / "p1" / "t1.nii.gz"), str(tmp_path / "p2" / "t1.nii.gz")]
    for args, message in [
        (["--volume", str(data / "case4.nii.gz"), "--out", str(tmp_path / "q")], "--task: task 'vqa' needs --text"),
        (["--volume", str(data / "case4.nii.gz"), "--text", "Which side?", "--out", str(datalist)],
         f"--out: {datalist} is a file"),
    ]:
        result = subprocess.run(base + args, capture_output=True, text=True, timeout=300)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr[-1500:]


def test_datalist_mistakes_name_the_file_and_entry(tmp_path):
    from medvlsam2.core.predict import case_folders, volumes_of

    cases = [("{\"test\": [", "not a valid JSON datalist"), ('{"test": [{"label": "x.nii.gz"}]}', "entry 0 has no 'image' path"),
             ('{"test": []}', "lists no volume"), ('{"name": "no list"}', "lists no volume")]
    for n, (text, message) in enumerate(cases):
        path = tmp_path / f"list{n}.json"
        path.write_text(text)
        with pytest.raises(InputError, match=rf"--volume: {path}: {message}|--volume: {path} {message}"):
            volumes_of(path)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(InputError, match="empty.txt lists no volume"):
        volumes_of(tmp_path / "empty.txt")
    paths = [tmp_path / p for p in ("a/t1.nii.gz", "b/t1.nii.gz", "x/c.nrrd", "x/c.nii", "a/t1.nii.gz", "d.nii.gz")]
    assert case_folders(paths) == ["a_t1", "b_t1", "x_c", "x_c_2", "a_t1_2", "d"]


def test_test_command_scores_an_export_folder_like_its_checkpoint(trained):
    from medvlsam2.core.run import evaluate

    cfg, folder, out, _ = trained
    from_export = evaluate(cfg, out, split="test")
    from_ckpt = evaluate(cfg, folder / "checkpoints" / "last.ckpt", split="test")
    assert from_export["test/vqa/num_cases"] == from_ckpt["test/vqa/num_cases"] > 0
    assert from_export == from_ckpt


def test_overlays_keep_the_voxels_physical_proportions_and_folders_list_every_volume_format(tmp_path):
    import nibabel as nib
    import numpy as np
    from PIL import Image

    from medvlsam2.core.predict import volumes_of, write_overlays

    data = np.random.default_rng(0).random((20, 20, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([0.7, 0.7, 5.0, 1.0])), str(tmp_path / "aniso.nii.gz"))
    labels = np.zeros(data.shape, np.uint8)
    labels[5:15, 5:15, 2:4] = 1
    files = write_overlays(tmp_path / "aniso.nii.gz", labels, tmp_path)
    sizes = {Path(f).name[8]: Image.open(f).size for f in files}  # overlay_<axis><index>.png -> (width, height)
    # i and j views: 20 voxels of 0.7 mm across, 6 of 5 mm up (30 mm up against 14 mm across)
    assert sizes["i"][1] > sizes["i"][0] and sizes["j"][1] > sizes["j"][0]
    assert abs(sizes["k"][0] - sizes["k"][1]) < 0.1 * sizes["k"][0]  # 0.7 x 0.7 mm: square
    np.save(tmp_path / "a.npy", data)
    assert [p.name for p in volumes_of(tmp_path)] == ["a.npy", "aniso.nii.gz"]


def test_an_empty_mask_is_noted_whatever_its_score():
    import numpy as np

    from medvlsam2.core.predict import describe_objects, mark_empty

    label_map = np.zeros((4, 4, 4), np.uint8)
    label_map[0, 0, :2] = 1
    objects = describe_objects(label_map, np.eye(4), ["thalamus", "lesion"], [0.4, 0.9], 2)
    assert mark_empty(objects, 0.5) == ["lesion"]
    assert objects[1] == {"label": 2, "name": "lesion", "score": 0.9, "voxels": 0, "volume_ml": 0.0,
                          "note": "empty mask: no voxel reached the threshold 0.5"}
    assert "note" not in objects[0] and objects[0]["voxels"] == 2


def test_grounding_infer_fills_its_trained_prompt_with_the_description(tmp_path):
    from medvlsam2.core.registry import build

    task = build("tasks", "grounding", {"data": {"format": "nifti_json", "root": str(tmp_path)}})
    seen = []
    task.generate = lambda model, volume, prompts: seen.extend(prompts) or ["[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]"]
    result = task.infer(None, torch.zeros(1, 1, 4, 8, 8), text=" the left thalamus ")
    assert seen == ["Where is the left thalamus? Answer with a 3D box."]
    assert result["text"] == "[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]"
    with pytest.raises(InputError, match="grounding: name what to find as text"):
        task.infer(None, torch.zeros(1, 1, 4, 8, 8))
