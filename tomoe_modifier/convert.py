"""Module surgery: replace trained gated MLPs by ToMoESparseMLP and edit the config.

Deterministic by construction: routing is the router's argmax and expert masks are
the thresholded decoder logits (no Gumbel noise), so the converted model computes
exactly what the trained gates compute with noise off.
Dimension legend: D hidden, I intermediate, U union width, E experts, N blocks.
"""

from __future__ import annotations

import torch
from loguru import logger
from torch import nn

from tomoe_modifier.distributed import barrier
from tomoe_modifier.mappings import MLPLayout
from tomoe_modifier.modeling_tomoe import (
    TOMOE_ARCHITECTURES,
    ToMoESparseMLP,
    _gate_up_rows,
    prune_qk_dims,
)
from tomoe_modifier.router import ExpertHypernetwork, LayerMasks, LayerRouter, QKPruner

__all__ = [
    "final_layer_masks",
    "final_qk_dims",
    "prune_attention",
    "order_union_blocks",
    "union_storage_order",
    "build_sparse_mlp",
    "store_in_union_order",
    "convert_model",
]


@torch.no_grad()
def final_layer_masks(
    hypernet: ExpertHypernetwork, routers: list[LayerRouter], temperature: float
) -> list[LayerMasks]:
    """Noise-free masks per converted layer (bool): what conversion exports."""
    embeddings = hypernet()  # [L, E, K]
    masks = []
    for i, router in enumerate(routers):
        experts, shared = router.layer_masks(embeddings[i], temperature, noise=False)
        masks.append(
            LayerMasks(experts.bool(), None if shared is None else shared.bool())
        )
    return masks


@torch.no_grad()
def final_qk_dims(pruners: list[QKPruner], temperature: float) -> list[torch.Tensor]:
    """Per pruned layer, the kept head dims (noise off): pairs P then P + hd/2."""
    dims = []
    for pruner in pruners:
        pairs = pruner.pair_mask(temperature, noise=0.0).bool().nonzero().squeeze(1)
        half = pruner.logits.numel()
        dims.append(torch.cat([pairs, pairs + half]))
    return dims


def prune_attention(
    model: nn.Module, layout: MLPLayout, layer_indices: list[int], dims: list
) -> list[int | None]:
    """Delete the pruned q/k head dims of ``layer_indices`` in place; returns the
    kept dims per decoder layer (None: unpruned), for ``config.moe_qk_dims``."""
    layers = model.get_submodule(layout.layers)
    kept: list[int | None] = [None] * len(layers)
    for index, layer_dims in zip(layer_indices, dims):
        attention = getattr(layers[index], layout.attention)
        before = attention.head_dim
        prune_qk_dims(attention, layer_dims)
        kept[index] = int(layer_dims.numel())
        logger.info(
            f"ToMoE pruned {layout.layers}.{index}.{layout.attention}: q/k head dims "
            f"{before} -> {kept[index]}"
        )
    return kept


def order_union_blocks(masks: torch.Tensor) -> list[int]:
    """
    Storage order for the blocks any expert uses, chosen so each expert covers few
    contiguous runs: blocks are sorted by the reflected-Gray-code rank of their
    expert membership (widest expert as the most significant bit), so blocks with
    the same membership sit together, neighbouring groups differ in one expert,
    and the widest experts are split least. masks: bool [E, N].
    """
    widths = masks.sum(dim=1).tolist()
    significance = sorted(range(masks.shape[0]), key=lambda e: -widths[e])
    members = masks[significance].t().tolist()  # [N][E], most significant first

    def gray_rank(bits: list[bool]) -> int:
        rank, parity = 0, 0
        for bit in bits:
            parity ^= int(bit)
            rank = 2 * rank + parity
        return rank

    used = [j for j in range(masks.shape[1]) if any(members[j])]
    return sorted(used, key=lambda j: gray_rank(members[j]))


