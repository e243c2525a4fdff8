"""The ToMoE training loop: routers and hypernetwork against the frozen dense model.

One step = dense teacher forward (gates off, no grad) + gated student forward +
backward into the router parameters only. Dimension legend: T tokens, E experts,
N channel blocks, B block size, V vocabulary.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from loguru import logger
from torch import nn
from tqdm.auto import tqdm

from tomoe_modifier.budget import Budget
from tomoe_modifier.distributed import average_gradients
from tomoe_modifier.router import (
    ExpertHypernetwork,
    LayerMasks,
    LayerRouter,
    QKPruner,
)

__all__ = [
    "GatedMLPs",
    "TeacherCache",
    "forward_logits",
    "hidden_distillation",
    "sampled_distillation",
    "training_window",
    "TrainSettings",
    "frozen",
    "distillation_loss",
    "union_loss",
    "balance_loss",
    "noise_scale",
    "train_routers",
]


@dataclass(frozen=True)
class TrainSettings:
    """
    What one training run needs. The values are the ``ToMoEModifier`` fields of
    the same names (the one place their defaults live) plus the derived
    ``steps`` and ``compute_dtype``; build it with :meth:`from_fields`.
    """

    steps: int
    compute_dtype: torch.dtype
    lr: float
    weight_decay: float
    target_active_ratio: float
    distill_weight: float
    budget_weight: float
    union_weight: float
    balance_weight: float
    temperature: float
    noise_anneal: float  # final fraction of steps over which the noise -> 0
    lr_schedule: str  # "constant" or "cosine" (to 0 at the last step)
    log_every: int
    seed: int
    expert_layout: str  # "paper" or "shared"
    hidden_distill_weight: float
    teacher_cache: str  # "none" or "sampled"
    teacher_samples: int
    train_window: int | None
    long_window_every: int

    @classmethod
    def from_fields(cls, source, **derived) -> "TrainSettings":
        """Settings from the same-named attributes of ``source`` (the modifier)."""
        names = [f.name for f in fields(cls) if f.name not in derived]
        return cls(**{name: getattr(source, name) for name in names}, **derived)


@contextlib.contextmanager
def frozen(model: nn.Module):
    """Freeze every model parameter and switch to eval mode; restore on exit."""
    grad_flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.requires_grad_(False)
    model.eval()
    try:
        yield model
    finally:
        for p, flag in grad_flags.items():
            p.requires_grad_(flag)
        model.train(was_training)


class GatedMLPs:
    """
    Hooks that turn dense MLPs into their gated ToMoE form during training:
    route each token from the MLP input, then zero the channels its expert drops
    (and scale the shared ones, in the shared layout) right before ``down_proj``.
    ``enabled=False`` gives the dense teacher.
    """

    def __init__(
        self,
        mlps: list[nn.Module],
        down_projs: list[nn.Module],
        routers: list[LayerRouter],
        block_size: int,
        temperature: float,
        attentions: list[nn.Module] | None = None,
        qk_pruners: list[QKPruner] | None = None,
    ):
        self.mlps, self.down_projs, self.routers = mlps, down_projs, routers
        # attention pruning: q_proj / k_proj outputs are masked before RoPE
        self.attentions = attentions or []
        self.qk_pruners = qk_pruners or []
        self.qk_masks: list[torch.Tensor] = []  # per layer [hd]
        self.block_size = block_size
        self.temperature = temperature
        self.enabled = True
        self.noise = 1.0  # Gumbel noise scale (see noise_scale)
        self.layer_masks: list[LayerMasks] = []  # per layer
        self.choices: list[torch.Tensor | None] = [None] * len(mlps)  # [T, E]
        self.probs: list[torch.Tensor | None] = [None] * len(mlps)  # [T, E]
        self.token_scales: list[torch.Tensor | None] = [None] * len(mlps)  # [T]
        self._handles: list = []

    def __enter__(self) -> "GatedMLPs":
        for mlp in self.mlps:  # a converted MLP must run its masked reference,
            mlp.reference_only = True  # where these hooks apply (layer-wise modes)
        for i, (mlp, down) in enumerate(zip(self.mlps, self.down_projs)):
            self._handles.append(mlp.register_forward_pre_hook(self._route_hook(i)))
            self._handles.append(down.register_forward_pre_hook(self._mask_hook(i)))
        for i, attention in enumerate(self.attentions[: len(self.qk_pruners)]):
            for proj in (attention.q_proj, attention.k_proj):
                self._handles.append(proj.register_forward_hook(self._qk_hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for mlp in self.mlps:
            mlp.__dict__.pop("reference_only", None)

    def _route_hook(self, index: int):
        def hook(module, args):
            if not self.enabled:
                return None
            x = args[0].reshape(-1, args[0].shape[-1])
            router = self.routers[index]
            choice, probs = router.route(x, self.temperature, self.noise)
            self.choices[index], self.probs[index] = choice, probs
            self.token_scales[index] = router.token_scale(x)
            return None

        return hook

    def _qk_hook(self, index: int):
        def hook(module, args, output):
            if not self.enabled or not self.qk_masks:
                return None
            mask = self.qk_masks[index]  # [hd]
            heads = output.view(*output.shape[:-1], -1, mask.shape[0])
            return (heads * mask.to(output.dtype)).view(output.shape)

        return hook

    def _mask_hook(self, index: int):
        def hook(module, args):
            if not self.enabled:
                return None
            h = args[0]  # [..., I]
            masks = self.layer_masks[index]
            token_blocks = self.choices[index] @ masks.routed  # [T, N]
            if masks.shared is not None:
                scale = self.token_scales[index][:, None]  # [T, 1]
                token_blocks = token_blocks + scale * masks.shared[None, :]
            mask = token_blocks.repeat_interleave(self.block_size, dim=-1)  # [T, I]
            return (h * mask.view(h.shape).to(h.dtype),)

        return hook


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Forward KL(teacher || student) per token in fp32, mean over valid tokens."""
    log_p_s = F.log_softmax(student.float(), dim=-1)  # [T, V]
    log_p_t = F.log_softmax(teacher.float(), dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)  # [T]
    return (kl * valid).sum() / valid.sum().clamp_min(1)


