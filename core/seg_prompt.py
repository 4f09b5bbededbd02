"""The ``[SEG]`` coupling, one module for every LLM: last-layer hidden state -> decoder prompt.

LISA's recipe: the hidden state at each ``[SEG]`` token goes through an MLP into the mask
decoder's prompt space. K ``[SEG]`` tokens in a sample give K prompt embeddings ``(B, K, d)``,
with a mask saying which of the K slots a sample actually filled.
"""

from __future__ import annotations

import torch
from torch import nn

from medvlsam2.core.projectors import mlp


def gather_seg_states(
    hidden: torch.Tensor, token_ids: torch.Tensor, seg_token_id: int, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states at the ``[SEG]`` positions: ``(B, K, h)`` in order of appearance, and a
    ``(B, K)`` bool mask of the filled slots (K = the most ``[SEG]`` tokens of any sample)."""
    is_seg = token_ids == seg_token_id
    if attention_mask is not None:
        is_seg = is_seg & attention_mask.bool()
    counts = is_seg.sum(1)
    k = int(counts.max()) if counts.numel() else 0
    out = hidden.new_zeros(hidden.shape[0], k, hidden.shape[-1])
    mask = torch.zeros(hidden.shape[0], k, dtype=torch.bool, device=hidden.device)
    for i in range(hidden.shape[0]):
        pos = is_seg[i].nonzero().flatten()
        out[i, : len(pos)] = hidden[i, pos]
        mask[i, : len(pos)] = True
    return out, mask


class SegPromptProjector(nn.Module):
    """MLP from the LLM's hidden size to the decoder's ``prompt_dim``; works on ``(..., h)``."""

    def __init__(
        self, in_dim: int, out_dim: int, hidden_dim: int | None = None, num_layers: int = 2, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.net = mlp(in_dim, hidden_dim or in_dim, out_dim, num_layers, dropout)

    def forward(self, seg_hidden: torch.Tensor) -> torch.Tensor:
        return self.net(seg_hidden.to(self.net[0].weight.dtype))
