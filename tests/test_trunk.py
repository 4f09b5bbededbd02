"""The trunk: every encoder x a tiny LLM, splicing, [SEG] coupling, generation, config swaps."""

from __future__ import annotations

import warnings

import pytest
import torch

from medvlsam2.core.config import read_yaml
from medvlsam2.core.errors import InputError
from medvlsam2.core.projectors import (
    MLPConfig,
    MLPProjector,
    PerceiverConfig,
    PerceiverProjector,
    SpatialPoolMLPConfig,
    SpatialPoolMLPProjector,
)
from medvlsam2.core.splice import IGNORE_INDEX, splice_visual_embeds
from medvlsam2.core.trunk import Trunk

ENCODERS = {
    "vit3d": ({"img_size": [8, 32, 32], "patch_size": [4, 8, 8], "hidden_size": 32, "mlp_dim": 64,
               "num_layers": 1, "num_heads": 2}, (2, 1, 8, 32, 32)),
    "timm_slices": ({"model_name": "resnet10t"}, (2, 1, 2, 32, 32)),
    "sam2_hiera": ({"image_size": 64}, (1, 1, 2, 32, 32)),
    "medsam_tinyvit": ({}, (1, 1, 1, 24, 24)),
    "deepbet_unet3d": ({"out_stage": 2}, (1, 1, 32, 32, 32)),
}
#: Pretrained backbones frozen as in stage training (2 CPU cores): the trunk must still train around them.
FROZEN = {"medsam_tinyvit": "tinyvit", "sam2_hiera": "image_encoder"}
TINY_LLAMA = {
    "name": "hf_causal", "model_type": "llama", "lora_r": 4, "lora_alpha": 8,
    "model_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2},
}
PROMPT_DIM = 16


def model_cfg(encoder: str, projector: dict | None = None, llm: dict | None = None) -> dict:
    return {
        "encoder": {"name": encoder, **ENCODERS[encoder][0]},
        "projector": projector or {"name": "spatial_pool_mlp", "pool_grid": [2, 2, 2]},
        "llm": llm or TINY_LLAMA,
        "seg_projector": {"hidden_dim": 32},
    }


def build_trunk(cfg: dict) -> Trunk:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Trunk(cfg, prompt_dim=PROMPT_DIM)


@pytest.fixture(scope="module")
def vit_trunk() -> Trunk:
    return build_trunk(model_cfg("vit3d"))


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
def test_every_encoder_trains_through_the_trunk(encoder):
    trunk = build_trunk(model_cfg(encoder))
    if encoder in FROZEN:
        getattr(trunk.encoder, FROZEN[encoder]).requires_grad_(False)
        trunk.train()
    shape = ENCODERS[encoder][1]
    prompts = ["Segment the liver.", "Where is the lesion?"][: shape[0]]
    answers = ["It is [SEG].", "Here [SEG] and [SEG]."][: shape[0]]
    batch = trunk.tokenize(prompts, answers)
    out = trunk(torch.rand(shape), batch.input_ids, batch.attention_mask, batch.labels)
    assert out.seg_embeds.shape == (shape[0], shape[0], PROMPT_DIM)
    assert out.seg_mask.sum().item() == sum(a.count("[SEG]") for a in answers)
    (out.loss + out.seg_embeds[out.seg_mask].square().mean()).backward()

    named = dict(trunk.named_parameters())

    def has_grad(name: str) -> bool:
        g = named[name].grad
        return g is not None and bool(g.abs().sum() > 0)

    lora_b = [n for n in named if "lora_B" in n]
    assert lora_b and all(has_grad(n) for n in lora_b)
    assert all(has_grad(n) for n in named if n.startswith("projector."))
    assert all(has_grad(n) for n in named if n.startswith("seg_projector."))
    delta = next(n for n in named if "trainable_tokens_delta" in n)
    seg_row = trunk.llm.new_token_ids.index(trunk.llm.seg_token_id)
    assert named[delta].grad[seg_row].abs().sum() > 0
    frozen = [n for n, p in named.items() if not p.requires_grad]
    assert any("base_layer" in n for n in frozen) and any("embed_tokens" in n for n in frozen)
    assert all(named[n].grad is None for n in frozen)
    assert any(has_grad(n) for n in named if n.startswith("encoder.") and named[n].requires_grad)


def test_trainable_count_matches_peft(vit_trunk):
    llm_trainable = sum(p.numel() for p in vit_trunk.llm.parameters() if p.requires_grad)
    assert llm_trainable == vit_trunk.llm.model.get_nb_trainable_parameters()[0]
    total = sum(p.numel() for p in vit_trunk.parameters() if p.requires_grad)
    others = sum(p.numel() for m in (vit_trunk.encoder, vit_trunk.projector, vit_trunk.seg_projector)
                 for p in m.parameters() if p.requires_grad)
    assert total == llm_trainable + others


