"""The layer-wise training modes, inside llm-compressor's sequential pipeline.

``train_mode: layerwise`` never holds more than one decoder layer's activations: the
pipeline onloads one layer at a time (the rest stays offloaded, on the CPU or on
disk through compressed-tensors' offload cache), runs the calibration data through
it, and ToMoE fits that layer's router and masks on the captured MLP inputs
(``layerwise.fit_mlp_layer``) and writes them into the layer before the pipeline
propagates its outputs to the next layer, so later layers are fitted on the inputs
the converted earlier layers produce. This is AutoRound's pattern (capture inputs,
optimise the block under ``enable_grad``, write back with the offload helpers).

Quantization modifiers later in the recipe attach their schemes in their own
``on_initialize``, before any pipeline runs, so the conversion has to be structural
by then: every target MLP becomes a ``ToMoESparseMLP`` that stores the whole MLP
(every expert all channels, which computes the dense MLP) and the fits only write
its router, expert masks and biases. Under llm-compressor's default "independent"
pipeline, ToMoE's sequential pass finishes before GPTQ's begins, so GPTQ calibrates
the converted experts. The union is not compacted (the stored MLP stays whole).

Each layer spends the same share of the budget: the global width allocation of the
in-memory start needs every layer's statistics first. ``layerwise_then_global``
follows with the end-to-end phase at the end of the pipeline, which reallocates
widths across layers (the whole model must then fit on the device).
Dimension legend: T tokens, D hidden, I MLP width, N blocks, E experts.
"""

from __future__ import annotations

import torch
from compressed_tensors.offload import update_offload_parameter
from compressed_tensors.utils import align_module_device
from loguru import logger
from torch import nn

from tomoe_modifier.distributed import gather_across_ranks
from tomoe_modifier.layerwise import FIT_CHUNK_TOKENS, fit_mlp_layer

__all__ = ["SequentialRun", "calibrate_all_experts_disabled"]


def calibrate_all_experts_disabled():
    """llm-compressor's "every expert sees every token" flag, off for the block:
    ToMoE's end-to-end phase must see the converted MLPs run as trained."""
    from compressed_tensors.utils import patch_attr
    from llmcompressor.modeling.moe import context

    return patch_attr(context, "_CALIBRATE_ALL_EXPERTS", False)


