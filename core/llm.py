"""The language-model contract shared by every LLM plugin."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

IMAGE_TOKEN = "<image>"
SEG_TOKEN = "[SEG]"


@dataclass
class LLMOutput:
    #: ``(B, T, V)``; None from a pass given ``labels`` whose plugin computes the loss from the
    #: answer positions alone (a training step reads only the loss and hidden states).
    logits: torch.Tensor | None
    hidden_states: torch.Tensor  # (B, T, hidden_size): last layer
    loss: torch.Tensor | None = None


class LanguageModel(nn.Module):
    """Base class of LLM plugins.

    After construction the tokenizer knows ``<image>`` and ``[SEG]`` (``image_token_id``,
    ``seg_token_id``), the embedding table has rows for them, and LoRA (when configured)
    wraps ``lora_target_modules``.
    """

    config_class: ClassVar[type | None] = None
    hidden_size: int
    tokenizer: Any
    image_token_id: int
    seg_token_id: int
    lora_target_modules: list[str]

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> LLMOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def format_prompt(self, user_text: str) -> str:  # pragma: no cover - abstract
        """The prompt text up to where the assistant's answer starts."""
        raise NotImplementedError
