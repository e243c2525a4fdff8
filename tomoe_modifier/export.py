"""Stock export of the "shared" layout: a Qwen2-MoE model that transformers and vLLM
load without this package.

Why Qwen2-MoE: it has a shared expert next to the routed ones, a softmax top-k router
that with top-1 and ``norm_topk_prob`` weighs the chosen expert by exactly 1, dense
layers through ``mlp_only_layers``, and an attention that is Llama's (no q/k norms,
q/k/v biases through ``qkv_bias``, zero where the source has none, the same RoPE
and RMSNorm), so Llama,
Mistral (without a sliding window) and Qwen2 models convert exactly. Its shared
expert is gated by ``sigmoid(shared_expert_gate(x))``; ToMoE trains that gate as
``2 * sigmoid(g(x))`` (1 at the start) and the export doubles the shared down_proj,
an exact rescaling. DeepSeek-V3 (MLA) and Qwen3-MoE (q/k norms) cannot hold a Llama
attention; GLM4-MoE could, but its shared width must be a multiple of the routed
width.

The model is converted in place (oneshot and the session keep references to it):
the decoder is rebuilt as ``Qwen2MoeModel`` around the same tensors, the object's
class becomes ``Qwen2MoeForCausalLM``, and the routed experts are linearised (one
``nn.Linear`` per expert projection, as llm-compressor calibrates MoE models), which
is also the per-expert layout the checkpoint is written in.
Dimension legend: D hidden, I dense MLP width, E experts, S shared width, R routed
width per expert.
"""

from __future__ import annotations

import torch
from loguru import logger
from torch import nn

from tomoe_modifier.mappings import MLPLayout
from tomoe_modifier.router import LayerMasks, LayerRouter

__all__ = ["check_stock_export", "export_qwen2_moe", "QWEN2_MOE_ATTRIBUTES"]

# config fields copied from the dense model as they are
QWEN2_MOE_ATTRIBUTES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_dropout",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)


def check_stock_export(model: nn.Module, layout: MLPLayout) -> None:
    """ValueError unless Qwen2-MoE computes exactly what ``model``'s attention and
    norms compute; called before training, so a run never ends unexportable."""
    config = model.config
    name = type(model).__name__
    layer = model.get_submodule(layout.layers)[0]
    attention = getattr(layer, layout.attention)
    mlp = getattr(layer, layout.mlp)
    problems = []
    if hasattr(attention, "q_norm") or hasattr(attention, "k_norm"):
        problems.append("its attention has q/k norms, which Qwen2-MoE lacks")
    if getattr(attention.o_proj, "bias", None) is not None:
        problems.append("its o_proj has a bias, which Qwen2-MoE lacks")
    q, k, v = attention.q_proj, attention.k_proj, attention.v_proj
    if len({q.bias is None, k.bias is None, v.bias is None}) > 1:
        problems.append("only some of its q/k/v projections have biases")
    if any(
        getattr(mlp, p).bias is not None for p in (layout.gate_proj, layout.down_proj)
    ):
        problems.append("its MLP has biases, which Qwen2-MoE's experts lack")
    head_dim = getattr(config, "head_dim", None)
    if (
        head_dim is not None
        and head_dim != config.hidden_size // config.num_attention_heads
    ):
        problems.append(
            f"its head_dim ({head_dim}) is not hidden_size / num_attention_heads, "
            "which Qwen2-MoE assumes"
        )
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", window is not None)
    if uses_window and window is not None and window < config.max_position_embeddings:
        problems.append(f"it uses a sliding window of {window} tokens")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append("it rotates only part of each head (partial_rotary_factor)")
    if problems:
        raise ValueError(
            f"expert_layout 'shared' exports a stock Qwen2-MoE model, which cannot "
            f"reproduce {name}: {'; '.join(problems)}. Use expert_layout: paper, "
            "which keeps the model's own attention."
        )


def _qwen2_moe_config(config, qkv_bias, num_experts, shared, routed, dense):
    from transformers import Qwen2MoeConfig

    values = {k: getattr(config, k) for k in QWEN2_MOE_ATTRIBUTES if hasattr(config, k)}
    new = Qwen2MoeConfig(
        **values,
        qkv_bias=qkv_bias,
        use_sliding_window=False,
        decoder_sparse_step=1,
        mlp_only_layers=list(dense),
        num_experts=num_experts,
        num_experts_per_tok=1,
        norm_topk_prob=True,
        moe_intermediate_size=routed,
        shared_expert_intermediate_size=shared,
        output_router_logits=False,
    )
    new.architectures = ["Qwen2MoeForCausalLM"]
    new._name_or_path = config._name_or_path
    new.dtype = getattr(config, "dtype", None)
    return new