def union_loss(block_masks: torch.Tensor) -> torch.Tensor:
    """Push the union of the experts to cover the whole MLP. masks: [E, N]."""
    union = 1 - torch.prod(1 - block_masks, dim=0)  # [N]
    return torch.log(1.001 / (union.mean() + 0.001))


def balance_loss(
    choice: torch.Tensor, probs: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Switch-style E * sum_e f_e P_e over valid tokens; 1.0 when balanced."""
    weights = valid[:, None] / valid.sum().clamp_min(1)  # [T, 1]
    share = (choice.detach() * weights).sum(dim=0)  # [E]
    mean_prob = (probs * weights).sum(dim=0)  # [E]
    return choice.shape[-1] * (share * mean_prob).sum()


def noise_scale(step: int, steps: int, anneal: float) -> float:
    """Gumbel noise scale at ``step`` (0-based): 1, then linearly to 0 at the end.

    Training on noisy masks and converting without noise leaves a gap: the mean
    of the Gumbel noise is +0.58, so noise-free masks are narrower than the ones
    the budget loss saw. Annealing ends training on the deterministic model that
    conversion exports.
    """
    start = steps * (1.0 - anneal)
    if anneal <= 0 or step < start:
        return 1.0
    return max(0.0, 1.0 - (step + 1 - start) / (steps - start))


def _batches(loader, steps: int):
    """Cycle the calibration loader (each pass reshuffles) for ``steps`` batches."""
    return itertools.islice(
        itertools.chain.from_iterable(itertools.repeat(loader)), steps
    )


def training_window(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, step: int, settings
):
    """
    The rows a step trains on. With ``train_window`` w, calibration rows longer than
    w are cut into rows of w tokens (a remainder is dropped), except on every
    ``long_window_every``-th step, which keeps the whole rows: most steps see
    short, cheap windows and some see the long contexts an evaluation uses.
    """
    window = settings.train_window
    length = input_ids.shape[1]
    every = settings.long_window_every
    if window is None or length <= window or (every and (step + 1) % every == 0):
        return input_ids, attention_mask
    keep = length // window * window
    return (
        input_ids[:, :keep].reshape(-1, window),
        attention_mask[:, :keep].reshape(-1, window),
    )


def forward_logits(model: nn.Module, input_ids, attention_mask):
    """(final hidden states [B, L, D], logits [B, L, V]) of a causal LM, computed
    from its decoder and output embedding directly, so it works where
    llm-compressor has disabled the LM head module (inside its calibration
    pipelines) and gives the same numbers as ``model(...).logits`` elsewhere."""
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state
    head = model.get_output_embeddings()
    return hidden, F.linear(hidden, head.weight, getattr(head, "bias", None))


class TeacherCache:
    """
    The dense teacher's targets for calibration rows already seen, so a row drawn
    again skips the teacher forward. Logits are kept as ``samples`` tokens drawn
    from the teacher's distribution per position (sampled, not top-k: a top-k cache
    biases the distillation towards the head of the distribution); their mean
    log-likelihood under the student is an unbiased estimate of the cross-entropy
    whose gradient is the KL's. Final hidden states are kept (in the compute dtype)
    only when the hidden-state term is on.
    """

    def __init__(self, samples: int, keep_hidden: bool):
        self.samples = samples
        self.keep_hidden = keep_hidden
        self.rows: dict[bytes, dict] = {}
        self.hits = self.misses = 0

    @staticmethod
    def key(row: torch.Tensor) -> bytes:
        return row.detach().cpu().numpy().tobytes()

    def lookup(self, input_ids: torch.Tensor):
        entries = [self.rows.get(self.key(row)) for row in input_ids]
        if any(e is None for e in entries):
            self.misses += 1
            return None
        self.hits += 1
        return entries

    @torch.no_grad()
    def store(self, input_ids, logits, hidden) -> None:
        probs = F.softmax(logits.float(), dim=-1)  # [B, L, V]
        entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)  # [B, L]
        for b, row in enumerate(input_ids):
            drawn = torch.multinomial(probs[b], self.samples, replacement=True)
            self.rows[self.key(row)] = {
                "samples": drawn.to(torch.int32).cpu(),  # [L, K]
                "entropy": entropy[b].cpu(),  # [L]
                "hidden": hidden[b].detach().cpu() if self.keep_hidden else None,
            }


def sampled_distillation(student, entries, valid, device) -> torch.Tensor:
    """KL(teacher || student) estimated from cached teacher samples, per valid token:
    -mean_k log p_s(sample_k) - H(teacher). student: [B, L, V]."""
    samples = torch.stack([e["samples"] for e in entries]).to(device).long()
    entropy = torch.stack([e["entropy"] for e in entries]).to(device)
    log_p = F.log_softmax(student.float(), dim=-1)  # [B, L, V]
    cross = -log_p.gather(-1, samples).mean(-1)  # [B, L]
    kl = (cross - entropy).reshape(-1)
    return (kl * valid).sum() / valid.sum().clamp_min(1)


def hidden_distillation(student, teacher, valid) -> torch.Tensor:
    """Normalised MSE of the final hidden states per valid token ([B, L, D])."""
    error = (student.float() - teacher.float()).square().sum(-1).reshape(-1)
    scale = teacher.float().square().sum(-1).reshape(-1).clamp_min(1e-12)
    return ((error / scale) * valid).sum() / valid.sum().clamp_min(1)


def train_routers(
    model: nn.Module,
    gates: GatedMLPs,
    hypernet: ExpertHypernetwork,
    budget: Budget,
    loader,
    settings: TrainSettings,
    device: torch.device,
) -> dict:
    """
    Train ``hypernet`` and the routers in ``gates`` by self-distillation plus the
    budget, union and balance losses. Returns a report with the loss history.
    """
    params = list(hypernet.parameters()) + [
        p for r in gates.routers for p in r.parameters()
    ]
    params += [p for pruner in gates.qk_pruners for p in pruner.parameters()]
    optimizer = torch.optim.AdamW(
        params, lr=settings.lr, weight_decay=settings.weight_decay
    )
    scheduler = None
    if settings.lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=settings.steps
        )
    use_autocast = settings.compute_dtype != torch.float32
    history: list[dict] = []
    tokens_seen = 0
    start = time.perf_counter()
    progress = tqdm(total=settings.steps, desc="ToMoE training", unit="step")
    hypernet.train()
    for r in gates.routers:
        r.train()
    autocast = (
        torch.autocast(device.type, dtype=settings.compute_dtype)
        if use_autocast
        else contextlib.nullcontext()
    )
    cache = None
    if settings.teacher_cache == "sampled":
        cache = TeacherCache(
            settings.teacher_samples, settings.hidden_distill_weight > 0
        )
    with torch.enable_grad(), autocast:
        for step, batch in enumerate(_batches(loader, settings.steps)):
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch.get("attention_mask")
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            attention_mask = attention_mask.to(device)
            input_ids, attention_mask = training_window(
                input_ids, attention_mask, step, settings
            )
            valid = attention_mask.reshape(-1).float()  # [T]
            tokens_seen += int(valid.sum())

            cached = cache.lookup(input_ids) if cache is not None else None
            if cached is None:
                gates.enabled = False
                with torch.no_grad():
                    teacher_hidden, teacher = forward_logits(
                        model, input_ids, attention_mask
                    )
                gates.enabled = True
                if cache is not None:
                    cache.store(input_ids, teacher, teacher_hidden)
            elif settings.hidden_distill_weight > 0:
                teacher_hidden = torch.stack([e["hidden"] for e in cached]).to(device)
            noise = noise_scale(step, settings.steps, settings.noise_anneal)
            gates.noise = noise
            embeddings = hypernet()  # [L, E, K]
            gates.layer_masks = [
                r.layer_masks(embeddings[i], settings.temperature, noise=noise)
                for i, r in enumerate(gates.routers)
            ]
            pair_masks = [
                p.pair_mask(settings.temperature, noise) for p in gates.qk_pruners
            ]
            gates.qk_masks = [QKPruner.dim_mask(m) for m in pair_masks]
            student_hidden, student = forward_logits(model, input_ids, attention_mask)
            vocab = student.shape[-1]
            if cached is None:
                kd = distillation_loss(
                    student.reshape(-1, vocab), teacher.reshape(-1, vocab), valid
                )
            else:
                kd = sampled_distillation(student, cached, valid, device)
            hidden_term = torch.zeros((), device=device)
            if settings.hidden_distill_weight > 0:
                hidden_term = hidden_distillation(student_hidden, teacher_hidden, valid)
            widths = [
                m.experts.sum(dim=1) * gates.block_size for m in gates.layer_masks
            ]
            usage = [
                (c * valid[:, None]).sum(0) / valid.sum().clamp_min(1)
                for c in gates.choices
            ]
            saving = 0.0
            if pair_masks:
                saving = budget.attention_saving([m.sum() for m in pair_masks])
            ratio = budget.ratio(budget.expert_params(widths, usage), saving)
            p = settings.target_active_ratio
            budget_term = torch.abs(torch.log((ratio + 1e-3) / (p + 1e-3)))
            union_term = torch.stack(
                [union_loss(m.experts) for m in gates.layer_masks]
            ).mean()
            balance_term = torch.stack(
                [balance_loss(c, q, valid) for c, q in zip(gates.choices, gates.probs)]
            ).mean()
            if settings.expert_layout == "paper":
                loss = (
                    settings.distill_weight * kd
                    + settings.budget_weight * budget_term
                    + settings.union_weight * union_term
                    + settings.balance_weight * balance_term
                )
            else:  # fixed widths meet the budget and fill the capacities by
                # construction, so those two terms are only reported
                loss = (
                    settings.distill_weight * kd
                    + settings.balance_weight * balance_term
                )
            if settings.hidden_distill_weight > 0:
                loss = loss + settings.hidden_distill_weight * hidden_term
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(params)  # data parallel under torchrun; no-op otherwise
            optimizer.step()
            lr = optimizer.param_groups[0]["lr"]
            if scheduler is not None:
                scheduler.step()

            worst = budget.ratio(
                budget.worst_case_params(widths),
                float(saving.detach()) if pair_masks else 0.0,
            )
            record = {
                "step": step + 1,
                "loss": float(loss.detach()),
                "distill_kl": float(kd.detach()),
                "budget": float(budget_term.detach()),
                "union": float(union_term.detach()),
                "balance": float(balance_term.detach()),
                "hidden": float(hidden_term.detach()),
                "teacher_cached": cached is not None,
                "active_ratio": float(ratio.detach()),
                "worst_case_ratio": float(worst),
                "noise": round(noise, 4),
                "lr": lr,
                "tokens": tokens_seen,
                "elapsed_s": round(time.perf_counter() - start, 2),
            }
            history.append(record)
            progress.update(1)
            progress.set_postfix(
                kl=f"{record['distill_kl']:.3f}", ratio=f"{record['active_ratio']:.3f}"
            )
            if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
                logger.info(
                    f"ToMoE step {step + 1}/{settings.steps}: "
                    f"loss={record['loss']:.4f} kl={record['distill_kl']:.4f} "
                    f"budget={record['budget']:.4f} union={record['union']:.4f} "
                    f"balance={record['balance']:.4f} "
                    f"active_ratio={record['active_ratio']:.3f} "
                    f"(worst case {record['worst_case_ratio']:.3f}, target {p}) "
                    f"noise={noise:.2f} lr={lr:.2e} "
                    f"tokens={tokens_seen} elapsed={record['elapsed_s']:.0f}s"
                )
            if not math.isfinite(record["loss"]):
                raise RuntimeError(
                    f"ToMoE loss became {record['loss']} at step {step + 1}; "
                    "lower lr or check the calibration data"
                )
    progress.close()
    if cache is not None:
        logger.info(
            f"ToMoE teacher cache: {cache.hits} of {cache.hits + cache.misses} "
            f"steps reused the teacher ({len(cache.rows)} rows cached)"
        )
    gates.choices = [None] * len(gates.choices)
    gates.probs = [None] * len(gates.probs)
    return {
        "steps": settings.steps,
        "tokens": tokens_seen,
        "train_seconds": round(time.perf_counter() - start, 2),
        "teacher_cache_hits": cache.hits if cache is not None else 0,
        "history": history,
    }
