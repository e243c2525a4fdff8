"""Converted ToMoE models: decoder LLMs whose MLPs are top-1 mixtures of experts.

This file is self-contained on purpose: ``save_pretrained`` copies it beside the
checkpoint (``auto_map``), so ``trust_remote_code=True`` loads a converted model
without the ``tomoe_modifier`` package. It may import only torch and transformers.

Each expert is a subset of channel blocks of one shared "union" MLP (the channels
any expert uses), so overlapping experts are stored once. Per-layer union widths,
the expert count and the block size live in ``config.json``; which blocks each
expert uses is the ``expert_blocks`` buffer in the state dict.

Dimension legend: T tokens, D hidden, U union width, E experts, B block size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.activations import ACT2FN

try:  # llm-compressor is optional at inference time
    from llmcompressor.modeling.moe.context import get_calibrate_all_experts_flag
except ImportError:  # pragma: no cover - exercised only without llm-compressor

    def get_calibrate_all_experts_flag() -> bool:
        return False


__all__ = [
    "ToMoESparseMLP",
    "can_slice_weights",
    "expert_plan",
    "sliced_forward",
    "ToMoELlamaConfig",
    "ToMoELlamaForCausalLM",
    "ToMoEMistralConfig",
    "ToMoEMistralForCausalLM",
    "ToMoEQwen2Config",
    "ToMoEQwen2ForCausalLM",
    "ToMoEQwen3Config",
    "ToMoEQwen3ForCausalLM",
    "TOMOE_ARCHITECTURES",
    "blocks_to_ranges",
    "merge_ranges",
    "slice_overhead",
]


# -- CPU fast path: planning and cost model ---------------------------------------
# Measured on a 2-core Intel Xeon (AVX512-BF16/AMX), torch 2.13, SmolLM2-135M MLPs
# (hidden 576, 1536 channels); other machines run the same code with these values.
# One more weight slice costs about as much as reading this many more channels (op
# launch + Python: ~10 us per small fp32 GEMV against ~0.2 us per channel; small
# bf16 GEMMs go through oneDNN and cost ~40 us each).
SLICE_OVERHEAD_CHANNELS = {torch.float32: 64, torch.bfloat16: 384, torch.float16: 384}
# oneDNN (bf16/fp16 GEMMs on CPU) builds a kernel per new GEMM shape, and expert
# token groups change size every call: a sliced multi-token bf16 MLP ran at half
# the dense speed, so for those dtypes batches use the union path.
GROUPED_SLICE_OVERHEAD_FACTOR = {torch.bfloat16: 64, torch.float16: 64}
# A GEMM stops being memory-bound (weights read once for all tokens) at about this
# many tokens (same machine).
MEMORY_BOUND_TOKENS = 8
# Above this many tokens gate and up are two GEMMs on strided row views of
# gate_up_proj, so the activation reads contiguous memory (the interleaved
# [T, w, 2] view made SiLU 5x slower than the GEMM itself at 512 tokens).
SPLIT_GATE_UP_TOKENS = 4


def slice_overhead(dtype: torch.dtype, tokens: int = 1) -> int:
    """Cost of one more weight slice, in channels (see SLICE_OVERHEAD_CHANNELS)."""
    overhead = SLICE_OVERHEAD_CHANNELS.get(dtype, 64)
    if tokens > 1:
        overhead *= GROUPED_SLICE_OVERHEAD_FACTOR.get(dtype, 1)
    return overhead


def blocks_to_ranges(blocks: list[bool], block_size: int) -> list[tuple[int, int]]:
    """Contiguous channel ranges [start, end) covered by the True blocks."""
    ranges: list[tuple[int, int]] = []
    start = None
    for i, on in enumerate(list(blocks) + [False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            ranges.append((start * block_size, i * block_size))
            start = None
    return ranges


def merge_ranges(ranges: list[tuple[int, int]], max_gap: int) -> list[tuple[int, int]]:
    """Join neighbouring ranges separated by fewer than ``max_gap`` channels.

    Computing a gap's channels (then zeroing them) is cheaper than launching
    another weight slice when the gap is small; the result stays exact.
    """
    merged: list[tuple[int, int]] = []
    for a, b in ranges:
        if merged and a - merged[-1][1] < max_gap:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return merged


def can_slice_weights(moe: "ToMoESparseMLP", x: torch.Tensor) -> bool:
    """Whether ``moe`` may run the sliced CPU path on ``x``.

    Slicing reads the raw weights; quantized or wrapped Linears, calibration (where
    every expert must see every token), tracing and compilation use the masked path.
    """
    if x.device.type != "cpu" or get_calibrate_all_experts_flag():
        return False
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    linears = (moe.gate_up_proj, moe.down_proj)
    return all(
        type(m) is nn.Linear and not hasattr(m, "quantization_scheme") for m in linears
    )


def _token_cost(tokens: int) -> float:
    return max(1.0, tokens / MEMORY_BOUND_TOKENS)


def expert_plan(
    moe: "ToMoESparseMLP", expert: int, max_gap: int, dtype: torch.dtype
) -> list:
    """[(start, end, gap mask or None)] of one expert at one merge threshold."""
    cache = moe.plan_cache()
    key = (expert, max_gap, dtype)
    plan = cache.get(key)
    if plan is None:
        mask = moe.channel_mask()[expert]
        plan = []
        for a, b in merge_ranges(moe.expert_ranges()[expert], max_gap):
            keep = mask[a:b]
            plan.append((a, b, None if keep.all() else keep.to(dtype)))
        cache[key] = plan
    return plan


def _token_masks(moe: "ToMoESparseMLP", dtype: torch.dtype) -> torch.Tensor:
    """channel_mask() in ``dtype``, cached with the plans. [E, U]"""
    cache = moe.plan_cache()
    key = ("mask", dtype)
    if key not in cache:
        cache[key] = moe.channel_mask().to(dtype)
    return cache[key]


def _gated(moe: "ToMoESparseMLP", x: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """act(gate) * up of union channels [a, b) for tokens x [T, D] -> [T, b-a]."""
    weight, bias = moe.gate_up_proj.weight, moe.gate_up_proj.bias
    if x.shape[0] > SPLIT_GATE_UP_TOKENS:
        gate = F.linear(
            x,
            weight[2 * a : 2 * b : 2],
            None if bias is None else bias[2 * a : 2 * b : 2],
        )
        up = F.linear(
            x,
            weight[2 * a + 1 : 2 * b : 2],
            None if bias is None else bias[2 * a + 1 : 2 * b : 2],
        )
        return moe.act_fn(gate) * up
    gate_up = F.linear(
        x, weight[2 * a : 2 * b], None if bias is None else bias[2 * a : 2 * b]
    ).view(-1, b - a, 2)  # [T, w, 2]
    return moe.act_fn(gate_up[..., 0]) * gate_up[..., 1]


def _expert_forward(moe: "ToMoESparseMLP", xe: torch.Tensor, plan: list):
    """One expert on its tokens xe [Te, D], from views of its weight ranges."""
    w_down = moe.down_proj.weight  # [D, U]
    out = None
    for a, b, keep in plan:
        h = _gated(moe, xe, a, b)  # [Te, w]
        if keep is not None:
            h = h * keep  # channels of the gap that are not this expert's
        if out is None:
            out = h @ w_down[:, a:b].t()  # [Te, D]
        else:
            out.addmm_(h, w_down[:, a:b].t())
    if out is None:  # an expert without channels outputs only the bias
        out = xe.new_zeros(xe.shape[0], moe.hidden_size)
    return out


def sliced_forward(moe: "ToMoESparseMLP", x: torch.Tensor, expert_ids: torch.Tensor):
    """CPU fast path: each expert multiplies only views of its weight ranges.

    A batch whose experts would together read more than the whole union runs the
    union once and zeroes each token's foreign channels instead.
    """
    num_tokens = x.shape[0]
    overhead = slice_overhead(x.dtype, num_tokens)
    if num_tokens == 1:
        plan = expert_plan(moe, int(expert_ids[0]), overhead, x.dtype)
        out = _expert_forward(moe, x, plan)
    else:
        counts = torch.bincount(expert_ids, minlength=moe.num_experts).tolist()
        plans, sliced_cost = {}, 0.0
        for e, n in enumerate(counts):
            if n:
                plans[e] = expert_plan(moe, e, overhead, x.dtype)
                scale = _token_cost(n)
                sliced_cost += sum(overhead + (b - a) * scale for a, b, _ in plans[e])
        union_cost = 2 * overhead + moe.union_size * _token_cost(num_tokens)
        if union_cost < sliced_cost:
            masks = _token_masks(moe, x.dtype)[expert_ids]  # [T, U]
            h = _gated(moe, x, 0, moe.union_size) * masks
            out = h @ moe.down_proj.weight.t()
        else:
            order = torch.argsort(expert_ids, stable=True)
            out = x.new_empty(num_tokens, moe.hidden_size)  # [T, D]
            start = 0
            for e, n in enumerate(counts):
                if n:
                    index = order[start : start + n]
                    ye = _expert_forward(moe, x.index_select(0, index), plans[e])
                    out.index_copy_(0, index, ye)
                start += n
    if moe.down_proj.bias is not None:
        out = out + moe.down_proj.bias
    return out


# -- the module ----------------------------------------------------------------------


class ToMoESparseMLP(nn.Module):
    """
    Top-1 mixture of experts whose experts are channel subsets of one gated MLP.

    ``gate_up_proj`` holds gate and up rows interleaved (row 2c is gate channel c,
    row 2c+1 its up channel), so a contiguous channel range is one contiguous
    weight slice (the same precedent as gpt-oss's interleaved ``gate_up_proj``).
    The router output is used only for its argmax: the chosen expert's output is
    not scaled, exactly as ToMoE trains it.

    ``forward`` is the masked reference (the whole union, then each token's expert
    mask); on CPU it dispatches to ``sliced_forward``, which multiplies only views
    of the routed experts' channel ranges and computes the same result.
    """

    def __init__(
        self,
        hidden_size: int,
        union_size: int,
        num_experts: int,
        block_size: int,
        hidden_act: str = "silu",
        bias: bool = False,
    ):
        super().__init__()
        if union_size % block_size:
            raise ValueError(
                f"union_size must be a multiple of block_size, got {union_size} "
                f"and {block_size}"
            )
        self.hidden_size = hidden_size
        self.union_size = union_size
        self.num_experts = num_experts
        self.block_size = block_size
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        self.gate_up_proj = nn.Linear(hidden_size, 2 * union_size, bias=bias)
        self.down_proj = nn.Linear(union_size, hidden_size, bias=bias)
        self.act_fn = ACT2FN[hidden_act]
        blocks = torch.ones(num_experts, union_size // block_size, dtype=torch.bool)
        self.register_buffer("expert_blocks", blocks)
        self._plans_key: tuple | None = None
        self._ranges: list[list[tuple[int, int]]] = []
        self._plans: dict = {}

    def plan_cache(self) -> dict:
        """Per-layout cache of the fast path, emptied when expert_blocks changes."""
        key = (self.expert_blocks.data_ptr(), self.expert_blocks._version)
        if key != self._plans_key:
            rows = self.expert_blocks.detach().cpu().tolist()
            self._ranges = [blocks_to_ranges(r, self.block_size) for r in rows]
            self._plans = {}
            self._plans_key = key
        return self._plans

    def expert_ranges(self) -> list[list[tuple[int, int]]]:
        """Per expert, its exact channel ranges in union coordinates (cached)."""
        self.plan_cache()
        return self._ranges

    def expert_widths(self) -> torch.Tensor:
        """Channels per expert, shape [E]."""
        return self.expert_blocks.sum(dim=1) * self.block_size

    def channel_mask(self) -> torch.Tensor:
        """Per expert, which union channels it uses, shape [E, U]."""
        return self.expert_blocks.repeat_interleave(self.block_size, dim=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)  # [T, D]
        expert_ids = self.router(x).argmax(dim=-1)  # [T]
        if can_slice_weights(self, x):
            return sliced_forward(self, x, expert_ids).view(shape)
        gate_up = self.gate_up_proj(x).view(-1, self.union_size, 2)  # [T, U, 2]
        h = self.act_fn(gate_up[..., 0]) * gate_up[..., 1]  # [T, U]
        mask = self.channel_mask()[expert_ids].to(h.dtype)  # [T, U]
        if get_calibrate_all_experts_flag():
            # let observers of down_proj see every channel on every token, as
            # llm-compressor's MoE calibration does; the output uses only routed ones
            self.down_proj(h)
            weight, bias = self.down_proj.weight, self.down_proj.bias
            return F.linear(h * mask, weight.to(h.dtype), bias).view(shape)
        return self.down_proj(h * mask).view(shape)


def _replace_mlps(model: nn.Module, config) -> None:
    """Swap each decoder layer's MLP for a ToMoESparseMLP sized from the config."""
    if config.moe_union_sizes is None:
        return
    layers = model.model.layers
    if len(config.moe_union_sizes) != len(layers):
        raise ValueError(
            f"moe_union_sizes has {len(config.moe_union_sizes)} entries but the "
            f"model has {len(layers)} layers; the config.json is inconsistent"
        )
    bias = bool(getattr(config, "mlp_bias", False))
    for layer, union in zip(layers, config.moe_union_sizes):
        if union is None:  # layer left dense
            continue
        layer.mlp = ToMoESparseMLP(
            config.hidden_size,
            union,
            config.num_experts,
            config.moe_block_size,
            config.hidden_act,
            bias=bias,
        )


def _without_mlp_entries(plan: dict | None) -> dict:
    """A tensor-parallel plan without the dense MLP's entries: after conversion
    ``mlp.gate_proj/up_proj/down_proj`` no longer exist, and the experts are not
    split across devices."""
    return {k: v for k, v in (plan or {}).items() if ".mlp." not in k}


class ToMoELlamaConfig(LlamaConfig):
    """LlamaConfig plus the per-layer ToMoE expert layout."""

    model_type = "tomoe_llama"
    base_model_tp_plan = _without_mlp_entries(LlamaConfig.base_model_tp_plan)
    num_experts: int = 8
    num_experts_per_tok: int = 1
    moe_block_size: int = 64
    moe_union_sizes: list | None = None


class ToMoELlamaForCausalLM(LlamaForCausalLM):
    config_class = ToMoELlamaConfig

    def __init__(self, config):
        super().__init__(config)
        _replace_mlps(self, config)
        self.post_init()


class ToMoEMistralConfig(MistralConfig):
    """MistralConfig plus the per-layer ToMoE expert layout."""

    model_type = "tomoe_mistral"
    base_model_tp_plan = _without_mlp_entries(MistralConfig.base_model_tp_plan)
    num_experts: int = 8
    num_experts_per_tok: int = 1
    moe_block_size: int = 64
    moe_union_sizes: list | None = None


class ToMoEMistralForCausalLM(MistralForCausalLM):
    config_class = ToMoEMistralConfig

    def __init__(self, config):
        super().__init__(config)
        _replace_mlps(self, config)
        self.post_init()


class ToMoEQwen2Config(Qwen2Config):
    """Qwen2Config plus the per-layer ToMoE expert layout."""

    model_type = "tomoe_qwen2"
    base_model_tp_plan = _without_mlp_entries(Qwen2Config.base_model_tp_plan)
    num_experts: int = 8
    num_experts_per_tok: int = 1
    moe_block_size: int = 64
    moe_union_sizes: list | None = None


class ToMoEQwen2ForCausalLM(Qwen2ForCausalLM):
    config_class = ToMoEQwen2Config

    def __init__(self, config):
        super().__init__(config)
        _replace_mlps(self, config)
        self.post_init()


class ToMoEQwen3Config(Qwen3Config):
    """Qwen3Config plus the per-layer ToMoE expert layout."""

    model_type = "tomoe_qwen3"
    base_model_tp_plan = _without_mlp_entries(Qwen3Config.base_model_tp_plan)
    num_experts: int = 8
    num_experts_per_tok: int = 1
    moe_block_size: int = 64
    moe_union_sizes: list | None = None


class ToMoEQwen3ForCausalLM(Qwen3ForCausalLM):
    config_class = ToMoEQwen3Config

    def __init__(self, config):
        super().__init__(config)
        _replace_mlps(self, config)
        self.post_init()


# dense class name -> (ToMoE config class, ToMoE model class)
TOMOE_ARCHITECTURES = {
    "LlamaForCausalLM": (ToMoELlamaConfig, ToMoELlamaForCausalLM),
    "MistralForCausalLM": (ToMoEMistralConfig, ToMoEMistralForCausalLM),
    "Qwen2ForCausalLM": (ToMoEQwen2Config, ToMoEQwen2ForCausalLM),
    "Qwen3ForCausalLM": (ToMoEQwen3Config, ToMoEQwen3ForCausalLM),
}
