from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from compressed_tensors.utils import match_named_modules
from llmcompressor.core import State
from llmcompressor.modifiers import Modifier
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator, model_validator
from torch import nn

from tomoe_modifier.budget import Budget, count_budget
from tomoe_modifier.convert import (
    convert_model,
    final_layer_masks,
    final_qk_dims,
    prune_attention,
    store_in_union_order,
)
from tomoe_modifier.correction import expert_output_biases
from tomoe_modifier.distributed import broadcast_parameters, is_main_process
from tomoe_modifier.export import check_stock_export, export_qwen2_moe
from tomoe_modifier.mappings import MLPLayout, get_layout
from tomoe_modifier.modeling_tomoe import QK_PRUNED_ATTENTION
from tomoe_modifier.precision import choose_compute_dtype
from tomoe_modifier.quant_groups import following_group_size
from tomoe_modifier.router import QKPruner, build_routers
from tomoe_modifier.sequential import SequentialRun, calibrate_all_experts_disabled
from tomoe_modifier.train import GatedMLPs, TrainSettings, frozen, train_routers
from tomoe_modifier.warm_start import (
    KEEP_MARGIN,
    activation_start,
    layerwise_start,
    set_block_logits,
)

__all__ = ["ToMoEModifier"]


# the smallest value each numeric field accepts (None stays allowed where it is
# the default)
LOWER_BOUNDS = {
    "num_experts": 2,
    "width_multiple": 1,
    "mask_block_size": 1,
    "epochs": 1,
    "iters": 1,
    "log_every": 1,
    "warm_start_tokens": 1,
    "teacher_samples": 1,
    "train_window": 2,
    "long_window_every": 0,
    "hidden_distill_weight": 0,
}


