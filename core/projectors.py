"""Projectors: encoder tokens ``(B, N, C)`` on a ``(d, h, w)`` grid -> LLM embeddings ``(B, M, hidden)``.

Unlike other plugins, a projector is constructed as ``cls(cfg, in_dim, out_dim)``: the trunk
knows the encoder's ``out_dim`` and the LLM's ``hidden_size``, so a config never repeats them.
``cfg`` is an instance of the class's ``config_class``; ``forward(tokens, grid)`` returns the
visual embeddings, and ``num_tokens(grid)`` says how many there will be.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from medvlsam2.core.errors import ConfigError, InputError


def mlp(in_dim: int, hidden: int, out_dim: int, num_layers: int = 2, dropout: float = 0.0) -> nn.Sequential:
    """``num_layers`` linear layers with GELU between them (LLaVA-1.5's ``mlp2x_gelu`` for 2)."""
    if num_layers < 1:
        raise ConfigError(f"num_layers must be >= 1, got {num_layers}")
    dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        if i:
            layers += [nn.GELU(), nn.Dropout(dropout)] if dropout else [nn.GELU()]
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def _check_tokens(tokens: torch.Tensor, grid: tuple[int, int, int], in_dim: int, name: str) -> None:
    if tokens.ndim != 3 or tokens.shape[-1] != in_dim:
        raise InputError(f"{name}: expected tokens (B, N, {in_dim}), got {tuple(tokens.shape)}")
    if grid[0] * grid[1] * grid[2] != tokens.shape[1]:
        raise InputError(f"{name}: token grid {tuple(grid)} does not match {tokens.shape[1]} tokens")


@dataclass
class MLPConfig:
    hidden_dim: int | None = None  # None: the LLM's hidden size
    num_layers: int = 2
    dropout: float = 0.0


class MLPProjector(nn.Module):
    """One embedding per encoder token (as many LLM tokens as the encoder gives)."""

    config_class = MLPConfig

    def __init__(self, cfg: MLPConfig, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.net = mlp(in_dim, cfg.hidden_dim or out_dim, out_dim, cfg.num_layers, cfg.dropout)

    def num_tokens(self, grid: tuple[int, int, int]) -> int:
        return grid[0] * grid[1] * grid[2]

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        _check_tokens(tokens, grid, self.in_dim, "mlp projector")
        return self.net(tokens)


@dataclass
class SpatialPoolMLPConfig:
    pool_grid: list[int] = field(default_factory=lambda: [8, 8, 8])  # fixed (d, h, w) output grid
    mode: str = "avg"  # avg | max
    hidden_dim: int | None = None
    num_layers: int = 2
    dropout: float = 0.0


class SpatialPoolMLPProjector(nn.Module):
    """3D adaptive pooling of the token grid to ``pool_grid``, then an MLP, as M3D's spatial pooling.

    The LLM sees ``prod(pool_grid)`` tokens whatever the volume size; a grid smaller than
    ``pool_grid`` along an axis is kept at its own size there (pooling never upsamples).
    """

    config_class = SpatialPoolMLPConfig

    def __init__(self, cfg: SpatialPoolMLPConfig, in_dim: int, out_dim: int) -> None:
        super().__init__()
        if len(cfg.pool_grid) != 3 or min(cfg.pool_grid) < 1:
            raise ConfigError(f"spatial_pool_mlp: pool_grid needs three positive sizes, got {cfg.pool_grid}")
        if cfg.mode not in ("avg", "max"):
            raise ConfigError(f"spatial_pool_mlp: mode must be 'avg' or 'max', got '{cfg.mode}'")
        self.in_dim, self.out_dim = in_dim, out_dim
        self.pool_grid = tuple(cfg.pool_grid)
        self.mode = cfg.mode
        self.net = mlp(in_dim, cfg.hidden_dim or out_dim, out_dim, cfg.num_layers, cfg.dropout)

    def out_grid(self, grid: tuple[int, int, int]) -> tuple[int, int, int]:
        return tuple(min(g, p) for g, p in zip(grid, self.pool_grid))  # type: ignore[return-value]

    def num_tokens(self, grid: tuple[int, int, int]) -> int:
        d, h, w = self.out_grid(grid)
        return d * h * w

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        _check_tokens(tokens, grid, self.in_dim, "spatial_pool_mlp projector")
        b, _, c = tokens.shape
        x = tokens.transpose(1, 2).reshape(b, c, *grid)
        pool = F.adaptive_avg_pool3d if self.mode == "avg" else F.adaptive_max_pool3d
        x = pool(x, self.out_grid(grid))
        return self.net(x.flatten(2).transpose(1, 2))


@dataclass
class PerceiverConfig:
    num_queries: int = 64
    num_layers: int = 2
    num_heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    max_grid: list[int] = field(default_factory=lambda: [64, 64, 64])  # size of the 3D position tables


class PerceiverLayer(nn.Module):
    """Pre-norm cross-attention of the queries to the tokens, then a feed-forward block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_ff = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ff = mlp(dim, int(dim * mlp_ratio), dim, 2, dropout)

    def forward(self, queries: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(kv)
        queries = queries + self.attn(self.norm_q(queries), kv, kv, need_weights=False)[0]
        return queries + self.ff(self.norm_ff(queries))


class PerceiverProjector(nn.Module):
    """Learned queries cross-attend to the tokens: ``num_queries`` LLM tokens for any volume size.

    Tokens get factorised learned 3D position embeddings (depth + height + width tables of
    ``max_grid`` entries) so the queries can tell where a token came from.
    """

    config_class = PerceiverConfig

    def __init__(self, cfg: PerceiverConfig, in_dim: int, out_dim: int) -> None:
        super().__init__()
        if cfg.num_queries < 1 or cfg.num_layers < 1:
            raise ConfigError("perceiver: num_queries and num_layers must be >= 1")
        if len(cfg.max_grid) != 3:
            raise ConfigError(f"perceiver: max_grid needs three sizes, got {cfg.max_grid}")
        width = out_dim
        heads = cfg.num_heads
        if width % heads:
            raise ConfigError(f"perceiver: LLM hidden size {width} is not divisible by num_heads={heads}")
        self.in_dim, self.out_dim, self.num_queries = in_dim, out_dim, cfg.num_queries
        self.max_grid = tuple(cfg.max_grid)
        self.input_proj = nn.Linear(in_dim, width)
        self.pos = nn.ParameterList([nn.Parameter(torch.zeros(n, width)) for n in self.max_grid])
        self.queries = nn.Parameter(torch.randn(cfg.num_queries, width) * 0.02)
        self.layers = nn.ModuleList(
            PerceiverLayer(width, heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.num_layers)
        )
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, out_dim)  # back to the scale of the LLM's own embeddings

    def num_tokens(self, grid: tuple[int, int, int]) -> int:
        return self.num_queries

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        _check_tokens(tokens, grid, self.in_dim, "perceiver projector")
        if any(g > m for g, m in zip(grid, self.max_grid)):
            raise InputError(f"perceiver projector: token grid {tuple(grid)} exceeds max_grid {self.max_grid}")
        d, h, w = grid
        pos = (
            self.pos[0][:d, None, None] + self.pos[1][None, :h, None] + self.pos[2][None, None, :w]
        ).reshape(d * h * w, -1)
        kv = self.input_proj(tokens) + pos
        q = self.queries.expand(tokens.shape[0], -1, -1)
        for layer in self.layers:
            q = layer(q, kv)
        return self.out(self.norm(q))