def test_splice_two_prompts_of_different_lengths():
    img, pad, h, m = 99, 0, 4, 3
    input_ids = torch.tensor([[5, img, 6, 7, 8, 9], [5, img, 6, 7, pad, pad]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9],
                           [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 7, IGNORE_INDEX, IGNORE_INDEX]])
    text = torch.arange(2 * 6 * h, dtype=torch.float).reshape(2, 6, h)
    visual = -torch.arange(1, 2 * m * h + 1, dtype=torch.float).reshape(2, m, h)
    out = splice_visual_embeds(input_ids, attention, text, visual, img, labels=labels, pad_id=pad)
    assert out.inputs_embeds.shape == (2, 8, h)
    assert out.visual_mask.tolist() == [[False, True, True, True, False, False, False, False]] * 2
    assert out.attention_mask.tolist() == [[1] * 8, [1] * 6 + [0, 0]]
    assert out.labels.tolist() == [[-100, -100, -100, -100, -100, 7, 8, 9], [-100] * 5 + [7, -100, -100]]
    assert out.token_ids.tolist() == [[5, img, img, img, 6, 7, 8, 9], [5, img, img, img, 6, 7, pad, pad]]
    assert torch.equal(out.inputs_embeds[0, 1:4], visual[0]) and torch.equal(out.inputs_embeds[1, 1:4], visual[1])
    assert torch.equal(out.inputs_embeds[1, 4:6], text[1, 2:4]) and not out.inputs_embeds[1, 6:].any()
    left = splice_visual_embeds(input_ids, attention, text, visual, img, labels=labels, pad_id=pad,
                                padding_side="left")
    assert left.attention_mask.tolist()[1] == [0, 0] + [1] * 6
    assert left.visual_mask.tolist()[1] == [False, False, False, True, True, True, False, False]
    with pytest.raises(InputError, match="no visual embeddings"):
        splice_visual_embeds(input_ids, attention, text, None, img)


def test_tokenize_labels_cover_only_the_answer(vit_trunk):
    batch = vit_trunk.tokenize(["Short?", "A much longer question about the scan?"], ["Yes.", "No [SEG]."])
    tok = vit_trunk.tokenizer
    for i, answer in enumerate(["Yes.", "No [SEG]."]):
        kept = batch.labels[i][batch.labels[i] != IGNORE_INDEX].tolist()
        assert kept == tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
        assert (batch.input_ids[i] == vit_trunk.llm.image_token_id).sum() == 1
    assert batch.attention_mask[0].sum() < batch.attention_mask[1].sum()


def test_projectors_token_counts():
    tokens, grid = torch.randn(2, 4 * 6 * 6, 8), (4, 6, 6)
    assert MLPProjector(MLPConfig(), 8, 16)(tokens, grid).shape == (2, 144, 16)
    pool = SpatialPoolMLPProjector(SpatialPoolMLPConfig(pool_grid=[2, 3, 3]), 8, 16)
    assert pool(tokens, grid).shape == (2, 18, 16)
    perceiver = PerceiverProjector(PerceiverConfig(num_queries=5, num_heads=4, max_grid=[8, 8, 8]), 8, 16)
    assert perceiver(tokens, grid).shape == (2, 5, 16)
    assert perceiver(torch.randn(2, 2 * 3 * 3, 8), (2, 3, 3)).shape == (2, 5, 16)
    with pytest.raises(InputError, match="max_grid"):
        perceiver(torch.randn(1, 9 * 1 * 1, 8), (9, 1, 1))
    with pytest.raises(InputError, match="does not match"):
        pool(tokens, (4, 6, 5))


def test_generate_greedy_beam_sampling_and_forced_seg(vit_trunk):
    volume = torch.rand(2, 1, 8, 32, 32)
    prompts = ["Describe the scan.", "Segment the liver."]
    greedy = vit_trunk.generate(volume, prompts, max_new_tokens=4)
    assert greedy.text == vit_trunk.generate(volume, prompts, max_new_tokens=4).text
    assert len(greedy.text) == 2 and greedy.token_ids.shape[1] <= 4
    beam = vit_trunk.generate(volume, prompts, max_new_tokens=4, num_beams=3)
    sampled = vit_trunk.generate(volume, prompts, max_new_tokens=4, do_sample=True, temperature=0.9, top_k=20)
    assert len(beam.text) == len(sampled.text) == 2
    forced = vit_trunk.generate(volume, prompts, max_new_tokens=2, force_seg=True)
    assert forced.seg_mask.all() and forced.seg_embeds.shape == (2, 1, PROMPT_DIM)
    # the forced [SEG] state equals the teacher-forced state of the same text
    batch = vit_trunk.tokenize(prompts, answer_prefix="[SEG]")
    with torch.no_grad():
        out = vit_trunk(volume, batch.input_ids, batch.attention_mask)
    assert torch.allclose(out.seg_embeds[:, :1], forced.seg_embeds, atol=1e-5)


def test_generate_stops_at_eos(vit_trunk):
    head = vit_trunk.llm.model.get_output_embeddings()
    eos = vit_trunk.tokenizer.eos_token_id

    def push_eos(module, args, output):
        output[..., eos] += 1e4
        return output

    handle = head.register_forward_hook(push_eos)
    try:
        out = vit_trunk.generate(torch.rand(2, 1, 8, 32, 32), ["a", "b"], max_new_tokens=6)
    finally:
        handle.remove()
    assert out.text == ["", ""] and out.token_ids.shape == (2, 0) and out.seg_mask.shape == (2, 0)


