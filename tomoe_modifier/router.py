"""Trainable ToMoE modules: the expert hypernetwork and the per-layer routers.

These are the only parameters ToMoE trains; the language model stays frozen.
Dimension legend: T tokens, D hidden, E experts, L converted layers,
N channel blocks of one MLP, K embedding width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ExpertHypernetwork",
    "LayerRouter",
    "build_routers",
    "gumbel_softmax_st",
    "gumbel_sigmoid_st",
]


def _gumbel(like: torch.Tensor) -> torch.Tensor:
    uniform = torch.rand_like(like).clamp_(1e-10, 1 - 1e-10)
    return -torch.log(-torch.log(uniform))


def gumbel_softmax_st(
    logits: torch.Tensor, tau: float, noise: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Top-1 choice with a straight-through gradient.

    :param noise: scale of the Gumbel noise (1 = the paper's sampling, 0 = none);
        training anneals it to 0 so it ends on the deterministic model
    :return: (hard one-hot whose gradient is that of the soft probabilities,
        soft probabilities); without noise the choice is the plain argmax
    """
    if noise:
        logits = logits + noise * _gumbel(logits)
    soft = F.softmax(logits / tau, dim=-1)
    hard = F.one_hot(soft.argmax(dim=-1), soft.shape[-1]).to(soft.dtype)
    return hard + soft - soft.detach(), soft


def gumbel_sigmoid_st(logits: torch.Tensor, tau: float, noise: float) -> torch.Tensor:
    """
    Binary mask with a straight-through gradient (the paper's Gumbel-sigmoid).

    The noise is one Gumbel(0, 1) sample, as in ToMoE: its left tail is thin, so with
    the +3 logit offset training really starts from the dense model (logistic noise
    would drop ~5% of blocks at random on step one). ``noise`` scales it; without
    noise the mask is ``logits > 0``.
    """
    if noise:
        logits = logits + noise * _gumbel(logits)
    soft = torch.sigmoid(logits / tau)
    hard = (logits > 0).to(soft.dtype)
    return hard + soft - soft.detach()


class ExpertHypernetwork(nn.Module):
    """
    Bidirectional GRU over the converted layers that emits one embedding per
    (layer, expert), coupling the expert shapes of neighbouring layers (ToMoE §3).
    """

    def __init__(
        self, num_layers: int, num_experts: int, input_dim: int = 32, hidden: int = 64
    ):
        super().__init__()
        self.inputs = nn.Parameter(torch.randn(num_layers, num_experts, input_dim))
        self.gru = nn.GRU(input_dim, hidden, bidirectional=True)
        self.embedding_dim = 2 * hidden

    def forward(self) -> torch.Tensor:
        out, _ = self.gru(self.inputs)  # [L, E, K]: layers are the sequence axis
        return out


class LayerRouter(nn.Module):
    """
    One converted MLP's trainable parts: a token gate (D -> E, the converted
    model's router) and a decoder that turns an expert embedding into keep-logits
    for the MLP's channel blocks.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        num_blocks: int,
        embedding_dim: int = 128,
        offset: float = 3.0,
    ):
        super().__init__()
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.decoder = nn.Sequential(
            nn.LayerNorm(embedding_dim),
            nn.GELU(),
            nn.Linear(embedding_dim, num_blocks, bias=False),
        )
        # per-expert logit table; zero keeps the paper's dense start, the
        # activation-aware start (warm_start.py) writes each expert's first blocks
        self.block_bias = nn.Parameter(torch.zeros(num_experts, num_blocks))
        self.offset = offset

    def route(
        self, x: torch.Tensor, tau: float, noise: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, D] -> (one-hot choice [T, E], soft probabilities [T, E]), fp32."""
        with torch.autocast(x.device.type, enabled=False):
            logits = self.gate(x.float())  # [T, E]
        return gumbel_softmax_st(logits, tau, noise)

    def block_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """embeddings: [E, K] -> keep-logits [E, N]; the offset starts dense."""
        with torch.autocast(embeddings.device.type, enabled=False):
            return self.decoder(embeddings.float()) + self.offset + self.block_bias

    def block_masks(
        self, embeddings: torch.Tensor, tau: float, noise: float
    ) -> torch.Tensor:
        """Hard keep-masks [E, N]; every expert keeps at least its best block."""
        logits = self.block_logits(embeddings)
        mask = gumbel_sigmoid_st(logits, tau, noise)
        best = F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(mask.dtype)
        return torch.maximum(mask, best)


def build_routers(
    hidden_size: int,
    num_experts: int,
    num_blocks: list[int],
    offset: float,
    device: torch.device | str = "cpu",
) -> tuple[ExpertHypernetwork, list[LayerRouter]]:
    """The hypernetwork and one router per converted MLP (``num_blocks[l]`` blocks).

    Created in this order from the current RNG state, so a seed fixes them.
    """
    hypernet = ExpertHypernetwork(len(num_blocks), num_experts).to(device)
    routers = [
        LayerRouter(
            hidden_size, num_experts, blocks, hypernet.embedding_dim, offset
        ).to(device)
        for blocks in num_blocks
    ]
    return hypernet, routers
