"""Trainable ToMoE modules: the expert hypernetwork and the per-layer routers.

These are the only parameters ToMoE trains; the language model stays frozen.
Dimension legend: T tokens, D hidden, E experts, L converted layers,
N channel blocks of one MLP, K embedding width.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "QK_START_LOGIT",
    "QKPruner",
    "ExpertHypernetwork",
    "LayerMasks",
    "LayerRouter",
    "SharedLayerRouter",
    "assign_blocks",
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


class LayerMasks(NamedTuple):
    """One converted MLP's channel-block masks, hard in the forward pass.

    experts: [E, N], the blocks each expert runs (shared ones included);
    shared: [N], the gated shared blocks of the "shared" layout, or None.
    """

    experts: torch.Tensor
    shared: torch.Tensor | None = None

    @property
    def routed(self) -> torch.Tensor:
        """[E, N]: each expert's own blocks (all of them in the paper layout)."""
        if self.shared is None:
            return self.experts
        if self.experts.dtype == torch.bool:
            return self.experts & ~self.shared[None, :]
        return self.experts - self.shared[None, :]


def assign_blocks(scores: torch.Tensor, capacity: list[int]) -> torch.Tensor:
    """
    Hard capacitated assignment of N blocks to K categories by deferred acceptance:
    each block goes to at most one category and category k holds at most
    ``capacity[k]`` blocks. Free blocks propose to their best category not yet
    tried; a category keeps the highest-scoring blocks it holds and releases the
    rest, so no category prefers a block it does not hold to one it does.
    scores: [K, N] -> bool [K, N].
    """
    num_categories, num_blocks = scores.shape
    scores = scores.detach()
    held = torch.full((num_blocks,), -1, dtype=torch.long, device=scores.device)
    tried = torch.zeros_like(scores, dtype=torch.bool)
    closed = torch.tensor([c <= 0 for c in capacity], device=scores.device)
    for _ in range(num_categories):
        free = held < 0
        options = scores.masked_fill(tried | closed[:, None], float("-inf"))
        best_score, best = options.masked_fill(~free[None, :], float("-inf")).max(0)
        proposing = (free & torch.isfinite(best_score)).nonzero().squeeze(1)
        if proposing.numel() == 0:
            break
        tried[best[proposing], proposing] = True
        held[proposing] = best[proposing]
        for k in range(num_categories):
            members = (held == k).nonzero().squeeze(1)
            if members.numel() > capacity[k]:
                order = scores[k, members].argsort(descending=True, stable=True)
                held[members[order[capacity[k] :]]] = -1
    hard = torch.zeros_like(scores, dtype=torch.bool)
    placed = (held >= 0).nonzero().squeeze(1)
    hard[held[placed], placed] = True
    return hard


# Keep-logit of every q/k RoPE pair at the start: kept (noise of mean +0.58 rarely
# flips it) yet unsaturated enough at temperature 0.4 for the budget to move it.
QK_START_LOGIT = 1.5


