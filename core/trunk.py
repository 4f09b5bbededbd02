"""The multimodal trunk: volume encoder -> projector -> LLM (+LoRA) -> ``[SEG]`` prompt projector.

Every part is chosen by registry name from the validated ``model`` config, so swapping the
encoder or the LLM is a one-line config change. The mask decoder is not built here (it is
its own plugin); the trunk only needs its ``prompt_dim`` to size the ``[SEG]`` projector.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from medvlsam2.core.config import SegProjectorConfig, make_plugin_config
from medvlsam2.core.encoder import EncoderOutput
from medvlsam2.core.errors import ConfigError, InputError
from medvlsam2.core.llm import IMAGE_TOKEN, SEG_TOKEN
from medvlsam2.core.seg_prompt import SegPromptProjector, gather_seg_states
from medvlsam2.core.splice import IGNORE_INDEX, SplicedBatch, splice_visual_embeds


@dataclass
class TextBatch:
    """Tokenised prompts (+ answers): ``(B, T)`` each; labels only where answers were given."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None = None


@dataclass
class TrunkOutput:
    loss: torch.Tensor | None  # mean LM cross-entropy over answer tokens (None without labels)
    logits: torch.Tensor  # (B, T', V) over the spliced sequence
    hidden_states: torch.Tensor  # (B, T', h) last layer
    seg_hidden: torch.Tensor  # (B, K, h) at the [SEG] tokens, in order of appearance
    seg_embeds: torch.Tensor | None  # (B, K, prompt_dim); None when the trunk has no prompt_dim
    seg_mask: torch.Tensor  # (B, K) bool: which [SEG] slots a sample filled
    spliced: SplicedBatch  # the LLM's input (positions of visual tokens, labels after splicing)
    encoder_output: EncoderOutput  # for a decoder that reuses the encoder's features


@dataclass
class GenerationOutput:
    text: list[str]  # the generated answers ([SEG] kept, EOS and padding removed)
    token_ids: torch.Tensor  # (B, T_new) generated ids, padded with pad_token_id after EOS
    seg_hidden: torch.Tensor  # (B, K, h) at [SEG] in the answer prefix (forced) or the generated text
    seg_embeds: torch.Tensor | None  # (B, K, prompt_dim)
    seg_mask: torch.Tensor  # (B, K) bool


def _component(model_cfg: Mapping[str, Any], key: str) -> tuple[str, dict[str, Any]]:
    node = model_cfg.get(key)
    if isinstance(node, str):
        return node, {}
    if not isinstance(node, Mapping) or not isinstance(node.get("name"), str):
        raise ConfigError(f"config: model.{key}: expected a mapping with a 'name' (a registry name)")
    return node["name"], {k: v for k, v in node.items() if k != "name"}


