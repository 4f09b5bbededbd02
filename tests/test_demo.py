"""The demo's own machinery (data, stages, write-up) with tiny models swapped in by config."""

from __future__ import annotations

import json

from medvlsam2.core.demo import QUALITY_TARGETS, run_demo

TINY_MODELS = """
vars: {size: [8, 32, 32]}
model:
  encoder: {name: vit3d, img_size: [8, 32, 32], patch_size: [4, 8, 8], hidden_size: 32, mlp_dim: 64, num_layers: 1, num_heads: 2}
  projector: {name: spatial_pool_mlp, pool_grid: [2, 2, 2]}
  llm: {name: hf_causal, model_type: llama, lora_r: 4, lora_alpha: 8,
        model_config: {hidden_size: 64, intermediate_size: 128, num_hidden_layers: 1, num_attention_heads: 4, num_key_value_heads: 2}}
  decoder: {name: sam2_volume, image_encoder: hiera, pretrained: false, image_size: 64, num_maskmem: 2,
            memory_attention_layers: 1, prompt_dim: 64, embedding_pool: 1,
            tinyvit_input_size: 256}
trainer: {precision: 32-true}
"""


def test_demo_writes_results_samples_pictures_and_a_model(tmp_path):
    override = tmp_path / "tiny_models.yaml"
    override.write_text(TINY_MODELS)
    results = run_demo(tmp_path / "demo", quick=True, configs=[override], overrides=["stages.4.max_steps=3"])
    out = results.parent
    data = json.loads((out / "results.json").read_text())
    assert [t["metric"] for t in data["targets"]] == [key for _, key, _ in QUALITY_TARGETS]
    assert all(isinstance(t["met"], bool) for t in data["targets"])
    tasks = {key.split("/")[1] for key in data["metrics"]}
    assert {"report_generation", "vqa", "grounding", "semantic_seg", "semantic_seg_2", "referring_seg", "interactive_seg", "alignment"} <= tasks
    blind = data["no_image_baselines"]
    for key in ("test/report_generation/rougeL", "test/vqa/closed_accuracy", "test/grounding/rec_acc@0.5", "test/semantic_seg/mean_dice"):
        assert 0.0 <= blind[key] <= 1.0, key
    for t in data["targets"]:  # segmentation from a user's box or a description has no such baseline
        assert t["no_image_baseline"] is None if "interactive" in t["metric"] or "referring" in t["metric"] else 0 <= t["no_image_baseline"] <= 1
    text = results.read_text()
    assert "## Quality targets" in text and "| semantic_seg | dice/brain_stem |" in text
    # where the time went, and how fast the machine was while it went (shared cores vary)
    stages = data["stage_seconds"]
    assert list(stages) == ["data and setup", "align", "text", "ground", "decoder", "joint", "test", "export and pictures"]
    assert all(v >= 0 for v in stages.values()) and sum(stages.values()) <= data["wall_seconds"] + 1
    assert all(data["matmul_gflops"][when][dt] > 0 for when in ("before", "after") for dt in ("fp32", "bf16"))
    assert "Minutes by stage: data and setup " in text and "Machine speed (1024² matmul" in text
    by_task = data["test_seconds_by_task"]  # the test trainer gets the demo's clock too
    assert tasks <= set(by_task) and 0 < sum(by_task.values()) <= stages["test"] + 1, by_task
    assert "Test minutes by task: " in text
    # what a rerun must match to repeat the numbers: the CPU's kernels and the stack's versions
    env = data["environment"]
    assert env["cpu_kernels"] and env["libraries"]["torch"] and env["libraries"]["transformers"]
    assert env["medvlsam2"].startswith("0.") and f"transformers {env['libraries']['transformers']}" in text
    assert "| what | value | target | met | no-image baseline |" in text and "The no-image baseline never looks" in text
    assert "## Report, case" in (out / "samples.md").read_text()
    for name in ("semantic_seg.png", "referring_seg.png", "interactive_seg.png", "dice_vs_clicks.png", "training_curves.png"):
        assert (out / "pictures" / name).stat().st_size > 1000, name
    assert (out / "model" / "trainables.safetensors").is_file()
    assert (out / "data" / "demo.json").is_file()


def test_quick_demo_runs_end_to_end_with_the_real_models(tmp_path):
    """`medvlsam2 demo --quick` as a user runs it: SmolLM2 + LoRA, LiteMedSAM's TinyViT in SAM2."""
    results = run_demo(tmp_path / "quick", quick=True)
    data = json.loads((results.parent / "results.json").read_text())
    assert data["quick"] is True and len(data["targets"]) == len(QUALITY_TARGETS)
    # LiteMedSAM's pretrained heads segment a large structure from a box before any real training.
    assert data["metrics"]["test/interactive_seg/dice_box"] > 0.3
    assert (results.parent / "model" / "adapter_model.safetensors").is_file()
