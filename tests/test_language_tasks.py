"""Report generation, VQA, alignment and grounding: real readers, tiny trunk, two steps, scores."""

from __future__ import annotations

import csv
import json
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medvlsam2.core.config import load_config
from medvlsam2.core.errors import ConfigError
from medvlsam2.core.run import evaluate, fit
from medvlsam2.plugins.tasks.grounding import box_to_text, mask_box, parse_box_text

SIDES = ["left", "right"]


def write_cases(root: Path, n: int = 6) -> list[dict]:
    """Brain-like blobs: a label map with two named structures and a report about a 'lesion'."""
    rng = np.random.default_rng(0)
    cases = []
    for i in range(n):
        image = rng.normal(0, 0.1, size=(32, 32, 8)).astype(np.float32)
        label = np.zeros(image.shape, dtype=np.int16)
        side = SIDES[i % 2]
        x = slice(4, 14) if side == "left" else slice(18, 28)
        label[x, 8:24, 2:6] = 1
        label[8:24, 26:31, 1:7] = 2
        image[label == 1] += 1.0
        image[label == 2] += 0.5
        name = f"case{i}"
        nib.save(nib.Nifti1Image(image, np.eye(4)), root / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), root / f"{name}_seg.nii.gz")
        (root / f"{name}.txt").write_text(f"A bright lesion in the {side} hemisphere.")
        split = "train" if i < 4 else "test"
        cases.append({"name": name, "side": side, "split": split})
    datalist = {
        "labels": {"0": "background", "1": "lesion", "2": "ventricle"},
        "modality": {"0": "MRI"},
        "training": [{"image": f"{c['name']}.nii.gz", "label": f"{c['name']}_seg.nii.gz"} for c in cases if c["split"] == "train"],
        "test": [{"image": f"{c['name']}.nii.gz", "label": f"{c['name']}_seg.nii.gz"} for c in cases if c["split"] == "test"],
    }
    (root / "dataset.json").write_text(json.dumps(datalist))
    cap = {s: [{"image": f"{c['name']}.nii.gz", "text": f"{c['name']}.txt"} for c in cases if c["split"] == s] for s in ("train", "test")}
    (root / "M3D_Cap.json").write_text(json.dumps(cap))
    columns = ["Image Path", "Question Type", "Question", "Choice A", "Choice B", "Choice C", "Choice D", "Answer Choice", "Answer"]
    for split, file in (("train", "M3D_VQA_train.csv"), ("test", "M3D_VQA_test.csv")):
        with (root / file).open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            for c in cases:
                if c["split"] == split:
                    letter = "A" if c["side"] == "left" else "B"
                    writer.writerow([f"{c['name']}.nii.gz", "5", "Which side is the lesion on?", "left", "right", "both", "none", letter, c["side"]])
    return cases


MODEL = """
model:
  encoder: {name: vit3d, img_size: [8, 32, 32], patch_size: [4, 8, 8], hidden_size: 32, mlp_dim: 64, num_layers: 1, num_heads: 2}
  projector: {name: mlp}
  llm: {name: hf_causal, model_type: llama, lora_r: 4, lora_alpha: 8, model_config: {hidden_size: 64, intermediate_size: 128, num_hidden_layers: 1, num_attention_heads: 4, num_key_value_heads: 2}}
  decoder: null
"""


def task_yaml(root: Path, fmt: str, name: str, extra: str = "") -> str:
    pre = "{preset: mri, spatial_size: [8, 32, 32]}"
    splits = "{train: train, validation: null, test: test}" if fmt != "nifti_json" else "{train: training, validation: null, test: test}"
    return f"  - {{name: {name}, data: {{format: {fmt}, root: {root}, splits: {splits}, preprocess: {pre}}}{extra}}}\n"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lang")
    write_cases(root)
    return root


