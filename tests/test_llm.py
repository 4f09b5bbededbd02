"""The hf_causal LLM plugin: sources, special tokens, LoRA, trainable rows, templates, switches."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from medvlsam2.core.errors import ConfigError, InputError
from medvlsam2.core.llm import IMAGE_TOKEN, SEG_TOKEN
from medvlsam2.core.registry import build
from medvlsam2.plugins.llms.hf_causal import LORA_TARGETS, linear_layer_names

TINY_LLAMA = {
    "model_type": "llama",
    "model_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2},
    "lora_r": 4,
    "lora_alpha": 8,
}
TINY_GPT2 = {"model_type": "gpt2", "model_config": {"n_embd": 64, "n_layer": 2, "n_head": 4}, "lora_r": 4}


@pytest.fixture(scope="module")
def llama():
    return build("llms", "hf_causal", TINY_LLAMA)


def test_special_tokens_added_once(llama):
    tok = llama.tokenizer
    assert len(tok) == 50257 + 2  # the real GPT-2 BPE plus <image> and [SEG]
    assert tok.convert_ids_to_tokens([llama.image_token_id, llama.seg_token_id]) == [IMAGE_TOKEN, SEG_TOKEN]
    assert tok(f"a {SEG_TOKEN} b", add_special_tokens=False).input_ids.count(llama.seg_token_id) == 1
    assert llama.model.get_input_embeddings().weight.shape[0] >= len(tok)
    before = len(tok)
    llama._add_special_tokens(llama.model.get_base_model(), tok)
    assert len(tok) == before


def test_lora_targets_are_every_linear_layer(llama):
    from transformers import AutoModelForCausalLM

    base = llama.model.get_base_model()
    assert sorted(LORA_TARGETS["llama"]) == linear_layer_names(AutoModelForCausalLM.from_config(base.config))
    wrapped = {n.rsplit(".", 1)[-1] for n, m in base.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(LORA_TARGETS["llama"])


def test_base_frozen_and_count_matches_peft(llama):
    trainable = {n: p.numel() for n, p in llama.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "trainable_tokens_delta" in n for n in trainable)
    peft_trainable, peft_total = llama.model.get_nb_trainable_parameters()
    assert sum(trainable.values()) == peft_trainable
    assert llama.trainable_parameter_count() == (peft_trainable, peft_total)
    layers, h, r, inter, kv = 2, 64, 4, 128, 32
    per_layer = r * (h + h) * 2 + r * (h + kv) * 2 + r * (h + inter) * 2 + r * (inter + h)
    assert peft_trainable == layers * per_layer + 2 * h  # LoRA A/B + the two new rows


def test_new_rows_learn_old_rows_stay(llama):
    ids = torch.tensor([[11, llama.seg_token_id, 13, llama.image_token_id]])
    embed_before = llama.embed_tokens(torch.arange(50259)).detach().clone()
    params = [p for p in llama.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1.0)
    out = llama(llama.embed_tokens(ids), torch.ones_like(ids), labels=ids)
    out.loss.backward()
    opt.step()
    after = llama.embed_tokens(torch.arange(50259)).detach()
    changed = (after - embed_before).abs().sum(1).nonzero().flatten().tolist()
    assert llama.seg_token_id in changed
    assert set(changed) <= {llama.seg_token_id, llama.image_token_id}
    opt.zero_grad()


@pytest.mark.parametrize("family", [TINY_LLAMA, TINY_GPT2], ids=["llama", "gpt2"])
def test_labelled_pass_scores_the_answer_positions_as_the_full_logits_do(family):
    """With labels the loss comes from the output head at the labelled positions only; it is the
    next-token cross-entropy of the full logits, and so are its gradients."""
    llama = build("llms", "hf_causal", family)
    assert llama.head_only_loss
    ids = torch.tensor([[11, 12, llama.seg_token_id, 13, 14], [21, 22, 23, 24, 25]])
    labels = torch.tensor([[-100, -100, llama.seg_token_id, 13, 14], [-100, -100, -100, 24, -100]])
    mask = torch.ones_like(ids)
    params = [p for p in llama.parameters() if p.requires_grad]
    llama.eval()  # no LoRA dropout: both passes see the same network
    full = llama(llama.embed_tokens(ids), mask)
    want = torch.nn.functional.cross_entropy(full.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
    want_grads = torch.autograd.grad(want, params, allow_unused=True)
    out = llama(llama.embed_tokens(ids), mask, labels=labels)
    assert out.logits is None and out.hidden_states.shape[:2] == ids.shape
    torch.testing.assert_close(out.loss, want)
    for got, ref in zip(torch.autograd.grad(out.loss, params, allow_unused=True), want_grads):
        assert (got is None) == (ref is None)
        if got is not None:
            torch.testing.assert_close(got, ref)


def test_families_that_transform_their_logits_keep_the_models_own_loss():
    capped = build("llms", "hf_causal", {**TINY_LLAMA, "model_type": "gemma2",
                                         "model_config": {**TINY_LLAMA["model_config"], "head_dim": 16}})
    assert not capped.head_only_loss
    ids = torch.tensor([[5, 6, capped.seg_token_id, 7]])
    out = capped(capped.embed_tokens(ids), torch.ones_like(ids), labels=ids)
    assert out.logits is not None and out.loss is not None


def test_gpt2_family_and_plain_template():
    gpt2 = build("llms", "hf_causal", TINY_GPT2)
    assert set(gpt2.lora_target_modules) == {"c_attn", "c_proj", "c_fc"}
    assert not gpt2.uses_chat_template
    assert gpt2.format_prompt("What?").endswith("### User:\nWhat?\n### Assistant:\n")
    ids = torch.tensor([[1, 2, gpt2.seg_token_id]])
    out = gpt2(gpt2.embed_tokens(ids), torch.ones_like(ids))
    assert out.hidden_states.shape == (1, 3, 64) and out.logits.shape[-1] >= 50259


def test_switches_reach_transformers():
    llm = build("llms", "hf_causal", {**TINY_LLAMA, "attn_implementation": "eager", "gradient_checkpointing": True,
                                      "dtype": "bfloat16", "lora_target_modules": ["q_proj", "v_proj"]})
    base = llm.model.get_base_model()
    assert base.config._attn_implementation == "eager"
    assert base.is_activation_checkpointing
    assert llm.dtype == torch.bfloat16
    # frozen weights in bfloat16; what trains (LoRA, the new tokens' rows) in float32 for the optimiser
    trainable = {p.dtype for p in llm.parameters() if p.requires_grad}
    assert trainable == {torch.float32} and {p.dtype for p in llm.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {n.rsplit(".", 1)[-1] for n, m in base.named_modules() if hasattr(m, "lora_A")} == {"q_proj", "v_proj"}
    ids = torch.tensor([[5, 6, llm.seg_token_id]])
    out = llm(llm.embed_tokens(ids).float(), torch.ones_like(ids), labels=ids)
    out.loss.backward()
    assert any(p.grad is not None for n, p in llm.named_parameters() if "lora_B" in n)


def test_full_finetune_and_no_lora_modes():
    full = build("llms", "hf_causal", {**TINY_LLAMA, "lora": False, "freeze_base": False})
    assert all(p.requires_grad for p in full.parameters())
    tokens_only = build("llms", "hf_causal", {**TINY_LLAMA, "lora": False})
    trainable = [n for n, p in tokens_only.named_parameters() if p.requires_grad]
    assert trainable and all("trainable_tokens" in n for n in trainable)


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(InputError, match="not a model folder"):
        build("llms", "hf_causal", {"path": str(tmp_path)})
    with pytest.raises(ConfigError, match="model_type 'nonsense'"):
        build("llms", "hf_causal", {"model_type": "nonsense"})
    with pytest.raises(ConfigError, match="dtype"):
        build("llms", "hf_causal", {**TINY_LLAMA, "dtype": "fp8"})
    with pytest.raises(ConfigError, match="unknown key 'model.llm.lora_rank'"):
        build("llms", "hf_causal", {"lora_rank": 3}, path="model.llm")


def test_smollm2_loads_offline_from_the_package_and_is_cached():
    llm = build("llms", "hf_causal", {"lora_r": 8})  # the default: SmolLM2-135M-Instruct (GGUF)
    assert llm.hidden_size == 576 and llm.uses_chat_template
    prompt = llm.format_prompt("Hello")
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")
    start = time.perf_counter()
    again = build("llms", "hf_causal", {"lora_r": 8})
    assert time.perf_counter() - start < 20  # no second de-quantisation (that alone takes ~12 s)
    trainable, _ = again.trainable_parameter_count()
    assert trainable > 0 and all(not p.requires_grad for n, p in again.named_parameters() if "base_layer" in n)
    tok = again.tokenizer
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    new = again.generate_ids(again.embed_tokens(ids), torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(new[0])  # LoRA starts as identity: the pretrained model answers


@pytest.mark.parametrize("tied", [True, False], ids=["tied_head", "own_head"])
def test_generation_with_the_new_rows_merged_matches_the_unmerged_model_and_training_goes_on(tied, monkeypatch):
    """generate_ids writes the trained <image>/[SEG> rows into the table for the call only: the
    same scores as peft's unmerged path, the original rows back after, and (after Lightning's
    inference mode) training still runs."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    cfg = {**TINY_LLAMA, "model_config": {**TINY_LLAMA["model_config"], "tie_word_embeddings": tied}}
    torch.manual_seed(0)
    llm = build("llms", "hf_causal", cfg)
    layers = [m for m in llm.model.modules() if isinstance(m, TrainableTokensLayer)]
    assert len(layers) == (2 if tied else 1)
    with torch.no_grad():  # trained rows that differ from the originals
        for p in llm.parameters():
            if "trainable_tokens_delta" in next(n for n, q in llm.named_parameters() if q is p):
                p.add_(torch.randn_like(p) * 3)
    table = layers[0].base_layer.weight.detach().clone()
    ids = torch.tensor([[11, llm.seg_token_id, 13, llm.image_token_id, 17]])
    embeds, mask = llm.embed_tokens(ids).detach(), torch.ones_like(ids)
    kwargs = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True,
                  pad_token_id=llm.tokenizer.pad_token_id, eos_token_id=llm.eos_token_ids)
    copies = []  # peft's unmerged path copies the whole table on every forward
    per_forward = TrainableTokensLayer.get_merged_weights
    monkeypatch.setattr(TrainableTokensLayer, "get_merged_weights", lambda *a: copies.append(1) or per_forward(*a))
    with torch.inference_mode():
        unmerged = llm.model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        assert len(copies) >= (6 if tied else 3)  # each new token (the first reads the prompt's embeddings)
        copies.clear()
        merged = llm.generate_ids(embeds, mask, **kwargs)
        assert not copies
    assert torch.equal(merged.sequences, unmerged.sequences)
    for a, b in zip(merged.scores, unmerged.scores, strict=True):
        assert torch.equal(a, b)
    if tied:  # the head scores [SEG] with its trained row, not the original one
        hidden = llm(embeds, mask).hidden_states[:, -1].detach()
        assert not torch.allclose(hidden @ table[llm.seg_token_id], unmerged.scores[0][0, llm.seg_token_id])
    assert not any(layer.merged for layer in layers)
    assert torch.equal(layers[0].base_layer.weight, table)
    assert not layers[0].base_layer.weight.is_inference()
    out = llm(llm.embed_tokens(ids), mask, labels=ids)
    out.loss.backward()
    delta = next(p for n, p in llm.named_parameters() if "trainable_tokens_delta" in n)
    assert delta.grad is not None and delta.grad.abs().sum() > 0