def _dense_weights(moe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate [I, D], up [I, D], down [D, I] of a structurally converted MLP (its union
    holds every channel in the dense order)."""
    with align_module_device(moe):
        gate_up = moe.gate_up_proj.weight.detach().float()
        down = moe.down_proj.weight.detach().float()
    return gate_up[0::2].cpu(), gate_up[1::2].cpu(), down.cpu()


def _channel_activations(act_fn, x, gate, up, chunk: int = FIT_CHUNK_TOKENS):
    """The dense MLP's channel activations act(x W_g^T) * (x W_u^T) [T, I], filled
    ``chunk`` tokens at a time: whole, the two projections and the activation
    would hold three more [T, I] arrays at once."""
    h = x.new_empty(len(x), gate.shape[0])
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk]
        h[start : start + chunk] = act_fn(part @ gate.t()).mul_(part @ up.t())
    return h


class SequentialRun:
    """State of one layer-wise run: the converted MLPs, their captured inputs and
    their fits (kept for the end-to-end phase of ``layerwise_then_global``)."""

    def __init__(self, moes: dict[int, nn.Module], budget_blocks: float, modifier):
        self.moes = moes  # decoder layer index -> ToMoESparseMLP
        self.budget_blocks = budget_blocks
        self.modifier = modifier
        self.captured: dict[int, list[torch.Tensor]] = {i: [] for i in moes}
        self.counts: dict[int, int] = {i: 0 for i in moes}
        self.fits: dict[int, dict] = {}
        self.handles: dict[int, object] = {}

    # -- capture ---------------------------------------------------------------------

    def attach(self) -> None:
        """Capture each converted MLP's inputs (HooksMixin: the pipeline's
        propagation passes run with these hooks disabled)."""
        for index, moe in self.moes.items():
            self.handles[index] = self.modifier.register_hook(
                moe, self._capture(index), "forward_pre"
            )

    def _capture(self, index: int):
        cap = self.modifier.warm_start_tokens

        def hook(module, args):
            if self.counts[index] >= cap:
                return
            x = args[0].reshape(-1, module.hidden_size).detach().float().cpu()
            x = x[: cap - self.counts[index]]
            self.captured[index].append(x)
            self.counts[index] += len(x)

        return hook

    # -- per layer -------------------------------------------------------------------

    def fit_layers(self, modules) -> None:
        """Fit and write every converted MLP among ``modules`` (one subgraph)."""
        for index, moe in self.moes.items():
            if index in self.fits or not any(m is moe for m in modules):
                continue
            if not self.captured[index]:
                raise RuntimeError(
                    f"No calibration inputs captured for layer {index}'s MLP; check "
                    "that the calibration data reaches the model"
                )
            handle = self.handles.pop(index, None)
            if handle is not None:
                self.modifier.remove_hooks({handle})
            # under torchrun every rank fits on all ranks' tokens: identical fits
            x = gather_across_ranks(torch.cat(self.captured.pop(index)))
            self.fits[index] = self._fit(index, moe, x)

    @torch.no_grad()
    def _fit(self, index: int, moe, x: torch.Tensor) -> dict:
        m = self.modifier
        gate, up, down = _dense_weights(moe)
        h = _channel_activations(moe.act_fn, x, gate, up)  # [T, I]
        fit = fit_mlp_layer(
            x,
            h,
            down,
            num_experts=m.num_experts,
            block_size=m.mask_block_size,
            budget_blocks=self.budget_blocks,
            seed=m.seed + index,
        )
        bias = None
        if m.expert_bias:
            bias = _closed_form_bias(h, down, fit, m.num_experts, m.mask_block_size)
        self.write(moe, fit["router"], fit["blocks"], bias)
        widths = (fit["blocks"].sum(dim=1) * m.mask_block_size).tolist()
        logger.info(
            f"ToMoE layer {index}: fitted on {len(x)} tokens, normalised MLP error "
            f"{fit['error']:.3f}, expert widths {widths}"
        )
        return {
            "router": fit["router"],
            "blocks": fit["blocks"],
            "error": fit["error"],
            "tokens": len(x),
        }

    @staticmethod
    def write(moe, router: torch.Tensor, blocks: torch.Tensor, bias=None) -> None:
        """Write a layer's routing into its (possibly offloaded) module."""
        update_offload_parameter(moe.router, "weight", router.to(moe.router.weight))
        update_offload_parameter(moe, "expert_blocks", blocks.to(moe.expert_blocks))
        if bias is not None:
            update_offload_parameter(moe, "expert_bias", bias.to(moe.expert_bias))

    def make_dense(self) -> None:
        """Every expert all channels again: the modules compute the dense MLP (the
        end-to-end phase masks them through its own hooks)."""
        for moe in self.moes.values():
            bias = (
                None if moe.expert_bias is None else torch.zeros_like(moe.expert_bias)
            )
            self.write(
                moe,
                torch.zeros_like(moe.router.weight),
                torch.ones_like(moe.expert_blocks),
                bias,
            )


def _closed_form_bias(h, down, fit, num_experts: int, block_size: int):
    """Each expert's mean dropped contribution on the tokens routed to it [E, D]."""
    choice = torch.nn.functional.one_hot(fit["assignment"], num_experts).double()
    sums = choice.t() @ h.double()  # [E, I]
    counts = choice.sum(dim=0)  # [E]
    keep = fit["blocks"].repeat_interleave(block_size, dim=1)
    dropped = sums / counts.clamp_min(1)[:, None] * (~keep).double()
    return dropped @ down.double().t()