class Trunk(nn.Module):
    """``Trunk(model_cfg, prompt_dim)``: ``model_cfg`` is the ``model`` section of a run config.

    ``prompt_dim`` is the decoder's ``prompt_dim``; ``None`` builds no ``[SEG]`` projector
    (language-only runs such as stage-1 alignment), and ``seg_embeds`` are then ``None``.
    """

    def __init__(self, model_cfg: Mapping[str, Any] | DictConfig | Any, prompt_dim: int | None = None) -> None:
        super().__init__()
        from medvlsam2.core.registry import build, get_host

        if isinstance(model_cfg, DictConfig):
            model_cfg = OmegaConf.to_container(model_cfg, resolve=True)
        elif dataclasses.is_dataclass(model_cfg):
            model_cfg = dataclasses.asdict(model_cfg)
        enc_name, enc_args = _component(model_cfg, "encoder")
        proj_name, proj_args = _component(model_cfg, "projector")
        llm_name, llm_args = _component(model_cfg, "llm")
        self.encoder = build("encoders", enc_name, enc_args, path="model.encoder")
        self.llm = build("llms", llm_name, llm_args, path="model.llm")
        proj_cls = get_host().get("projectors", proj_name).load()
        proj_cfg = make_plugin_config(proj_cls.config_class, proj_args, path="model.projector")
        self.projector = proj_cls(proj_cfg, in_dim=self.encoder.out_dim, out_dim=self.llm.hidden_size)
        seg_cfg = make_plugin_config(SegProjectorConfig, model_cfg.get("seg_projector") or {}, path="model.seg_projector")
        self.prompt_dim = prompt_dim
        self.seg_projector = (
            SegPromptProjector(self.llm.hidden_size, prompt_dim, seg_cfg.hidden_dim, seg_cfg.num_layers, seg_cfg.dropout)
            if prompt_dim is not None
            else None
        )
        self.names = {"encoder": enc_name, "projector": proj_name, "llm": llm_name}

    # -- text ---------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.llm.tokenizer

    def tokenize(
        self,
        prompts: Sequence[str],
        answers: Sequence[str] | None = None,
        *,
        answer_prefix: str | Sequence[str] | None = None,
        padding_side: str = "right",
        add_image: bool = True,
    ) -> TextBatch:
        """Prompts through the LLM's template (chat or plain); labels cover answer + EOS only.

        ``add_image`` puts ``<image>`` in front of a prompt that has none. ``answer_prefix`` is
        text the assistant's turn starts with (e.g. ``"[SEG]"`` to force a mask); it is part
        of the prompt, so it carries no label.
        """
        tok = self.tokenizer
        if answers is not None and len(answers) != len(prompts):
            raise InputError(f"got {len(prompts)} prompts but {len(answers)} answers")
        prefixes = [answer_prefix] * len(prompts) if answer_prefix is None or isinstance(answer_prefix, str) else list(answer_prefix)
        if len(prefixes) != len(prompts):
            raise InputError(f"got {len(prompts)} prompts but {len(prefixes)} answer prefixes")
        add_special = not getattr(self.llm, "uses_chat_template", False)
        eos = tok.eos_token_id
        rows, label_rows = [], []
        for i, prompt in enumerate(prompts):
            text = prompt if (IMAGE_TOKEN in prompt or not add_image) else f"{IMAGE_TOKEN}\n{prompt}"
            full = self.llm.format_prompt(text) + (prefixes[i] or "")
            ids = list(tok(full, add_special_tokens=add_special).input_ids)
            labels = [IGNORE_INDEX] * len(ids)
            if answers is not None:
                answer_ids = list(tok(answers[i], add_special_tokens=False).input_ids) + [eos]
                ids += answer_ids
                labels += answer_ids
            rows.append(ids)
            label_rows.append(labels)
        length = max(len(r) for r in rows)
        pad = tok.pad_token_id
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        labels_t = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        for i, (ids, labels) in enumerate(zip(rows, label_rows)):
            sl = slice(0, len(ids)) if padding_side == "right" else slice(length - len(ids), length)
            input_ids[i, sl] = torch.tensor(ids)
            attention[i, sl] = 1
            labels_t[i, sl] = torch.tensor(labels)
        return TextBatch(input_ids, attention, labels_t if answers is not None else None)

    # -- model --------------------------------------------------------------------------
    def encode_volume(self, volume: torch.Tensor) -> tuple[torch.Tensor, EncoderOutput]:
        """Visual embeddings ``(B, M, h)`` for the LLM, and the encoder's own output."""
        enc = self.encoder(volume)
        return self.projector(enc.tokens, enc.grid), enc

    def _splice(
        self, visual: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        labels: torch.Tensor | None, padding_side: str,
    ) -> SplicedBatch:
        device = visual.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        return splice_visual_embeds(
            input_ids,
            attention_mask,
            self.llm.embed_tokens(input_ids),
            visual,
            self.llm.image_token_id,
            labels=labels.to(device) if labels is not None else None,
            pad_id=self.tokenizer.pad_token_id,
            padding_side=padding_side,
        )

    def _seg(self, hidden: torch.Tensor, spliced: SplicedBatch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        seg_hidden, seg_mask = gather_seg_states(hidden, spliced.token_ids, self.llm.seg_token_id, spliced.attention_mask)
        seg_embeds = self.seg_projector(seg_hidden) if self.seg_projector is not None else None
        return seg_hidden, seg_embeds, seg_mask

    def forward(
        self,
        volume: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> TrunkOutput:
        """Teacher-forced pass: LM loss over the answers and the ``[SEG]`` prompt embeddings."""
        visual, enc = self.encode_volume(volume)
        spliced = self._splice(visual, input_ids, attention_mask, labels, "right")
        out = self.llm(spliced.inputs_embeds, spliced.attention_mask, spliced.labels)
        seg_hidden, seg_embeds, seg_mask = self._seg(out.hidden_states, spliced)
        return TrunkOutput(out.loss, out.logits, out.hidden_states, seg_hidden, seg_embeds, seg_mask, spliced, enc)

    @torch.no_grad()
    def generate(
        self,
        volume: torch.Tensor,
        prompts: Sequence[str],
        *,
        answer_prefix: str | Sequence[str] | None = None,
        force_seg: bool = False,
        max_new_tokens: int = 64,
        num_beams: int = 1,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        add_image: bool = True,
    ) -> GenerationOutput:
        """Answer ``prompts`` about ``volume`` (one prompt per volume in the batch).

        Greedy by default; ``num_beams > 1`` is beam search, ``do_sample`` samples (with
        ``temperature``/``top_k``/``top_p``); ``repetition_penalty`` above 1 and
        ``no_repeat_ngram_size`` above 0 act on the answer's own tokens, as in transformers'
        ``generate``. Stops at EOS or ``max_new_tokens``. With
        ``force_seg`` the answer starts with ``[SEG]`` (after ``answer_prefix``), so a mask
        prompt exists even when the model would not emit one. ``[SEG]`` hidden states come
        from one teacher-forced pass over prompt + answer, identical for every decoding mode.
        """
        if volume.shape[0] != len(prompts):
            raise InputError(f"generate: {volume.shape[0]} volume(s) but {len(prompts)} prompt(s)")
        prefixes = [answer_prefix] * len(prompts) if answer_prefix is None or isinstance(answer_prefix, str) else list(answer_prefix)
        if force_seg:
            prefixes = [p if p and SEG_TOKEN in p else f"{p or ''}{SEG_TOKEN}" for p in prefixes]
        batch = self.tokenize(prompts, answer_prefix=prefixes, padding_side="left", add_image=add_image)
        visual, _ = self.encode_volume(volume)
        spliced = self._splice(visual, batch.input_ids, batch.attention_mask, None, "left")
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "do_sample": do_sample}
        if do_sample:
            kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
        else:  # keep a model's sampling defaults from leaking into greedy/beam decoding
            kwargs.update(temperature=None, top_k=None, top_p=None)
        if repetition_penalty != 1.0:  # passed only when set: an LLM plugin may not know them
            kwargs["repetition_penalty"] = float(repetition_penalty)
        if no_repeat_ngram_size:
            kwargs["no_repeat_ngram_size"] = int(no_repeat_ngram_size)
        new_ids = self.llm.generate_ids(spliced.inputs_embeds, spliced.attention_mask, **kwargs)
        eos_ids = set(getattr(self.llm, "eos_token_ids", [self.tokenizer.eos_token_id]))
        answers: list[list[int]] = []
        for row in new_ids.tolist():
            cut = next((j for j, t in enumerate(row) if t in eos_ids), len(row))
            answers.append(row[:cut])
        text = [self.tokenizer.decode(a, skip_special_tokens=False) for a in answers]
        pad = self.tokenizer.pad_token_id
        width = max((len(a) for a in answers), default=0)
        token_ids = torch.full((len(answers), width), pad, dtype=torch.long)
        for i, a in enumerate(answers):
            token_ids[i, : len(a)] = torch.tensor(a, dtype=torch.long)
        # Teacher-forced pass (right padding, as in training) for the [SEG] states.
        keep = batch.attention_mask.bool()
        rows = [batch.input_ids[i][keep[i]].tolist() + answers[i] for i in range(len(answers))]
        seg_id = self.llm.seg_token_id
        if any(seg_id in r for r in rows):
            length = max(len(r) for r in rows)
            ids = torch.full((len(rows), length), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
            full = self._splice(visual, ids, mask, None, "right")
            hidden = self.llm(full.inputs_embeds, full.attention_mask).hidden_states
            seg_hidden, seg_embeds, seg_mask = self._seg(hidden, full)
        else:
            b, h = len(rows), self.llm.hidden_size
            seg_hidden = visual.new_zeros(b, 0, h)
            seg_embeds = visual.new_zeros(b, 0, self.prompt_dim) if self.seg_projector is not None else None
            seg_mask = torch.zeros(b, 0, dtype=torch.bool, device=visual.device)
        return GenerationOutput(text, token_ids, seg_hidden, seg_embeds, seg_mask)

    @torch.no_grad()
    def score_answers(
        self,
        volume: torch.Tensor,
        prompts: Sequence[str],
        candidates: Sequence[Sequence[str]],
        *,
        add_image: bool = True,
        rows_per_pass: int = 8,
    ) -> list[list[float]]:
        """Log-likelihood of each candidate answer to each prompt about its volume.

        ``candidates[i]`` are the answers scored for ``prompts[i]`` and ``volume[i]``. A
        candidate's score is the sum of the log-probabilities of its tokens and the EOS after
        it, teacher-forced exactly as in training: the log-probability of the whole answer.
        Picking the best-scored candidate is multiple-choice evaluation by likelihood. The
        volume is encoded once; ``rows_per_pass`` (prompt, candidate) pairs share one LLM pass.
        """
        if volume.shape[0] != len(prompts) or len(candidates) != len(prompts):
            raise InputError(
                f"score_answers: {volume.shape[0]} volume(s), {len(prompts)} prompt(s) and "
                f"{len(candidates)} candidate list(s) must be as many"
            )
        if any(len(c) == 0 for c in candidates):
            raise InputError("score_answers: every prompt needs at least one candidate answer")
        visual, _ = self.encode_volume(volume)
        pairs = [(i, k) for i, cands in enumerate(candidates) for k in range(len(cands))]
        scores: list[list[float]] = [[0.0] * len(c) for c in candidates]
        for start in range(0, len(pairs), max(1, rows_per_pass)):
            chunk = pairs[start : start + max(1, rows_per_pass)]
            rows = [i for i, _ in chunk]
            batch = self.tokenize(
                [prompts[i] for i in rows], [candidates[i][k] for i, k in chunk], add_image=add_image
            )
            spliced = self._splice(visual[rows], batch.input_ids, batch.attention_mask, batch.labels, "right")
            logits = self.llm(spliced.inputs_embeds, spliced.attention_mask).logits
            targets = spliced.labels[:, 1:].to(logits.device)
            keep = targets != IGNORE_INDEX  # the answer's tokens and EOS, not the prompt
            logp = torch.log_softmax(logits[:, :-1][keep].float(), dim=-1)
            picked = logp.gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1)
            row_of = keep.nonzero()[:, 0]
            totals = torch.zeros(len(chunk), device=picked.device).index_add_(0, row_of, picked)
            for (i, k), total in zip(chunk, totals.tolist()):
                scores[i][k] = float(total)
        return scores