@pytest.mark.parametrize("tied", [True, False], ids=["tied_head", "own_head"])
def test_generation_under_autocast_casts_the_frozen_weights_once_with_the_same_tokens(tied):
    """Under bf16 autocast, generate_ids runs the frozen linear layers (LoRA's base layers, the
    head) on bf16 copies made once for the call: the same tokens and scores as autocast's own
    cast on every call, the fp32 weights (and the tie) back afterwards, training unchanged; no
    copies without autocast."""
    from medvlsam2.plugins.llms.hf_causal import _new_tokens_merged

    cfg = {**TINY_LLAMA, "model_config": {**TINY_LLAMA["model_config"], "tie_word_embeddings": tied}}
    torch.manual_seed(0)
    llm = build("llms", "hf_causal", cfg).eval()  # no LoRA dropout: one forward, one answer
    with torch.no_grad():  # LoRA that is not the identity, trained rows that differ
        for p in llm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    before = {n: p for n, p in llm.named_parameters()}
    q = next(m for n, m in llm.model.named_modules() if n.endswith("q_proj.base_layer"))
    head = next(m for n, m in llm.model.named_modules() if "lm_head" in n and isinstance(m, nn.Linear))
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(m.weight.dtype)) for m in (q, head)]
    ids = torch.tensor([[11, llm.seg_token_id, 13, llm.image_token_id, 17]])
    embeds, mask = llm.embed_tokens(ids).detach(), torch.ones_like(ids)
    kwargs = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True,
                  pad_token_id=llm.tokenizer.pad_token_id, eos_token_id=llm.eos_token_ids)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        with _new_tokens_merged(llm.model):
            per_call = llm.model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        assert set(seen) == {torch.float32}
        seen.clear()
        once = llm.generate_ids(embeds, mask, **kwargs)
        assert set(seen) == {torch.bfloat16}
    assert torch.equal(once.sequences, per_call.sequences)
    for a, b in zip(once.scores, per_call.scores, strict=True):
        assert torch.equal(a, b)
    seen.clear()
    with torch.inference_mode():
        llm.generate_ids(embeds, mask, max_new_tokens=2, do_sample=False)
    assert set(seen) == {torch.float32}
    for hook in hooks:
        hook.remove()
    after = {n: p for n, p in llm.named_parameters()}
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert all(p.dtype == torch.float32 for p in after.values())
    table = next(m for m in llm.model.modules() if isinstance(m, nn.Embedding))
    assert (head.weight is table.weight) == tied
    out = llm(llm.embed_tokens(ids), mask, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for n, p in llm.named_parameters() if "lora_A" in n)