def _group_channels(masks: LayerMasks, block_size: int):
    """Shared channels [S] and each routed group's channels [E, R], sorted."""
    expand = torch.arange(block_size)

    def channels(blocks: torch.Tensor) -> torch.Tensor:
        index = blocks.nonzero().squeeze(1)
        return (index[:, None] * block_size + expand).flatten()

    shared = channels(masks.shared.bool().cpu())
    routed = torch.stack([channels(m) for m in masks.routed.bool().cpu()])
    return shared, routed


@torch.no_grad()
def export_qwen2_moe(
    model: nn.Module,
    layout: MLPLayout,
    layer_indices: list[int],
    routers: list[LayerRouter],
    masks: list[LayerMasks],
    block_size: int,
) -> dict:
    """
    Turn ``model`` (dense, with trained shared-layout routers and noise-free
    masks per converted layer) into a ``Qwen2MoeForCausalLM`` in place.

    :return: {"shared_size": S, "routed_size": R} in channels
    """
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from transformers import Qwen2MoeForCausalLM
    from transformers.models.qwen2_moe.modeling_qwen2_moe import (
        Qwen2MoeRotaryEmbedding,
    )

    config = model.config
    layers = model.get_submodule(layout.layers)
    groups = {i: _group_channels(m, block_size) for i, m in zip(layer_indices, masks)}
    widths = {(len(s), r.shape[1]) for s, r in groups.values()}
    if len(widths) != 1:
        raise RuntimeError(f"shared layout widths differ between layers: {widths}")
    ((shared_size, routed_size),) = widths
    num_experts = routers[0].gate.out_features
    dense = [i for i in range(len(layers)) if i not in groups]
    qkv_bias = getattr(layers[0], layout.attention).q_proj.bias is not None
    new_config = _qwen2_moe_config(
        config, True, num_experts, shared_size, routed_size, dense
    )

    state = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if f".{layout.mlp}." not in name or not name.startswith(layout.layers):
            state[name] = tensor  # embeddings, attention, norms, lm_head: shared
    if not qkv_bias:
        # vLLM 0.32's Qwen2-MoE always builds q/k/v biases and leaves absent ones
        # uninitialised (NaN output), so the export carries explicit zero biases
        for i, layer in enumerate(layers):
            attention = getattr(layer, layout.attention)
            for proj in ("q_proj", "k_proj", "v_proj"):
                linear = getattr(attention, proj)
                state[f"{layout.layers}.{i}.{layout.attention}.{proj}.bias"] = (
                    linear.weight.new_zeros(linear.out_features)
                )
    for i, layer in enumerate(layers):
        prefix = f"{layout.layers}.{i}.mlp"
        mlp = getattr(layer, layout.mlp)
        gate = getattr(mlp, layout.gate_proj).weight  # [I, D]
        up = getattr(mlp, layout.up_proj).weight  # [I, D]
        down = getattr(mlp, layout.down_proj).weight  # [D, I]
        if i not in groups:
            state[f"{prefix}.gate_proj.weight"] = gate
            state[f"{prefix}.up_proj.weight"] = up
            state[f"{prefix}.down_proj.weight"] = down
            continue
        shared, routed = groups[i]
        router = routers[layer_indices.index(i)]
        state[f"{prefix}.gate.weight"] = router.gate.weight.to(gate.dtype)  # [E, D]
        state[f"{prefix}.experts.gate_up_proj"] = torch.cat(
            [gate[routed], up[routed]], dim=1
        )  # [E, 2R, D]
        state[f"{prefix}.experts.down_proj"] = down[:, routed].permute(1, 0, 2)
        state[f"{prefix}.shared_expert.gate_proj.weight"] = gate[shared]  # [S, D]
        state[f"{prefix}.shared_expert.up_proj.weight"] = up[shared]
        # 2 * sigmoid(g) in training == sigmoid(g) times a doubled down_proj
        state[f"{prefix}.shared_expert.down_proj.weight"] = 2 * down[:, shared]
        state[f"{prefix}.shared_expert_gate.weight"] = router.shared_gate.weight.to(
            gate.dtype
        )

    device = next(model.parameters()).device
    with torch.device("meta"):
        stock = Qwen2MoeForCausalLM(new_config)
    state = {
        k: nn.Parameter(v.contiguous(), requires_grad=False) for k, v in state.items()
    }
    if new_config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    stock.load_state_dict(state, strict=True, assign=True)
    stock.model.rotary_emb = Qwen2MoeRotaryEmbedding(new_config, device=device)

    old_type = config.model_type
    model.__class__ = Qwen2MoeForCausalLM
    model._modules = stock._modules
    model.config = new_config
    model.router_aux_loss_coef = new_config.router_aux_loss_coef
    model.num_experts = num_experts
    model.num_experts_per_tok = 1
    model.requires_grad_(False)
    linearize_moe(model)
    logger.info(
        f"Updated config.model_type: {old_type} -> qwen2_moe; architectures -> "
        f"['Qwen2MoeForCausalLM'] (per layer: shared expert {shared_size} + "
        f"{num_experts} routed experts of {routed_size} channels, top-1)"
    )
    return {"shared_size": shared_size, "routed_size": routed_size}