def test_generate_repetition_penalty_and_no_repeat_ngrams_act_on_the_answer(vit_trunk):
    head = vit_trunk.llm.model.get_output_embeddings()
    eos = vit_trunk.tokenizer.eos_token_id
    a, b = [t for t in range(10, 20) if t not in (eos, vit_trunk.tokenizer.pad_token_id)][:2]

    def prefer(module, args, output):  # greedy writes a forever; b is its second choice
        output[..., a] += 20.0
        output[..., b] += 10.0
        return output

    handle = head.register_forward_hook(prefer)
    volume = torch.rand(1, 1, 8, 32, 32)
    try:
        plain = vit_trunk.generate(volume, ["Describe the scan."], max_new_tokens=4).token_ids[0].tolist()
        penalised = vit_trunk.generate(volume, ["Describe the scan."], max_new_tokens=4, repetition_penalty=10.0)
        unique = vit_trunk.generate(volume, ["Describe the scan."], max_new_tokens=4, no_repeat_ngram_size=1)
    finally:
        handle.remove()
    assert plain == [a] * 4
    # a's logit (about 20) over 10 falls below b's (about 10): the second token is b
    assert penalised.token_ids[0].tolist()[:2] == [a, b]
    ids = unique.token_ids[0].tolist()
    assert ids[:2] == [a, b] and len(set(ids)) == len(ids) == 4


def test_generate_conditions_on_the_volume_with_smollm2():
    cfg = model_cfg("vit3d", projector={"name": "mlp"}, llm={"name": "hf_causal", "lora_r": 8})
    trunk = build_trunk(cfg)
    assert trunk.llm.hidden_size == 576
    prompts = ["Describe this scan in one sentence."]
    out = trunk.generate(torch.rand(1, 1, 8, 32, 32), prompts, max_new_tokens=8)
    assert out.text[0].strip()
    batch = trunk.tokenize(prompts)
    with torch.no_grad():
        a = trunk(torch.rand(1, 1, 8, 32, 32), batch.input_ids, batch.attention_mask).logits[0, -1]
        b = trunk(torch.zeros(1, 1, 8, 32, 32), batch.input_ids, batch.attention_mask).logits[0, -1]
    assert (a - b).abs().max() > 1e-3  # the next-token distribution depends on the volume


BASE_YAML = """\
model:
  encoder: {name: vit3d, img_size: [8, 32, 32], patch_size: [4, 8, 8], hidden_size: 32, mlp_dim: 64, num_layers: 1, num_heads: 2}
  projector: {name: perceiver, num_queries: 4, num_heads: 4, max_grid: [16, 8, 8]}
  llm: {name: hf_causal, model_type: llama, lora_r: 4, model_config: {hidden_size: 64, intermediate_size: 128, num_hidden_layers: 1, num_attention_heads: 4, num_key_value_heads: 2}}
"""


@pytest.mark.parametrize(
    "line, part, expected",
    [
        ("  encoder: {name: timm_slices, model_name: resnet10t}", "encoder", "TimmSliceEncoder"),
        ("  encoder: {name: deepbet_unet3d, out_stage: 1}", "encoder", "DeepbetUNet3DEncoder"),
        ("  llm: {name: hf_causal, model_type: gpt2, lora_r: 4, model_config: {n_embd: 64, n_layer: 1, n_head: 4}}",
         "llm", "gpt2"),
        ("  llm: {name: hf_causal, lora_r: 4}", "llm", "llama"),  # SmolLM2, the real default
    ],
)
def test_one_line_swaps_encoder_or_llm(tmp_path, line, part, expected):
    lines = BASE_YAML.splitlines()
    key = line.split(":")[0]
    edited = [line if old.startswith(key + ":") else old for old in lines]
    assert sum(a != b for a, b in zip(lines, edited)) == 1
    path = tmp_path / "run.yaml"
    path.write_text("\n".join(edited) + "\n")
    trunk = build_trunk(read_yaml(path)["model"])
    if part == "encoder":
        assert type(trunk.encoder).__name__ == expected
        volume = torch.rand(1, 1, 16, 32, 32)
    else:
        assert trunk.llm.model.get_base_model().config.model_type == expected
        volume = torch.rand(1, 1, 8, 32, 32)
    batch = trunk.tokenize(["Find it."], ["[SEG]"])
    out = trunk(volume, batch.input_ids, batch.attention_mask, batch.labels)
    assert torch.isfinite(out.loss) and out.seg_embeds.shape == (1, 1, PROMPT_DIM)
    assert out.spliced.visual_mask.sum() == 4  # the perceiver's fixed token count, whatever the encoder


def test_unfit_volume_is_a_clear_error(vit_trunk):
    batch = vit_trunk.tokenize(["x"])
    with pytest.raises(InputError, match="ViT3DEncoder: volume size not accepted: H=30"):
        vit_trunk(torch.rand(1, 1, 8, 30, 32), batch.input_ids, batch.attention_mask)