class QKPruner(nn.Module):
    """
    Static q/k head-dimension pruning of one attention layer (the paper's attention
    pruning): one keep-logit per RoPE pair (dims i and i + head_dim / 2, which
    rotary embeddings rotate together), shared by every query and key head, so GQA
    stays consistent and the pruned dims can be deleted from q_proj and k_proj.
    """

    def __init__(self, head_dim: int, start_logit: float = QK_START_LOGIT):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE pairs need an even head_dim, got {head_dim}")
        self.logits = nn.Parameter(torch.full((head_dim // 2,), start_logit))

    def pair_mask(self, tau: float, noise: float) -> torch.Tensor:
        """Hard keep-mask over pairs [hd/2] (straight-through); >= 1 pair kept."""
        mask = gumbel_sigmoid_st(self.logits, tau, noise)
        best = F.one_hot(self.logits.argmax(), mask.shape[0]).to(mask.dtype)
        return torch.maximum(mask, best)

    @staticmethod
    def dim_mask(pair_mask: torch.Tensor) -> torch.Tensor:
        """The mask over a head's dims [hd]: each pair's two dims together."""
        return torch.cat([pair_mask, pair_mask])


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

    def layer_masks(
        self, embeddings: torch.Tensor, tau: float, noise: float
    ) -> LayerMasks:
        """The layer's masks (straight-through); see :class:`LayerMasks`."""
        return LayerMasks(self.block_masks(embeddings, tau, noise))

    def token_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """Per-token scale of shared blocks [T] (None: the paper layout has none)."""
        return None


class SharedLayerRouter(LayerRouter):
    """
    The "shared" layout of one MLP: one gated shared set of ``shared_blocks``
    blocks that every token runs, plus E disjoint routed groups of
    ``group_blocks`` blocks each (a token runs its router's group); the other
    blocks are dropped. Which block goes where is trained: the decoder scores every
    block for each group and for the shared set (E + 1 embeddings), the hard
    assignment (:func:`assign_blocks`) fills the capacities by score, and gradients
    pass straight through a softmax over the categories. The shared set is scaled
    by ``2 * sigmoid(shared_gate(x))`` (1 at the start), which a Qwen2-MoE export
    reproduces exactly with its gated shared expert (down_proj doubled).
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        num_blocks: int,
        shared_blocks: int,
        group_blocks: int,
        embedding_dim: int = 128,
        offset: float = 3.0,
    ):
        super().__init__(hidden_size, num_experts, num_blocks, embedding_dim, offset)
        # rows 0..E-1: the routed groups, row E: the shared set
        self.block_bias = nn.Parameter(torch.zeros(num_experts + 1, num_blocks))
        self.shared_gate = nn.Linear(hidden_size, 1, bias=False)
        nn.init.zeros_(self.shared_gate.weight)
        self.capacity = [group_blocks] * num_experts + [shared_blocks]

    def layer_masks(
        self, embeddings: torch.Tensor, tau: float, noise: float
    ) -> LayerMasks:
        """embeddings: [E+1, K] -> experts [E, N] (group + shared), shared [N]."""
        scores = self.block_logits(embeddings)  # [E+1, N]
        if noise:
            scores = scores + noise * _gumbel(scores)
        hard = assign_blocks(scores, self.capacity).to(scores.dtype)
        soft = F.softmax(scores / tau, dim=0)
        member = hard + soft - soft.detach()  # [E+1, N]
        shared = member[-1]
        return LayerMasks(member[:-1] + shared[None, :], shared)

    def token_scale(self, x: torch.Tensor) -> torch.Tensor:
        """2 * sigmoid(shared_gate(x)) in float32, [T]."""
        with torch.autocast(x.device.type, enabled=False):
            return 2 * torch.sigmoid(self.shared_gate(x.float())).squeeze(-1)


def build_routers(
    hidden_size: int,
    num_experts: int,
    num_blocks: list[int],
    offset: float,
    device: torch.device | str = "cpu",
    shared: tuple[int, int] | None = None,
) -> tuple[ExpertHypernetwork, list[LayerRouter]]:
    """The hypernetwork and one router per converted MLP (``num_blocks[l]`` blocks).

    ``shared`` = (shared blocks, blocks per routed group) builds the "shared"
    layout's routers (and one more hypernetwork embedding per layer). Created in
    this order from the current RNG state, so a seed fixes them.
    """
    slots = num_experts if shared is None else num_experts + 1
    hypernet = ExpertHypernetwork(len(num_blocks), slots).to(device)
    routers = []
    for blocks in num_blocks:
        if shared is None:
            router = LayerRouter(
                hidden_size, num_experts, blocks, hypernet.embedding_dim, offset
            )
        else:
            router = SharedLayerRouter(
                hidden_size,
                num_experts,
                blocks,
                *shared,
                hypernet.embedding_dim,
                offset,
            )
        routers.append(router.to(device))
    return hypernet, routers
