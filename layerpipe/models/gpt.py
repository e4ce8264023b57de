"""A small GPT as a list of layers, ready to be split into pipeline stages.

The model is the usual decoder-only transformer (token and position
embeddings, pre-norm blocks of causal self-attention and an MLP, a final
norm and a linear head), written as ``gpt_layers(config)``: a list whose
entries are the embedding, each block and the head, so a pipeline can cut
it between any two of them.  Every layer maps a ``(batch, time, width)``
tensor to another, except the embedding (token ids in) and the head (logits
out).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional

from .config import GPTConfig

__all__ = ["Block", "CausalAttention", "Embedding", "GPTConfig", "Head", "gpt_layers", "next_token_loss"]


class Embedding(nn.Module):
    """Token ids ``(batch, time)`` to vectors ``(batch, time, width)``: token plus position embedding."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.tokens = nn.Embedding(config.vocab_size, config.width)
        self.positions = nn.Embedding(config.block_size, config.width)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.dropout(self.tokens(ids) + self.positions(positions))


class CausalAttention(nn.Module):
    """Causal attention of ``(batch, heads, time, head width)`` queries, keys and values.

    Written out, so autograd stores the ``time × time`` attention weights of
    every head: cheap to compute again and costly to keep.  The class
    attribute ``recompute_region`` marks it for layerpipe's
    ``recompute="selective"``, which recomputes exactly this (Korthikanti et
    al. 2022, "Reducing Activation Recomputation in Large Transformer
    Models"); the model itself knows nothing of the runtime.
    """

    recompute_region = True

    def __init__(self, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        time = q.shape[-2]
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        future = torch.ones(time, time, dtype=torch.bool, device=q.device).triu(1)
        weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        return self.dropout(weights) @ v


class Block(nn.Module):
    """One transformer block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.heads = config.heads
        self.norm1 = nn.LayerNorm(config.width)
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.attention = CausalAttention(config.dropout)
        self.projection = nn.Linear(config.width, config.width)
        self.norm2 = nn.LayerNorm(config.width)
        self.mlp = nn.Sequential(
            nn.Linear(config.width, 4 * config.width),
            nn.GELU(),
            nn.Linear(4 * config.width, config.width),
            nn.Dropout(config.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=2)
        q, k, v = (t.view(batch, time, self.heads, width // self.heads).transpose(1, 2) for t in (q, k, v))
        attended = self.attention(q, k, v)
        x = x + self.projection(attended.transpose(1, 2).reshape(batch, time, width))
        return x + self.mlp(self.norm2(x))


class Head(nn.Module):
    """Vectors ``(batch, time, width)`` to next-token logits ``(batch, time, vocabulary)``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.width)
        self.linear = nn.Linear(config.width, config.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


def gpt_layers(config: GPTConfig, seed: int = 0) -> list[nn.Module]:
    """Return ``[Embedding, Block × blocks, Head]`` initialised from ``seed`` (GPT-2's scheme); with
    ``config.tie_embeddings`` the head holds the token embedding's very parameter."""
    torch.manual_seed(seed)
    layers = [Embedding(config), *(Block(config) for _ in range(config.blocks)), Head(config)]
    for layer in layers:
        for name, parameter in layer.named_parameters():
            if parameter.dim() >= 2:
                std = 0.02 / math.sqrt(2 * config.blocks) if name.endswith("projection.weight") else 0.02
                nn.init.normal_(parameter, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(parameter)
    if getattr(config, "tie_embeddings", False):
        layers[-1].linear.weight = layers[0].tokens.weight
    return layers


def dense_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Return the shape of every parameter of ``gpt_layers(config)``, named as in ``nn.Sequential`` (nothing allocated)."""
    with torch.device("meta"):
        layers = [Embedding(config), *(Block(config) for _ in range(config.blocks)), Head(config)]
    return {
        f"{index}.{name}": tuple(parameter.shape)
        for index, layer in enumerate(layers)
        for name, parameter in layer.named_parameters()
    }


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Return the mean cross-entropy of ``logits (batch, time, vocabulary)`` against ``targets (batch, time)``."""
    return functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