def block_channels(blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """The channels of ``blocks`` [N], block by block: [N * block_size]."""
    return (blocks[:, None] * block_size + torch.arange(block_size)).flatten()


def union_storage_order(
    masks: torch.Tensor, block_size: int, width_multiple: int = 1
) -> list[int]:
    """
    The blocks a converted MLP stores, in order: the used ones in
    ``order_union_blocks``' order, then as few unused ones as pad the union to a
    multiple of ``width_multiple`` channels (the quantization group size), so
    down_proj's input features split into whole groups. masks: bool [E, N].
    """
    order = order_union_blocks(masks)
    blocks_per_multiple = max(1, width_multiple // block_size)
    padded = -(-len(order) // blocks_per_multiple) * blocks_per_multiple
    used = set(order)
    unused = [j for j in range(masks.shape[1]) if j not in used]
    return order + unused[: max(0, padded - len(order))]


@torch.no_grad()
def build_sparse_mlp(
    mlp: nn.Module,
    layout: MLPLayout,
    router: nn.Linear,
    masks: torch.Tensor,
    block_size: int,
    hidden_act: str,
    width_multiple: int = 1,
    expert_bias: torch.Tensor | None = None,
) -> ToMoESparseMLP:
    """
    Slice a dense gated MLP to the union of its experts. masks: bool [E, N].

    The union is stored in ``union_storage_order``; its padding is never computed.
    """
    gate = getattr(mlp, layout.gate_proj)
    up = getattr(mlp, layout.up_proj)
    down = getattr(mlp, layout.down_proj)
    blocks = torch.tensor(
        union_storage_order(masks, block_size, width_multiple), dtype=torch.long
    )
    channels = block_channels(blocks, block_size)
    num_experts, hidden = masks.shape[0], gate.in_features
    union = channels.numel()
    moe = ToMoESparseMLP(
        hidden,
        union,
        num_experts,
        block_size,
        hidden_act,
        bias=gate.bias is not None,
        expert_bias=expert_bias is not None,
    )
    moe.to(device=gate.weight.device, dtype=gate.weight.dtype)
    channels = channels.to(gate.weight.device)
    gate_up = torch.stack([gate.weight[channels], up.weight[channels]], dim=1)
    moe.gate_up_proj.weight.copy_(gate_up.reshape(2 * union, hidden))  # [2U, D]
    moe.down_proj.weight.copy_(down.weight[:, channels])  # [D, U]
    if gate.bias is not None:
        gate_up_bias = torch.stack([gate.bias[channels], up.bias[channels]], dim=1)
        moe.gate_up_proj.bias.copy_(gate_up_bias.flatten())
        moe.down_proj.bias.copy_(down.bias)
    moe.router.weight.copy_(router.weight.to(moe.router.weight.dtype))
    moe.expert_blocks.copy_(masks[:, blocks.to(masks.device)])
    if expert_bias is not None:
        moe.expert_bias.copy_(expert_bias)
    moe.requires_grad_(False)
    return moe


@torch.no_grad()
def store_in_union_order(moe: ToMoESparseMLP, width_multiple: int = 1) -> None:
    """
    Rewrite an already converted MLP's channel blocks into ``order_union_blocks``'
    storage order and drop the blocks no expert uses (but the padding to
    ``width_multiple`` channels of ``union_storage_order``), in place and
    offload-aware.
    The layer-wise modes convert the structure before training, in the dense channel
    order and with every channel, where every expert is spread over hundreds of runs;
    in this order the CPU fast path multiplies most experts' channels as a few views
    of the weights instead of gathering their rows, and the checkpoint (and memory)
    no longer carries channels that no token can reach. The MLP computes the same.
    """
    from compressed_tensors.utils import align_module_device

    with align_module_device(moe):
        blocks = moe.expert_blocks.detach().cpu()
        order = union_storage_order(blocks, moe.block_size, width_multiple)
        if order == list(range(blocks.shape[1])):
            return
        index = torch.tensor(order)
        channels = block_channels(index, moe.block_size)
        rows = _gate_up_rows(channels)
        new = {
            (moe.gate_up_proj, "weight"): (moe.gate_up_proj.weight, rows, 0),
            (moe.down_proj, "weight"): (moe.down_proj.weight, channels, 1),
            (moe, "expert_blocks"): (moe.expert_blocks, index, 1),
        }
        if moe.gate_up_proj.bias is not None:
            new[(moe.gate_up_proj, "bias")] = (moe.gate_up_proj.bias, rows, 0)
        if moe.shared_gate is not None:
            new[(moe, "shared_blocks")] = (moe.shared_blocks, index, 0)
        new = {
            key: value.index_select(dim, i.to(value.device))
            for key, (value, i, dim) in new.items()
        }
    # under torchrun the ranks may share these tensors: every rank has read them
    # before any writes (each writes the same values), else some are permuted twice
    barrier()
    for (module, name), value in new.items():
        _replace_tensor(module, name, value)
    union = len(order) * moe.block_size
    moe.union_size = union
    moe.gate_up_proj.out_features = 2 * union
    moe.down_proj.in_features = union


def _replace_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """``update_offload_parameter`` for a tensor that may change shape: an offload
    cache offloads a value of a new size as a new tensor; a plain module takes a new
    parameter or buffer."""
    from compressed_tensors.offload import update_offload_parameter
    from compressed_tensors.offload.cache import OffloadCache

    current = getattr(module, name)
    if current.shape == value.shape:
        update_offload_parameter(module, name, value)
        return
    if name in module._parameters:
        value = nn.Parameter(value, requires_grad=False)
    if isinstance(module._parameters, OffloadCache):
        cache = module._parameters if name in module._parameters else module._buffers
        cache[name] = value
    else:
        setattr(module, name, value)


def match_offloading(new: nn.Module, old: nn.Module) -> None:
    """Offload ``new`` like ``old`` (compressed-tensors offloading: CPU or disk), so a
    converted MLP of an offloaded model does not stay resident.

    The cache to copy is that of a module that holds weights: the dispatcher gives
    weightless containers (the MLP itself, the decoder layer) an empty CPU cache
    even when every weight is on disk, and copying that one kept every converted
    MLP in host memory.
    """
    from compressed_tensors.offload import get_cache_init_kwargs, offload_module
    from compressed_tensors.offload.cache import OffloadCache

    like = next(
        (
            m
            for m in old.modules()
            if isinstance(m._parameters, OffloadCache) and len(m._parameters) > 0
        ),
        None,
    )
    if like is None:
        return
    kwargs = get_cache_init_kwargs(like)
    for module in new.modules():
        if module._parameters or module._buffers:
            offload_module(module, **kwargs)


def convert_model(
    model: nn.Module,
    arch: str,
    layout: MLPLayout,
    layer_indices: list[int],
    routers: list[LayerRouter],
    masks: list[torch.Tensor],
    block_size: int,
    num_experts: int,
    width_multiple: int = 1,
    expert_biases: list[torch.Tensor] | None = None,
) -> list[int]:
    """
    Replace the MLPs of ``layer_indices`` in place and turn ``model`` into the
    registered ToMoE architecture. Returns the union width of each converted layer.
    ``expert_biases[l]`` [E, D] adds each expert's output correction.
    """
    config = model.config
    layers = model.get_submodule(layout.layers)
    union_sizes: list[int | None] = [None] * len(layers)
    biases = expert_biases or [None] * len(layer_indices)
    for index, router, mask, bias in zip(layer_indices, routers, masks, biases):
        layer = layers[index]
        dense = getattr(layer, layout.mlp)
        moe = build_sparse_mlp(
            dense,
            layout,
            router.gate,
            mask,
            block_size,
            config.hidden_act,
            width_multiple,
            bias,
        )
        match_offloading(moe, dense)
        setattr(layer, layout.mlp, moe)
        union_sizes[index] = moe.union_size
        widths = moe.expert_widths().tolist()
        logger.info(
            f"ToMoE converted {layout.layers}.{index}.{layout.mlp}: "
            f"{dense_width(dense, layout)} -> union {moe.union_size} channels, "
            f"expert widths {widths}"
        )
    config_cls, model_cls = TOMOE_ARCHITECTURES[arch]
    old_type = config.model_type
    config.__class__ = config_cls  # in place: every module holding it sees the change
    if "model_type" in vars(config):  # from_pretrained may pin it on the instance
        config.model_type = config_cls.model_type
    config.num_experts = num_experts
    config.num_experts_per_tok = 1  # top-1 routing; MoE tools read this key
    config.moe_block_size = block_size
    config.moe_expert_bias = expert_biases is not None
    config.moe_union_sizes = union_sizes
    config.architectures = [model_cls.__name__]
    model.__class__ = model_cls
    logger.info(
        f"Updated config.model_type: {old_type} -> {config.model_type}; "
        f"architectures -> {config.architectures}"
    )
    return [u for u in union_sizes if u is not None]


def dense_width(mlp: nn.Module, layout: MLPLayout) -> int:
    return getattr(mlp, layout.gate_proj).out_features
