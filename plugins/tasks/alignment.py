"""Stage 1: align volume features with radiology language.

Two objectives, alone or together:

* ``contrastive`` — InfoNCE (CLIP-style, learnable temperature) between the encoder's pooled
  tokens and a text tower: the real MiniLM sentence encoder (frozen, ``text_tower: minilm``) or
  the trunk LLM's own mean-pooled hidden states (``text_tower: llm``). Negatives are the other
  pairs of the batch, so it needs ``trainer.batch_size >= 2``.
* ``captioning`` — LLaVA stage 1: the report as the LLM's answer about the volume; with the LLM
  frozen only the projector learns to speak its language.

Metric: volume <-> text retrieval recall@1/5/10 on the evaluation split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from medvlsam2.core.errors import ConfigError
from medvlsam2.plugins.tasks.base import MedVLTask, TaskConfig

OBJECTIVES = ("contrastive", "captioning")
TOWERS = ("minilm", "llm")


@dataclass
class AlignmentConfig(TaskConfig):
    objectives: list[str] = field(default_factory=lambda: ["contrastive", "captioning"])
    text_tower: str = "minilm"
    embed_dim: int = 256
    init_temperature: float = 0.07
    contrastive_weight: float = 1.0
    captioning_weight: float = 1.0
    text_key: str = "text"
    #: Longest text (in tokens) the text tower reads.
    max_text_tokens: int = 128


class AlignmentTask(MedVLTask):
    config_class = AlignmentConfig
    trains: ClassVar[tuple[str, ...]] = ("projector", "heads")
    main_metric = "v2t_r@1"
    default_prompts: ClassVar[dict[str, list[str]]] = {
        "caption": ["Describe this scan.", "Write the findings for this volume.", "What does this image show?"]
    }

    @classmethod
    def check_config(cls, cfg: Any, path: str = "task") -> None:
        super().check_config(cfg, path)
        if not cfg.objectives or any(o not in OBJECTIVES for o in cfg.objectives):
            raise ConfigError(f"config: {path}.objectives: choose from {', '.join(OBJECTIVES)}, got {list(cfg.objectives)}")
        if cfg.text_tower not in TOWERS:
            raise ConfigError(f"config: {path}.text_tower: '{cfg.text_tower}' is not one of {', '.join(TOWERS)}")

    def configure_heads(self, model: Any) -> None:
        self.contrastive = "contrastive" in self.cfg.objectives
        self.captioning = "captioning" in self.cfg.objectives
        if self.captioning and model.trunk is None:
            raise ConfigError("alignment: the captioning objective needs an LLM (model.llm)")
        if self.cfg.text_tower == "llm" and model.trunk is None:
            raise ConfigError("alignment: text_tower 'llm' needs an LLM (model.llm)")
        if not self.contrastive:
            return
        text_dim = self._minilm()[1].config.hidden_size if self.cfg.text_tower == "minilm" else model.trunk.llm.hidden_size
        self.vision_proj = nn.Linear(model.encoder.out_dim, self.cfg.embed_dim)
        self.text_proj = nn.Linear(text_dim, self.cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / self.cfg.init_temperature)))

    def _minilm(self) -> tuple[Any, nn.Module]:
        """The frozen MiniLM, kept outside the module tree so checkpoints don't carry it."""
        if "_minilm_parts" not in self.__dict__:
            from transformers import AutoModel, AutoTokenizer

            from medvlsam2.plugins.tasks.metrics import minilm_path

            path = minilm_path()
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            encoder = AutoModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
            self.__dict__["_minilm_parts"] = (tokenizer, encoder)
        return self.__dict__["_minilm_parts"]

    # -- data -----------------------------------------------------------------------------
    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        volumes, records = self.stack_volumes(samples)
        texts = [str(s[self.cfg.text_key]).strip() for s in samples]
        prompts = [self.template("caption") for _ in samples]
        return {"volume": volumes, "records": records, "texts": texts, "prompts": prompts, "samples": samples}

    # -- embeddings -----------------------------------------------------------------------
    def volume_embedding(self, model: Any, volume: torch.Tensor) -> torch.Tensor:
        tokens = model.encoder(volume).tokens
        return F.normalize(self.vision_proj(tokens.mean(dim=1)), dim=-1)

    def text_embedding(self, model: Any, texts: list[str], device: torch.device) -> torch.Tensor:
        if self.cfg.text_tower == "minilm":
            tokenizer, encoder = self._minilm()
            encoder.to(device)
            batch = tokenizer(texts, padding=True, truncation=True, max_length=self.cfg.max_text_tokens, return_tensors="pt").to(device)
            with torch.no_grad():
                hidden = encoder(**batch).last_hidden_state
        else:
            trunk = model.trunk
            batch = trunk.tokenizer(texts, padding=True, truncation=True, max_length=self.cfg.max_text_tokens, return_tensors="pt")
            ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
            hidden = trunk.llm(trunk.llm.embed_tokens(ids), mask).hidden_states
            batch = {"attention_mask": mask}
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return F.normalize(self.text_proj(pooled.float()), dim=-1)

    # -- steps ----------------------------------------------------------------------------
    def training_step(self, model: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        volume = batch["volume"]
        losses: dict[str, torch.Tensor] = {}
        total = volume.new_zeros(())
        if self.contrastive and volume.shape[0] > 1:
            v = self.volume_embedding(model, volume)
            t = self.text_embedding(model, batch["texts"], volume.device)
            logits = self.logit_scale.exp().clamp(max=100) * v @ t.T
            target = torch.arange(len(v), device=v.device)
            nce = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            losses["contrastive_loss"] = nce.detach()
            total = total + self.cfg.contrastive_weight * nce
        if self.captioning:
            trunk = model.trunk
            text = trunk.tokenize(batch["prompts"], batch["texts"])
            lm = trunk(volume, text.input_ids, text.attention_mask, text.labels).loss
            losses["caption_loss"] = lm.detach()
            total = total + self.cfg.captioning_weight * lm
        losses["loss"] = total
        return losses

    @torch.no_grad()
    def predict_step(self, model: Any, batch: dict[str, Any]) -> list[dict[str, Any]]:
        out = [{"id": s["id"]} for s in batch["samples"]]
        volume = batch["volume"]
        if self.contrastive:
            v = self.volume_embedding(model, volume).cpu()
            t = self.text_embedding(model, batch["texts"], volume.device).cpu()
            for row, ve, te in zip(out, v, t):
                row.update(volume_embedding=ve, text_embedding=te)
        if self.captioning:
            trunk = model.trunk
            for i, row in enumerate(out):
                text = trunk.tokenize([self.templates("caption")[0]], [batch["texts"][i]])
                row["caption_loss"] = float(trunk(volume[i : i + 1], text.input_ids, text.attention_mask, text.labels).loss)
        return out

    def compute_metrics(self, predictions: list[dict[str, Any]]) -> dict[str, float]:
        from medvlsam2.plugins.tasks.metrics import retrieval_recall

        out: dict[str, float] = {}
        if self.contrastive and predictions:
            v = torch.stack([p["volume_embedding"] for p in predictions])
            t = torch.stack([p["text_embedding"] for p in predictions])
            ks = [k for k in (1, 5, 10) if k <= len(predictions)] or [1]
            out.update(retrieval_recall(v @ t.T, ks=ks))
        if self.captioning and predictions:
            out["caption_loss"] = sum(p["caption_loss"] for p in predictions) / len(predictions)
        return out