class ToMoEModifier(Modifier):
    """
    Convert each targeted dense MLP into a top-1 mixture of experts whose experts are
    channel subsets of that MLP, with a fixed budget of active parameters and no
    change to the model's weights (ToMoE, https://arxiv.org/abs/2501.15316).

    Small routers and a hypernetwork (a bidirectional GRU that emits one embedding
    per layer and expert) are trained on the calibration data against the frozen
    model: self-distillation from the dense model (the same model with gates off)
    plus a two-sided budget loss on the active-parameter ratio, an expert-union
    coverage loss and a load-balance loss. The trained gates are then frozen
    without noise and each MLP is sliced to the union of its experts.

    Sample yaml:

    ```yaml
    tomoe_stage:
      tomoe_modifiers:
        ToMoEModifier:
          target_active_ratio: 0.5
          num_experts: 8
          iters: 300
          lr: 0.01
    ```

    Lifecycle:
        - on_initialize
            - _plan: validate the model, the widths, the calibration data and the
              budget (fail fast, before any training), count the budget
            - build_routers; freeze the model (train.frozen)
            - warm_start.activation_start or layerwise_start (``warm_start``)
            - train_routers (self-distillation + budget + union + balance)
            - convert_model: slice MLPs into ToMoESparseMLP, swap config/class
        - on_finalize
            - nothing (all work is done before any calibration pipeline runs, so a
              quantization modifier later in the recipe sees the experts)

    :param train_mode: "global" trains every router end to end through the whole
        model in ``on_initialize`` (the model must fit on the device with training
        activations); "layerwise" fits one decoder layer at a time on its captured
        inputs inside llm-compressor's sequential pipeline, with the rest offloaded
        (see ``sequential.py``; "paper" layout); "layerwise_then_global" adds the
        end-to-end phase at the end of that pipeline, for models that fit
    :param expert_layout: "paper": each expert is any subset of the MLP's channels
        (overlapping, learned widths), saved as this package's ToMoE architecture;
        "shared": an always-on gated shared set plus E disjoint routed groups of
        equal width per MLP (the widths follow from the target ratio; which channel
        goes where is trained), saved as a stock Qwen2-MoE model that transformers
        and vLLM load without this package (Llama, Mistral, Qwen2 attention)
    :param targets: MLP modules to convert (matched against ``model.layers.N.mlp``)
    :param ignore: MLP modules to leave dense
    :param num_experts: experts per converted MLP, at least 2
    :param target_active_ratio: active attention+MLP parameters per token divided by
        the dense count, in (0, 1]; attention stays dense, so it must exceed the
        attention share
    :param width_multiple: each converted MLP's stored width (the union of its
        experts) is padded to a multiple of this with channels no expert uses, so
        that group quantization finds down_proj's input groups whole; in the
        "shared" layout it is also the granularity of the shared and routed widths.
        Unset: the weight group size of the quantization modifiers later in the
        same recipe (``quant_groups.py``), else 1 ("paper": no padding, the
        smallest folder) or 64 ("shared"). Set it to the group size when a
        separate, later oneshot call quantizes the checkpoint
    :param mask_block_size: channels per mask entry. 1 (the paper's per-channel
        masks) is the default and by far the most accurate: neighbouring channel
        indices are unrelated, so coarse blocks drop useful channels wholesale
    :param epochs: passes over the calibration set (ignored if ``iters`` is set)
    :param iters: optimizer steps; defaults to ``epochs`` passes over the data
    :param lr: AdamW learning rate of the routers and hypernetwork
    :param weight_decay: AdamW weight decay
    :param distill_weight: weight of KL(dense || gated) (the official code uses 2)
    :param budget_weight: weight of |log(active_ratio / target_active_ratio)|
    :param union_weight: weight of the expert-union coverage loss
    :param balance_weight: weight of the load-balance loss
    :param temperature: Gumbel-softmax / Gumbel-sigmoid temperature
    :param noise_anneal: final fraction of the steps over which the Gumbel noise
        decays linearly to 0, so training ends on the deterministic routing and
        masks that conversion exports (0 keeps the paper's constant noise). Unset:
        0.25, or 1.0 with ``train_mode: layerwise_then_global``, whose end-to-end
        phase starts from a noise-free layer-wise fit: on SmolLM2 at p = 0.5 and 300
        steps, 0.25 ended at 7.6x dense perplexity (the KL doubled as the noise
        fell to 0 in the last 75 steps) and 1.0 at 3.0x
    :param lr_schedule: "constant" (the paper's) or "cosine" decay to 0
    :param mask_offset: logit offset that makes training start from the dense model
    :param compute_dtype: "auto" picks bfloat16 where the device runs it faster
        than float32 (a CUDA GPU with bf16, a CPU with AMX; AVX512_BF16 alone ran
        a training step 1.5x slower); routers always stay in float32
    :param warm_start: "activation" starts the routers as nearest-centroid
        routing over k-means clusters of the MLP inputs and each expert at the target
        width with the blocks that matter most on its cluster (one dense pass over
        ``warm_start_tokens`` calibration tokens); "layerwise" allocates the widths
        over the whole model by the output energy each (layer, expert, channel)
        carries and fits each layer's router and masks to reproduce its dense MLP on
        the captured inputs (``layerwise.py``) before the end-to-end phase;
        "dense" is the paper's start (all
        channels kept, random routers), which needs far more training tokens
    :param warm_start_tokens: calibration tokens used by the warm start
    :param warm_start_widths: how the layer-wise start sizes the experts: "global"
        allocates the widths over the whole model by output energy (layers whose
        energy is spread over many channels can be left almost empty); "per_layer"
        gives every layer the same mean width (split among its experts by energy)
        and leaves the reallocation across layers to the end-to-end phase
    :param attention_pruning: also prune q/k head dims statically, shared by every
        head of a layer and kept in RoPE pairs (the paper's attention pruning),
        learned under the same target as the MLP widths and deleted from q_proj and
        k_proj at conversion ("paper" layout; Llama, Mistral, Qwen2 attention)
    :param expert_bias: after training, give each expert the mean contribution of
        the channels it drops as an output bias (closed form on ``warm_start_tokens``
        calibration tokens; FLAP-style; "paper" layout only)
    :param hidden_distill_weight: weight of an extra normalised MSE between the
        gated and the dense model's final hidden states (0: logits only)
    :param teacher_cache: "sampled" keeps the dense teacher's targets of every
        calibration row seen (``teacher_samples`` tokens drawn from its distribution
        per position, an unbiased stand-in for the full logits), so a row drawn
        again costs no teacher forward; "none" runs the teacher every step
    :param teacher_samples: tokens drawn per position for the teacher cache
    :param train_window: cut calibration rows longer than this into windows of this
        many tokens for training (None: train on the rows as given)
    :param long_window_every: with ``train_window``, every this-many-th step trains
        on the whole rows instead (0: never), mixing long contexts into short ones
    :param seed: seeds router initialisation and the Gumbel noise; in the
        layer-wise modes also torch's global RNG at calibration start, from which
        llm-compressor's sampler draws which calibration rows the layer fits see
    :param log_every: log one line of losses every this many steps
    :param report_path: optional JSON file for the loss history and expert layout
    """

    requires_calibration_data: bool = False  # ToMoE runs its own loop in on_initialize

    train_mode: Literal["global", "layerwise", "layerwise_then_global"] = "global"
    expert_layout: Literal["paper", "shared"] = "paper"
    targets: list[str] = Field(default_factory=lambda: ["re:.*mlp$"])
    ignore: list[str] = Field(default_factory=list)
    num_experts: int = 8
    target_active_ratio: float = 0.5
    width_multiple: int | None = None  # see _resolve_width_multiple
    mask_block_size: int = 1
    epochs: int = 1
    iters: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.05
    distill_weight: float = 2.0
    budget_weight: float = 16.0
    union_weight: float = 3.0
    balance_weight: float = 1.0
    temperature: float = 0.4
    noise_anneal: float | None = None  # see _resolve_defaults
    lr_schedule: Literal["constant", "cosine"] = "constant"
    mask_offset: float = 3.0
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    warm_start: Literal["activation", "layerwise", "dense"] = "activation"
    warm_start_tokens: int = 4096
    warm_start_widths: Literal["global", "per_layer"] = "global"
    expert_bias: bool = False
    attention_pruning: bool = False
    hidden_distill_weight: float = 0.0
    teacher_cache: Literal["none", "sampled"] = "none"
    teacher_samples: int = 64
    train_window: int | None = None
    long_window_every: int = 0
    seed: int = 0
    log_every: int = 10
    report_path: str | None = None

    # private variables
    _report: dict = PrivateAttr(default_factory=dict)
    _sequential: object | None = PrivateAttr(default=None)  # layer-wise run state

    # -- validation ------------------------------------------------------------

    @field_validator("targets", "ignore", mode="before")
    @classmethod
    def _as_list(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator(*LOWER_BOUNDS)
    @classmethod
    def _check_lower_bound(cls, value, info):
        low = LOWER_BOUNDS[info.field_name]
        if value is not None and value < low:
            optional = (
                " or None" if cls.model_fields[info.field_name].default is None else ""
            )
            raise ValueError(
                f"{info.field_name} must be >= {low}{optional}, got {value}"
            )
        return value

    @field_validator("target_active_ratio")
    @classmethod
    def _check_ratio(cls, value: float) -> float:
        if not 0 < value <= 1:
            raise ValueError(f"target_active_ratio must be in (0, 1], got {value}")
        return value

    @field_validator("noise_anneal")
    @classmethod
    def _check_fraction(cls, value: float | None) -> float | None:
        if value is not None and not 0 <= value <= 1:
            raise ValueError(f"noise_anneal must be in [0, 1], got {value}")
        return value

    @model_validator(mode="after")
    def _choose_pipeline(self):
        # the layer-wise modes run inside llm-compressor's sequential pipeline,
        # which a modifier asks for by requiring calibration data; "global" runs its
        # own loop in on_initialize and takes the data-free pipeline
        self.requires_calibration_data = self.train_mode != "global"
        return self

    @model_validator(mode="after")
    def _resolve_defaults(self):
        # defaults that depend on another field, resolved once here so the
        # trainer and the saved recipe see the value used
        if self.noise_anneal is None:
            after_fit = self.train_mode == "layerwise_then_global"
            self.noise_anneal = 1.0 if after_fit else 0.25
        return self

    def _resolve_width_multiple(self) -> None:
        # resolved when the session's recipe, with the modifiers after this one,
        # exists; written back so the saved recipe shows the value used
        if self.width_multiple is None:
            group = following_group_size(self)
            fallback = 64 if self.expert_layout == "shared" else 1
            self.width_multiple = group or fallback
            why = "its group quantization" if group else "no group quantization"
            logger.info(f"ToMoE width_multiple {self.width_multiple}: {why} follows")

    @model_validator(mode="before")
    @classmethod
    def _renamed_fields(cls, values):
        renamed = {"init_strategy": "warm_start", "init_tokens": "warm_start_tokens"}
        if isinstance(values, dict):
            for old, new in renamed.items():
                if old in values:
                    warnings.warn(
                        f"ToMoEModifier.{old} is deprecated. Old API: {old}: ...; "
                        f"New API: {new}: ...",
                        DeprecationWarning,
                        stacklevel=2,
                    )
                    values = {**values, new: values[old]}
                    values.pop(old)
        return values

    @field_validator("lr", "temperature")
    @classmethod
    def _check_positive_float(cls, value: float, info) -> float:
        if not value > 0:
            raise ValueError(f"{info.field_name} must be > 0, got {value}")
        return value

    # -- lifecycle --------------------------------------------------------------

    def on_initialize(self, state: State, **kwargs) -> bool:
        model = state.model
        self._resolve_width_multiple()
        plan = self._plan(model, state.data.calib)  # fail fast, before training
        logger.info(
            f"ToMoE initialized: {plan.arch}, {len(plan.mlps)} MLPs -> "
            f"{self.num_experts} experts each, blocks of {self.mask_block_size} "
            f"channels, target active ratio {self.target_active_ratio} "
            f"(attention+router floor {plan.budget.ratio(0):.3f}), "
            f"{plan.settings.steps} steps, compute {plan.settings.compute_dtype}, "
            f"{self.train_mode} training"
        )
        if self.train_mode != "global":
            self._prepare_sequential(model, plan)
            return True
        routers, masks, qk_dims, history = self._train(model, plan)
        biases = self._expert_biases(model, plan, routers, masks)
        if self.expert_layout == "shared":
            layout = export_qwen2_moe(
                model, plan.layout, plan.indices, routers, masks, self.mask_block_size
            )
        else:
            layout = {
                "union_sizes": convert_model(
                    model,
                    plan.arch,
                    plan.layout,
                    plan.indices,
                    routers,
                    [m.experts for m in masks],
                    self.mask_block_size,
                    self.num_experts,
                    self.width_multiple,
                    biases,
                )
            }
        if qk_dims is not None:
            kept = prune_attention(model, plan.layout, plan.indices, qk_dims)
            model.config.moe_qk_dims = kept
            layout["qk_dims"] = kept
        block = self.mask_block_size
        widths = [(m.experts.sum(dim=1) * block).tolist() for m in masks]
        self._report = {
            "architecture": plan.arch,
            "expert_layout": self.expert_layout,
            "target_active_ratio": self.target_active_ratio,
            "layers": plan.indices,
            **layout,
            "expert_widths": widths,
            **plan.budget.summary(widths),
            "compute_dtype": str(plan.settings.compute_dtype),
            **history,
        }
        logger.info(
            f"ToMoE done in {history['train_seconds']:.0f}s on {history['tokens']} "
            f"tokens: active ratio "
            f"{self._report['active_ratio_uniform_routing']:.3f} with uniform "
            f"routing, {self._report['active_ratio_worst_case']:.3f} worst case "
            f"(target {self.target_active_ratio})"
        )
        self._write_report()
        return True

    def _new_routers(self, model: nn.Module, plan: "_Plan"):
        """The hypernetwork and one router per converted MLP (seed first)."""
        return build_routers(
            model.config.hidden_size,
            self.num_experts,
            [plan.width(m) // self.mask_block_size for m in plan.mlps],
            self.mask_offset,
            plan.device,
            shared=plan.shared_blocks,
        )

    def _train(self, model: nn.Module, plan: "_Plan"):
        """Build, warm-start and train the routers; return them, the noise-free
        expert masks and the training history."""
        with _seeded(self.seed, plan.device):
            hypernet, routers = self._new_routers(model, plan)
            attentions, pruners = None, None
            if self.attention_pruning:
                attentions = plan.attentions
                pruners = [QKPruner(a.head_dim).to(plan.device) for a in attentions]
            gates = GatedMLPs(
                plan.mlps,
                plan.downs,
                routers,
                self.mask_block_size,
                self.temperature,
                attentions,
                pruners,
            )
            with frozen(model):
                warm = None
                if self.warm_start == "layerwise":
                    warm = layerwise_start(
                        model,
                        plan.mlps,
                        plan.downs,
                        routers,
                        hypernet,
                        plan.loader,
                        budget=plan.budget,
                        target_active_ratio=self.target_active_ratio,
                        block_size=self.mask_block_size,
                        num_tokens=self.warm_start_tokens,
                        seed=self.seed,
                        device=plan.device,
                        widths_over=self.warm_start_widths,
                    )
                elif self.warm_start == "activation":
                    activation_start(
                        model,
                        plan.mlps,
                        plan.downs,
                        routers,
                        plan.loader,
                        block_size=self.mask_block_size,
                        channel_fraction=plan.budget.channel_fraction(
                            self.target_active_ratio
                        ),
                        mask_offset=self.mask_offset,
                        num_tokens=self.warm_start_tokens,
                        seed=self.seed,
                        device=plan.device,
                    )
                # ranks warm-started on their own shards: all start from rank 0's
                broadcast_parameters([hypernet, *routers, *(pruners or [])])
                with gates:
                    history = train_routers(
                        model,
                        gates,
                        hypernet,
                        plan.budget,
                        plan.loader,
                        plan.settings,
                        plan.device,
                    )
        if warm is not None:
            history["warm_start"] = warm
        routers = [r.eval() for r in routers]
        masks = final_layer_masks(hypernet.eval(), routers, self.temperature)
        qk_dims = None if pruners is None else final_qk_dims(pruners, self.temperature)
        return routers, masks, qk_dims, history

    # -- the layer-wise modes (sequential pipeline) -------------------------------

    def _prepare_sequential(self, model: nn.Module, plan: "_Plan") -> None:
        """Convert structurally now (every expert all channels, so later
        quantizers attach to the final modules); the fits come per layer."""
        if self.expert_layout != "paper" or self.attention_pruning:
            raise NotImplementedError(
                f"train_mode {self.train_mode} supports expert_layout: paper without "
                "attention_pruning (both change module shapes after a later "
                "quantizer has attached to them); use train_mode: global"
            )
        with _seeded(self.seed, plan.device):
            hypernet, routers = self._new_routers(model, plan)
        hidden = model.config.hidden_size
        holders = []
        for _ in plan.indices:
            holder = nn.Module()
            holder.gate = nn.Linear(hidden, self.num_experts, bias=False)
            nn.init.zeros_(holder.gate.weight)
            holders.append(holder)
        full = [
            torch.ones(
                self.num_experts,
                plan.width(m) // self.mask_block_size,
                dtype=torch.bool,
            )
            for m in plan.mlps
        ]
        biases = None
        if self.expert_bias:
            biases = [torch.zeros(self.num_experts, hidden) for _ in plan.indices]
        convert_model(
            model,
            plan.arch,
            plan.layout,
            plan.indices,
            holders,
            full,
            self.mask_block_size,
            self.num_experts,
            1,
            biases,
        )
        layers = model.get_submodule(plan.layout.layers)
        moes = {i: getattr(layers[i], plan.layout.mlp) for i in plan.indices}
        blocks = plan.width(plan.mlps[0]) // self.mask_block_size
        budget_blocks = plan.budget.channel_fraction(self.target_active_ratio) * blocks
        run = SequentialRun(moes, budget_blocks, self)
        run.plan, run.hypernet, run.routers = plan, hypernet, routers
        run.start = time.perf_counter()
        self._sequential = run

    def on_calibration_start(self, state: State, event, **kwargs) -> None:
        if self._sequential is not None:
            # the sequential pipeline caches the calibration batches right after
            # this event, in the order of llm-compressor's RandomSampler, which has
            # no generator of its own (and state.data.calib is a copy of the
            # pipeline's loader, so we cannot give it one): seeding the global RNG
            # here is what makes a layer-wise run repeat from process to process
            torch.manual_seed(self.seed)
            self._sequential.attach()

    def on_sequential_epoch_end(self, state: State, event, modules=None, **kwargs):
        if self._sequential is not None:
            self._sequential.fit_layers(modules or [])

    def on_calibration_end(self, state: State, event, **kwargs) -> None:
        run = self._sequential
        if run is None:
            return
        self.remove_hooks()
        missing = sorted(set(run.moes) - set(run.fits))
        if missing:
            raise RuntimeError(
                f"the sequential pipeline never reached the MLPs of layers {missing}; "
                "check sequential_targets"
            )
        layerwise_seconds = round(time.perf_counter() - run.start, 1)
        history = {"train_seconds": 0.0, "tokens": 0, "history": []}
        if self.train_mode == "layerwise_then_global":
            history = self._global_phase(state.model, run, state.data.calib)
        union_sizes = state.model.config.moe_union_sizes
        for index, moe in run.moes.items():  # few runs per expert, no unused channel
            store_in_union_order(moe, self.width_multiple)
            union_sizes[index] = moe.union_size
        plan = run.plan
        widths = [(run.moes[i].expert_widths()).tolist() for i in plan.indices]
        self._report = {
            "architecture": plan.arch,
            "expert_layout": self.expert_layout,
            "train_mode": self.train_mode,
            "target_active_ratio": self.target_active_ratio,
            "layers": plan.indices,
            "union_sizes": [run.moes[i].union_size for i in plan.indices],
            "expert_widths": widths,
            **plan.budget.summary(widths),
            "layerwise": [
                {
                    "layer": i,
                    "error": run.fits[i]["error"],
                    "tokens": run.fits[i]["tokens"],
                }
                for i in plan.indices
            ],
            "layerwise_seconds": layerwise_seconds,  # the end-to-end phase excluded
            "compute_dtype": str(plan.settings.compute_dtype),
            **history,
        }
        logger.info(
            f"ToMoE {self.train_mode} done: active ratio "
            f"{self._report['active_ratio_uniform_routing']:.3f} with uniform "
            f"routing, {self._report['active_ratio_worst_case']:.3f} worst case "
            f"(target {self.target_active_ratio})"
        )
        self._write_report()
        self._sequential = None

    def _global_phase(self, model, run, loader) -> dict:
        """The end-to-end phase of layerwise_then_global, from the layer fits."""
        plan = run.plan
        embeddings = run.hypernet().detach()
        for k, (index, router) in enumerate(zip(plan.indices, run.routers)):
            fit = run.fits[index]
            with torch.no_grad():
                router.gate.weight.copy_(fit["router"].to(router.gate.weight))
            logits = torch.where(fit["blocks"], torch.tensor(KEEP_MARGIN), -KEEP_MARGIN)
            set_block_logits(router, embeddings[k], logits)
        run.make_dense()
        moes = [run.moes[i] for i in plan.indices]
        gates = GatedMLPs(
            moes,
            [m.down_proj for m in moes],
            run.routers,
            self.mask_block_size,
            self.temperature,
        )
        with (
            calibrate_all_experts_disabled(),
            _seeded(self.seed, plan.device),
            frozen(model),
            gates,
        ):
            history = train_routers(
                model,
                gates,
                run.hypernet,
                plan.budget,
                loader,
                plan.settings,
                plan.device,
            )
        routers = [r.eval() for r in run.routers]
        masks = final_layer_masks(run.hypernet.eval(), routers, self.temperature)
        biases = self._expert_biases(model, plan, routers, masks, mlps=moes)
        for k, (moe, router, layer_masks) in enumerate(zip(moes, routers, masks)):
            run.write(
                moe,
                router.gate.weight.detach(),
                layer_masks.experts,
                None if biases is None else biases[k],
            )
        return history

    def _expert_biases(self, model, plan: "_Plan", routers, masks, mlps=None):
        """Each expert's closed-form output bias, or None (``expert_bias``)."""
        if not self.expert_bias:
            return None
        mlps = plan.mlps if mlps is None else mlps
        with frozen(model):
            return expert_output_biases(
                model,
                mlps,
                [getattr(m, "down_proj") for m in mlps],
                routers,
                masks,
                plan.loader,
                block_size=self.mask_block_size,
                num_tokens=self.warm_start_tokens,
                device=plan.device,
            )

    @property
    def report(self) -> dict:
        """Training history and expert layout of the last run."""
        return self._report

    # -- validation against the model (before any training) ---------------------

    def _plan(self, model: nn.Module, loader) -> "_Plan":
        """Everything on_initialize needs, checked against the model and data."""
        self._check_not_quantized(model)
        arch, layout = get_layout(model)
        indices, mlps = self._find_target_mlps(model, layout)
        loader = self._check_calibration_data(loader)
        hidden = model.config.hidden_size
        shared = self.expert_layout == "shared"
        if self.attention_pruning:
            self._check_attention_prunable(model, layout, indices, shared)
        if shared:
            check_stock_export(model, layout)
            if self.expert_bias:
                raise ValueError(
                    "expert_bias cannot be exported to Qwen2-MoE (its experts have "
                    "no output bias); use expert_layout: paper or expert_bias: false"
                )
        # besides its experts' channels a token runs the router, the shared gate
        # (shared layout) and one expert's output bias (expert_bias)
        extra = self.num_experts + int(shared) + int(self.expert_bias)
        budget = count_budget(model, layout, indices, router_params=hidden * extra)
        self._check_feasible(budget)
        shared_blocks = None
        if shared:
            widths = budget.shared_widths(
                self.target_active_ratio, self.num_experts, self.width_multiple
            )
            shared_blocks = tuple(w // self.mask_block_size for w in widths)
        device = next(model.parameters()).device
        settings = TrainSettings.from_fields(
            self,
            steps=self.iters or self.epochs * len(loader),
            compute_dtype=self._resolve_dtype(device),
        )
        layers = model.get_submodule(layout.layers)
        attentions = [getattr(layers[i], layout.attention) for i in indices]
        return _Plan(
            arch,
            layout,
            indices,
            mlps,
            loader,
            budget,
            device,
            settings,
            shared_blocks,
            attentions,
        )

    @staticmethod
    def _check_not_quantized(model) -> None:
        if any(hasattr(m, "quantization_scheme") for m in model.modules()):
            raise ValueError(
                "ToMoEModifier found modules that already carry a quantization "
                "scheme. ToMoEModifier must come before quantization modifiers in "
                "the recipe, so that they quantize the converted experts."
            )

    def _find_target_mlps(self, model, layout: MLPLayout):
        layers = model.get_submodule(layout.layers)
        names = {f"{layout.layers}.{i}.{layout.mlp}": i for i in range(len(layers))}
        matched = {n for n, _ in match_named_modules(model, self.targets, self.ignore)}
        indices = sorted(names[n] for n in matched if n in names)
        if not indices:
            raise ValueError(
                f"targets {self.targets} (ignore {self.ignore}) matched no MLP; "
                f"MLPs are named like '{layout.layers}.0.{layout.mlp}'"
            )
        mlps = [getattr(layers[i], layout.mlp) for i in indices]
        for i, mlp in zip(indices, mlps):
            name = f"{layout.layers}.{i}.{layout.mlp}"
            width = getattr(mlp, layout.gate_proj).out_features
            for field in ("width_multiple", "mask_block_size"):
                value = getattr(self, field)
                if width % value:
                    raise ValueError(
                        f"{field} must divide the MLP width of {name} ({width}), got "
                        f"{value}; choose a divisor such as 64 or 128"
                    )
            if width // self.width_multiple < 2:
                raise ValueError(
                    f"width_multiple {self.width_multiple} leaves {name} ({width} "
                    "channels) fewer than 2 multiples, so every union width would "
                    "round up to the whole MLP; use a smaller width_multiple"
                )
            if width // self.mask_block_size < 2:
                raise ValueError(
                    f"mask_block_size {self.mask_block_size} leaves {name} ({width} "
                    "channels) fewer than 2 blocks, so expert widths would round to "
                    "the whole MLP or to zero; use a smaller mask_block_size"
                )
        return indices, mlps

    @staticmethod
    def _check_attention_prunable(model, layout, indices, shared: bool) -> None:
        if shared:
            raise ValueError(
                "attention_pruning changes the q/k head size, which the shared "
                "layout's stock Qwen2-MoE export cannot hold; use expert_layout: "
                "paper or attention_pruning: false"
            )
        layers = model.get_submodule(layout.layers)
        for i in indices:
            attention = getattr(layers[i], layout.attention)
            if type(attention) not in QK_PRUNED_ATTENTION:
                raise ValueError(
                    f"attention_pruning does not support {type(attention).__name__} "
                    f"({layout.layers}.{i}.{layout.attention}; supported: "
                    f"{sorted(c.__name__ for c in QK_PRUNED_ATTENTION)}). Set "
                    "attention_pruning: false"
                )
            if attention.head_dim % 2:
                raise ValueError(
                    f"attention_pruning keeps RoPE pairs and needs an even head_dim; "
                    f"{layout.layers}.{i} has {attention.head_dim}"
                )

    @staticmethod
    def _check_calibration_data(loader):
        if loader is None:
            raise ValueError(
                "ToMoEModifier trains on calibration data, but none was given: pass "
                "dataset=... (and num_calibration_samples) to oneshot"
            )
        if len(loader) == 0:
            raise ValueError(
                "ToMoEModifier got an empty calibration dataset; pass a dataset with "
                "at least one sample"
            )
        batch = next(iter(loader))
        length = batch["input_ids"].shape[-1]
        if length < 2:
            raise ValueError(
                f"calibration sequences must have at least 2 tokens to distil "
                f"next-token predictions, got {length}; raise max_seq_length or use "
                "longer texts"
            )
        return loader

    def _check_feasible(self, budget: Budget) -> None:
        floor = budget.floor(self.mask_block_size)
        if self.target_active_ratio <= floor:
            raise ValueError(
                f"target_active_ratio {self.target_active_ratio} is not reachable: "
                f"attention, routers and one {self.mask_block_size}-channel block per"
                f" expert already give {floor:.3f} of the dense parameters (attention"
                " stays dense). Raise target_active_ratio or lower mask_block_size"
            )

    def _resolve_dtype(self, device: torch.device) -> torch.dtype:
        if self.compute_dtype == "auto":
            return choose_compute_dtype(device)
        return getattr(torch, self.compute_dtype)

    def _write_report(self) -> None:
        if not self.report_path or not is_main_process():
            return
        path = os.path.abspath(self.report_path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{time.time_ns()}"
        with open(tmp, "w") as f:
            json.dump(self._report, f, indent=2)
        os.replace(tmp, path)


@dataclass(frozen=True)
class _Plan:
    """What on_initialize validated and derived before training."""

    arch: str
    layout: MLPLayout
    indices: list[int]
    mlps: list[nn.Module]
    loader: object
    budget: Budget
    device: torch.device
    settings: TrainSettings
    shared_blocks: tuple[int, int] | None  # (shared, per routed group): "shared"
    attentions: list[nn.Module]  # the converted layers' attention modules

    @property
    def downs(self) -> list[nn.Module]:
        return [getattr(m, self.layout.down_proj) for m in self.mlps]

    def width(self, mlp: nn.Module) -> int:
        return getattr(mlp, self.layout.gate_proj).out_features


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """Seed torch for the block without changing the caller's RNG state."""
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        yield
