from __future__ import annotations

import json
import os
import time
from typing import Literal

import torch
from compressed_tensors.utils import match_named_modules
from llmcompressor.core import State
from llmcompressor.modifiers import Modifier
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator

from tomoe_modifier.convert import convert_model, final_block_masks
from tomoe_modifier.init import (
    collect_mlp_statistics,
    expert_block_scores,
    initial_block_logits,
    kmeans,
    router_weight,
)
from tomoe_modifier.mappings import MLPLayout, get_layout
from tomoe_modifier.precision import choose_compute_dtype
from tomoe_modifier.router import ExpertHypernetwork, LayerRouter
from tomoe_modifier.train import BudgetCounter, GatedMLPs, TrainSettings, train_routers

__all__ = ["ToMoEModifier"]


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
          width_multiple: 64
          iters: 480
          lr: 0.01
    ```

    Lifecycle:
        - on_initialize
            - validate the model and the calibration data (fail fast)
            - attach routers and the hypernetwork; freeze the model
            - train_routers (self-distillation + budget + union + balance)
            - convert_model: slice MLPs into ToMoESparseMLP, swap config/class
        - on_finalize
            - nothing (all work is done before any calibration pipeline runs, so a
              quantization modifier later in the recipe sees the experts)

    :param targets: MLP modules to convert (matched against ``model.layers.N.mlp``)
    :param ignore: MLP modules to leave dense
    :param num_experts: experts per converted MLP, at least 2
    :param target_active_ratio: active attention+MLP parameters per token divided by
        the dense count, in (0, 1]; attention stays dense, so it must exceed the
        attention share
    :param width_multiple: each converted MLP's stored width (the union of its
        experts) is padded to a multiple of this with channels no expert uses; set
        it to the quantization group size so down_proj's input groups are whole
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
        masks that conversion exports (0 keeps the paper's constant noise)
    :param lr_schedule: "constant" (the paper's) or "cosine" decay to 0
    :param mask_offset: logit offset that makes training start from the dense model
    :param compute_dtype: "auto" picks bfloat16 where the device runs it fast;
        routers always stay in float32
    :param init_strategy: "activation" starts the routers as nearest-centroid
        routing over k-means clusters of the MLP inputs and each expert at the target
        width with the blocks that matter most on its cluster (one dense pass over
        ``init_tokens`` calibration tokens); "dense" is the paper's start (all
        channels kept, random routers), which needs far more training tokens
    :param init_tokens: calibration tokens used by the activation-aware start
    :param seed: seeds router initialisation and the Gumbel noise
    :param log_every: log one line of losses every this many steps
    :param report_path: optional JSON file for the loss history and expert layout
    """

    requires_calibration_data: bool = False  # ToMoE runs its own loop in on_initialize

    targets: list[str] = Field(default_factory=lambda: ["re:.*mlp$"])
    ignore: list[str] = Field(default_factory=list)
    num_experts: int = 8
    target_active_ratio: float = 0.5
    width_multiple: int = 64
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
    noise_anneal: float = 0.25
    lr_schedule: Literal["constant", "cosine"] = "constant"
    mask_offset: float = 3.0
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    init_strategy: Literal["activation", "dense"] = "activation"
    init_tokens: int = 4096
    seed: int = 0
    log_every: int = 10
    report_path: str | None = None

    # private variables
    _report: dict = PrivateAttr(default_factory=dict)

    # -- validation ------------------------------------------------------------

    @field_validator("targets", "ignore", mode="before")
    @classmethod
    def _as_list(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("num_experts")
    @classmethod
    def _check_num_experts(cls, value: int) -> int:
        if value < 2:
            raise ValueError(f"num_experts must be >= 2, got {value}")
        return value

    @field_validator("target_active_ratio")
    @classmethod
    def _check_ratio(cls, value: float) -> float:
        if not 0 < value <= 1:
            raise ValueError(f"target_active_ratio must be in (0, 1], got {value}")
        return value

    @field_validator(
        "width_multiple", "mask_block_size", "epochs", "log_every", "init_tokens"
    )
    @classmethod
    def _check_positive(cls, value: int, info) -> int:
        if value < 1:
            raise ValueError(f"{info.field_name} must be >= 1, got {value}")
        return value

    @field_validator("noise_anneal")
    @classmethod
    def _check_fraction(cls, value: float) -> float:
        if not 0 <= value <= 1:
            raise ValueError(f"noise_anneal must be in [0, 1], got {value}")
        return value

    @field_validator("iters")
    @classmethod
    def _check_iters(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"iters must be >= 1 or None, got {value}")
        return value

    @field_validator("lr", "temperature")
    @classmethod
    def _check_positive_float(cls, value: float, info) -> float:
        if not value > 0:
            raise ValueError(f"{info.field_name} must be > 0, got {value}")
        return value

    # -- lifecycle --------------------------------------------------------------

    def on_initialize(self, state: State, **kwargs) -> bool:
        model = state.model
        self._check_not_quantized(model)
        arch, layout = get_layout(model)
        indices, mlps = self._find_target_mlps(model, layout)
        loader = self._check_calibration_data(state.data.calib)
        block = self.mask_block_size
        budget = self._budget_counter(model, layout, indices)
        self._check_feasible(budget, mlps, layout)

        device = next(model.parameters()).device
        dtype = self._resolve_dtype(device)
        steps = self.iters or self.epochs * len(loader)
        logger.info(
            f"ToMoE initialized: {arch}, {len(mlps)} MLPs -> {self.num_experts} "
            f"experts each, blocks of {block} channels, target active ratio "
            f"{self.target_active_ratio} (attention+router floor "
            f"{budget.ratio(0):.3f}), {steps} steps, compute {dtype}"
        )

        hidden = model.config.hidden_size
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            torch.manual_seed(self.seed)
            hypernet = ExpertHypernetwork(len(mlps), self.num_experts).to(device)
            routers = [
                LayerRouter(
                    hidden,
                    self.num_experts,
                    getattr(m, layout.gate_proj).out_features // block,
                    hypernet.embedding_dim,
                    self.mask_offset,
                ).to(device)
                for m in mlps
            ]
            settings = TrainSettings(
                steps=steps,
                lr=self.lr,
                weight_decay=self.weight_decay,
                target_active_ratio=self.target_active_ratio,
                distill_weight=self.distill_weight,
                budget_weight=self.budget_weight,
                union_weight=self.union_weight,
                balance_weight=self.balance_weight,
                temperature=self.temperature,
                noise_anneal=self.noise_anneal,
                lr_schedule=self.lr_schedule,
                compute_dtype=dtype,
                log_every=self.log_every,
                seed=self.seed,
            )
            downs = [getattr(m, layout.down_proj) for m in mlps]
            gates = GatedMLPs(mlps, downs, routers, block, self.temperature)
            grad_flags = {p: p.requires_grad for p in model.parameters()}
            was_training = model.training
            model.requires_grad_(False)
            model.eval()
            try:
                if self.init_strategy == "activation":
                    self._activation_init(
                        model, mlps, downs, routers, loader, budget, device
                    )
                with gates:
                    report = train_routers(
                        model, gates, hypernet, budget, loader, settings, device
                    )
            finally:
                for p, flag in grad_flags.items():
                    p.requires_grad_(flag)
                model.train(was_training)

        hypernet.eval()
        for r in routers:
            r.eval()
        masks = final_block_masks(hypernet, routers, self.temperature)
        union = convert_model(
            model,
            arch,
            layout,
            indices,
            routers,
            masks,
            block,
            self.num_experts,
            self.width_multiple,
        )
        widths = [(m.sum(dim=1) * block).tolist() for m in masks]
        worst = budget.ratio(
            budget.worst_case_params([torch.tensor(w) for w in widths])
        )
        mean_width = budget.ratio(
            budget.expert_params(
                [torch.tensor(w, dtype=torch.float) for w in widths],
                [torch.full((self.num_experts,), 1 / self.num_experts)] * len(widths),
            )
        )
        self._report = {
            "architecture": arch,
            "target_active_ratio": self.target_active_ratio,
            "layers": indices,
            "union_sizes": union,
            "expert_widths": widths,
            "active_ratio_uniform_routing": float(mean_width),
            "active_ratio_worst_case": float(worst),
            "compute_dtype": str(dtype),
            **report,
        }
        logger.info(
            f"ToMoE done in {report['train_seconds']:.0f}s on {report['tokens']} "
            f"tokens: active ratio {float(mean_width):.3f} with uniform routing, "
            f"{float(worst):.3f} worst case (target {self.target_active_ratio})"
        )
        self._write_report()
        return True

    def _activation_init(self, model, mlps, downs, routers, loader, budget, device):
        """Routers from k-means of MLP inputs; experts at target width (init.py)."""
        t0 = time.perf_counter()
        stats = collect_mlp_statistics(
            model, mlps, downs, loader, self.mask_block_size, self.init_tokens, device
        )
        fraction = (
            self.target_active_ratio * budget.dense_total - budget.fixed_params()
        ) / sum(budget.full_mlp_params)
        for router, (x, energy) in zip(routers, stats):
            centroids = kmeans(x, self.num_experts, seed=self.seed)
            weight = router_weight(centroids, x)
            scores = expert_block_scores(energy, x, centroids)
            keep = round(fraction * scores.shape[1])
            bias = initial_block_logits(scores, keep, 3.0, -(self.mask_offset + 3.0))
            with torch.no_grad():
                router.router.weight.copy_(weight.to(router.router.weight))
                router.block_bias.copy_(bias.to(router.block_bias))
        logger.info(
            f"ToMoE activation-aware start: {len(stats[0][0])} tokens per layer, "
            f"experts start at {fraction:.3f} of each MLP "
            f"({time.perf_counter() - t0:.1f}s)"
        )

    @property
    def report(self) -> dict:
        """Training history and expert layout of the last run."""
        return self._report

    # -- helpers ----------------------------------------------------------------

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

    def _budget_counter(self, model, layout: MLPLayout, indices: list[int]):
        layers = model.get_submodule(layout.layers)
        attention = sum(
            p.numel()
            for layer in layers
            for p in getattr(layer, layout.attention).parameters()
        )
        per_channel, full, dense_mlp = [], [], 0
        for i, layer in enumerate(layers):
            mlp = getattr(layer, layout.mlp)
            size = sum(
                p.numel()
                for name in (layout.gate_proj, layout.up_proj, layout.down_proj)
                for p in getattr(mlp, name).parameters()
            )
            if i in indices:
                width = getattr(mlp, layout.gate_proj).out_features
                down_bias = getattr(mlp, layout.down_proj).bias
                fixed = 0 if down_bias is None else down_bias.numel()
                per_channel.append((size - fixed) // width)
                full.append(size)
                dense_mlp += fixed  # the down bias is always executed
            else:
                dense_mlp += size
        hidden = model.config.hidden_size
        return BudgetCounter(
            attention_params=attention,
            dense_mlp_params=dense_mlp,
            router_params=hidden * self.num_experts * len(indices),
            params_per_channel=per_channel,
            full_mlp_params=full,
            block_size=self.mask_block_size,
        )

    def _check_feasible(self, budget: BudgetCounter, mlps, layout) -> None:
        floor = budget.ratio(
            sum(c * self.mask_block_size for c in budget.params_per_channel)
        )
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
        if not self.report_path:
            return
        path = os.path.abspath(self.report_path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{time.time_ns()}"
        with open(tmp, "w") as f:
            json.dump(self._report, f, indent=2)
        os.replace(tmp, path)