@pytest.mark.parametrize("tied", [True, False], ids=["tied_head", "own_head"])
def test_training_puts_the_trained_rows_in_without_peft_copying_the_table(tied, monkeypatch):
    """embed_tokens and the loss's output head give peft's values and the same gradients for
    the trained rows, without the copy of the whole table that peft makes on every call."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    cfg = {**TINY_LLAMA, "model_config": {**TINY_LLAMA["model_config"], "tie_word_embeddings": tied}}
    torch.manual_seed(0)
    llm = build("llms", "hf_causal", cfg)
    delta = next(p for n, p in llm.named_parameters() if "trainable_tokens_delta" in n)
    with torch.no_grad():
        delta.add_(torch.randn_like(delta))
    ids = torch.tensor([[11, llm.seg_token_id, 13, llm.image_token_id, llm.seg_token_id, 17]])
    mask = torch.ones_like(ids)
    head = llm.model.get_output_embeddings()

    copies = []
    per_call = TrainableTokensLayer.get_merged_weights
    monkeypatch.setattr(TrainableTokensLayer, "get_merged_weights", lambda *a: copies.append(1) or per_call(*a))

    def loss_and_grads(fast: bool):
        llm.zero_grad()
        copies.clear()
        embeds = llm.embed_tokens(ids) if fast else llm.model.get_input_embeddings()(ids)
        before = len(copies)
        hidden = llm(embeds, mask).hidden_states[0]
        copies[before:] = []  # the model's own head, outside what is measured here
        logits = llm._output_head(hidden) if fast else head(hidden)
        loss = nn.functional.cross_entropy(logits[:-1].float(), ids[0, 1:])
        loss.backward()
        return embeds.detach(), logits.detach(), delta.grad.clone()

    ref = loss_and_grads(fast=False)
    assert len(copies) == (2 if tied else 1)
    got = loss_and_grads(fast=True)
    assert torch.equal(got[0], ref[0])  # the same rows looked up
    torch.testing.assert_close(got[1], ref[1])
    torch.testing.assert_close(got[2], ref[2])
    assert got[2][0].abs().sum() > 0 and got[2][1].abs().sum() > 0  # both new rows learn
    assert not copies
    # where peft's own forward must run (rows merged for generation), its path is used
    layer = llm.model.get_input_embeddings().token_adapter
    with torch.no_grad():
        layer.merge()
    try:
        assert torch.equal(llm.embed_tokens(ids), ref[0])
    finally:
        with torch.no_grad():
            layer.unmerge()