def run_config(tmp_path: Path, tasks: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(
        MODEL
        + "tasks:\n"
        + tasks
        + textwrap.dedent(
            f"""
            trainer: {{max_steps: 2, batch_size: 2, enable_progress_bar: false, accelerator: cpu}}
            output_dir: {tmp_path / 'runs'}
            """
        )
    )
    return path


def test_every_language_task_trains_two_steps_and_scores(tmp_path, data_root):
    tasks = (
        task_yaml(data_root, "m3d_cap", "report_generation", ", generation: {max_new_tokens: 8}, text_metrics: [bleu, rouge, meteor, bertscore]")
        + task_yaml(data_root, "m3d_vqa", "vqa", ", generation: {max_new_tokens: 6}")
        + task_yaml(data_root, "m3d_cap", "alignment", ", text_tower: minilm")
        + task_yaml(data_root, "nifti_json", "grounding", ", generation: {max_new_tokens: 12}")
    )
    cfg = load_config([run_config(tmp_path, tasks)])
    folder = fit(cfg)
    metrics = evaluate(cfg, folder / "checkpoints" / "last.ckpt", split="test")
    expected = [
        "report_generation/bleu1", "report_generation/bleu4", "report_generation/rouge1", "report_generation/rougeL",
        "report_generation/meteor", "report_generation/bertscore_f1",
        "vqa/closed_accuracy", "vqa/closed_accuracy/location", "vqa/open_rougeL",
        "alignment/v2t_r@1", "alignment/t2v_r@1", "alignment/caption_loss",
        "grounding/rec_iou", "grounding/rec_acc@0.5", "grounding/reg_rougeL",
    ]
    for key in expected:
        assert f"test/{key}" in metrics, key
        assert 0.0 <= metrics[f"test/{key}"] or key.endswith("loss")
    assert metrics["test/vqa/num_cases"] == 4  # 2 test rows, closed + open
    assert metrics["test/grounding/num_cases"] == 8  # 2 volumes x 2 structures x (rec, reg)
    assert metrics["test/alignment/v2t_r@1"] in (0.0, 0.5, 1.0)


def test_alignment_trains_its_heads_and_the_projector(tmp_path, data_root):
    import torch

    from medvlsam2.core.engine import MedVLModule
    from medvlsam2.core.run import stages_of

    cfg = load_config([run_config(tmp_path, task_yaml(data_root, "m3d_cap", "alignment", ", text_tower: llm"))])
    module = MedVLModule(cfg, stages_of(cfg)[0])
    assert module.trainable_components == ["projector", "heads"]
    task = module.tasks["alignment"]
    batch = task.collate(task.samples("train")[:2])
    losses = task.training_step(module.model, batch)
    assert {"contrastive_loss", "caption_loss"} <= set(losses)
    losses["loss"].backward()
    assert task.vision_proj.weight.grad.abs().sum() > 0
    assert task.logit_scale.grad is not None
    projector_grads = [p.grad for p in module.model.trunk.projector.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in projector_grads)
    base = [p for n, p in module.model.trunk.llm.named_parameters() if "lora_" not in n and not p.requires_grad]
    assert base and all(p.grad is None for p in base)
    assert torch.isfinite(losses["loss"])


def test_box_text_round_trip_and_mask_box():
    mask = np.zeros((10, 20, 20), dtype=bool)
    mask[2:5, 0:10, 10:20] = True
    box = mask_box(mask)
    np.testing.assert_allclose(box, [0.2, 0.0, 0.5, 0.5, 0.5, 1.0])
    assert box_to_text(box) == "[0.20, 0.00, 0.50, 0.50, 0.50, 1.00]"
    np.testing.assert_allclose(parse_box_text("It is at " + box_to_text(box) + "."), box)
    assert parse_box_text("no box here") is None
    assert parse_box_text("[0.9, 0, 0, 0.1, 1, 1]") is None


def test_bad_task_options_name_the_path(tmp_path, data_root):
    bad = task_yaml(data_root, "m3d_vqa", "vqa", ", mode: closedd")
    with pytest.raises(ConfigError, match=r"tasks\[0\].mode: 'closedd' is not one of closed, open, both"):
        load_config([run_config(tmp_path, bad)])
    bad = task_yaml(data_root, "m3d_cap", "report_generation", ", text_metrics: [bleu, rogue]")
    with pytest.raises(ConfigError, match=r"tasks\[0\].text_metrics: unknown metric 'rogue' \(did you mean 'rouge'\?\)"):
        load_config([run_config(tmp_path, bad)])
    bad = task_yaml(data_root, "m3d_cap", "report_generation").replace("format: m3d_cap", "format: m3d_capp")
    with pytest.raises(ConfigError, match=r"tasks\[0\].data.format: .*did you mean 'm3d_cap'"):
        load_config([run_config(tmp_path, bad)])
    bad = task_yaml(data_root, "m3d_cap", "report_generation").replace("root:", "rot:")
    with pytest.raises(ConfigError, match=r"unknown key 'tasks\[0\].data.rot' \(did you mean 'root'\?\)"):
        load_config([run_config(tmp_path, bad)])
    for gen, message in (
        ("{repetition_penalty: 0}", r"tasks\[0\].generation.repetition_penalty: expected a number above 0, got 0"),
        ("{no_repeat_ngram_size: -1}", r"tasks\[0\].generation.no_repeat_ngram_size: expected 0 or more, got -1"),
        ("{num_beams: 0}", r"tasks\[0\].generation.num_beams: expected at least 1, got 0"),
        ("{max_new_tokens: 0}", r"tasks\[0\].generation.max_new_tokens: expected at least 1, got 0"),
    ):
        bad = task_yaml(data_root, "m3d_cap", "report_generation", f", generation: {gen}")
        with pytest.raises(ConfigError, match=message):
            load_config([run_config(tmp_path, bad)])


def test_grounding_packs_several_structures_into_one_training_answer_and_evaluates_one(data_root):
    import random
    import re

    from medvlsam2.core.registry import build

    splits = {"train": "training", "validation": None, "test": "test"}
    data = {"format": "nifti_json", "root": str(data_root), "splits": splits, "preprocess": {"preset": "mri", "spatial_size": [8, 32, 32]}}
    task = build("tasks", "grounding", {"data": data, "mode": "rec", "max_targets": 2})
    samples = task.samples("train")
    task.eval()
    single = task.collate(samples)
    truth = {s["description"]: a for s, a in zip(single["samples"], single["answers"])}  # own box per structure
    task.train()
    random.seed(0)
    packed = [a for _ in range(10) for a in task.collate(samples)["answers"]]
    many = [a for a in packed if a.count("[") == 2]
    assert many and len(many) < len(packed)  # 1 or 2 structures per answer
    for answer in many:
        parts = re.findall(r"(the \w+) (\[[^\]]+\])", answer)
        assert {d for d, _ in parts} == {"the lesion", "the ventricle"}
        assert all(parse_box_text(b) is not None for _, b in parts)
    # the ventricle is at the same place in every volume: its packed box is its single box
    assert {b for a in many for d, b in re.findall(r"(the \w+) (\[[^\]]+\])", a) if d == "the ventricle"} == {truth["the ventricle"]}
    assert all("Where are the" in p or "Give the bounding boxes of the" in p for p in task.collate(samples)["prompts"] if " and " in p)
    task.eval()
    assert task.collate(samples)["answers"] == single["answers"]  # evaluation: one box per prompt
    with pytest.raises(ConfigError, match="max_targets: expected at least 1"):
        build("tasks", "grounding", {"data": data, "max_targets": 0})


def test_closed_vqa_by_likelihood_scores_each_choice_as_training_does(tmp_path, data_root):
    import torch

    from medvlsam2.core.engine import MedVLModule
    from medvlsam2.core.run import stages_of

    vqa = task_yaml(data_root, "m3d_vqa", "vqa", ", closed_decoding: likelihood, generation: {max_new_tokens: 4}")
    cfg = load_config([run_config(tmp_path, vqa)])
    module = MedVLModule(cfg, stages_of(cfg)[0]).eval()
    task, trunk = module.tasks["vqa"], module.model.trunk
    samples = task.samples("test")
    assert [s["kind"] for s in samples] == ["closed", "open", "closed", "open"]
    batch = task.collate(samples)

    # a candidate's score is minus the training loss summed over its tokens (+ EOS)
    closed = batch["samples"][0]
    prompt = batch["prompts"][0]
    options = [f"{c}. {closed['choices'][c]}" for c in "ABCD"]
    scores = trunk.score_answers(batch["volume"][:1], [prompt], [options])[0]
    for option, score in zip(options, scores):
        text = trunk.tokenize([prompt], [option])
        with torch.no_grad():
            loss = trunk(batch["volume"][:1], text.input_ids, text.attention_mask, text.labels).loss
        n_tokens = int((text.labels != -100).sum())
        assert score == pytest.approx(-float(loss) * n_tokens, rel=1e-3, abs=1e-3)
    assert len(set(round(s, 4) for s in scores)) > 1  # the choices are told apart

    rows = task.predict_step(module.model, batch)
    for row in rows:
        if row["kind"] == "closed":
            logps = row["choice_logprobs"]
            best = max(logps, key=logps.get)
            assert row["prediction"] == f"{best}. {row['choices'][best]}"
        else:
            assert "choice_logprobs" not in row and isinstance(row["prediction"], str)
    assert rows[0]["choice_logprobs"] == pytest.approx(dict(zip("ABCD", scores)), rel=1e-4)
    metrics = task.compute_metrics(rows)
    assert metrics["closed_accuracy"] in (0.0, 0.5, 1.0)

    from medvlsam2.core.errors import InputError

    with pytest.raises(InputError, match="3 volume"):
        trunk.score_answers(batch["volume"][:3], [prompt], [options])

    bad = task_yaml(data_root, "m3d_vqa", "vqa", ", closed_decoding: likely")
    with pytest.raises(ConfigError, match=r"tasks\[0\].closed_decoding: 'likely' is not one of generate, likelihood"):
        load_config([run_config(tmp_path, bad)])


def test_shuffled_choices_move_the_answer_letter_with_its_text_in_training_only(tmp_path, data_root):
    import random
    import re

    from medvlsam2.core.engine import MedVLModule
    from medvlsam2.core.run import stages_of

    vqa = task_yaml(data_root, "m3d_vqa", "vqa", ", shuffle_choices: true")
    cfg = load_config([run_config(tmp_path, vqa)])
    task = MedVLModule(cfg, stages_of(cfg)[0]).tasks["vqa"]
    sample = next(s for s in task.samples("train") if s["kind"] == "closed")
    task.eval()
    assert task.prompt_and_answer(sample)[1] == sample["closed_answer"]
    task.train()
    random.seed(0)
    letters = set()
    for _ in range(40):
        prompt, answer = task.prompt_and_answer(sample)
        listed = dict(re.findall(r"([A-D])\. (.*?)(?= [A-D]\. |$)", prompt.split("Choices: ")[1].split(" Answer with")[0]))
        assert sorted(listed.values()) == sorted(sample["choices"].values())
        letter, text = answer.split(". ", 1)
        assert listed[letter] == text == sample["answer"]
        letters.add(letter)
    assert letters == {"A", "B", "C", "D"}
