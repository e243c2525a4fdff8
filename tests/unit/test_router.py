"""Straight-through estimators and the trainable router modules."""

import pytest
import torch

from tomoe_modifier.router import (
    ExpertHypernetwork,
    LayerRouter,
    gumbel_sigmoid_st,
    gumbel_softmax_st,
)


@pytest.mark.unit
def test_gumbel_softmax_is_hard_forward_soft_backward():
    logits = torch.randn(5, 4, requires_grad=True)
    hard, soft = gumbel_softmax_st(logits, 0.4, noise=True)
    assert torch.equal(hard.detach().sum(-1), torch.ones(5))
    assert set(hard.detach().unique().tolist()) <= {0.0, 1.0}
    (hard * torch.arange(4.0)).sum().backward()
    assert logits.grad.abs().sum() > 0


@pytest.mark.unit
def test_no_noise_means_argmax_and_threshold():
    logits = torch.randn(6, 5)
    hard, _ = gumbel_softmax_st(logits, 0.4, noise=False)
    assert torch.equal(hard.argmax(-1), logits.argmax(-1))
    mask = gumbel_sigmoid_st(logits, 0.4, noise=False)
    assert torch.equal(mask.bool(), logits > 0)


@pytest.mark.unit
def test_block_masks_start_dense_and_keep_one_block():
    torch.manual_seed(0)
    hn = ExpertHypernetwork(num_layers=2, num_experts=3)
    router = LayerRouter(hidden_size=16, num_experts=3, num_blocks=5)
    emb = hn()
    assert emb.shape == (2, 3, 128)
    assert router.block_masks(emb[0], 0.4, noise=False).bool().all()
    router.offset = -100.0  # everything would be dropped
    kept = router.block_masks(emb[0], 0.4, noise=False)
    assert torch.equal(kept.sum(-1), torch.ones(3))


@pytest.mark.unit
def test_router_runs_in_fp32_under_bf16_autocast():
    router = LayerRouter(hidden_size=16, num_experts=3, num_blocks=5)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hard, soft = router.route(x, 0.4, noise=False)
    assert soft.dtype == torch.float32


@pytest.mark.unit
def test_scaled_noise_changes_samples_and_zero_noise_is_deterministic():
    torch.manual_seed(0)
    logits = torch.zeros(2000)
    kept = gumbel_sigmoid_st(logits, 0.4, noise=1.0).mean()
    assert 0.4 < kept < 0.75  # P(Gumbel > 0) = 1 - 1/e
    mask = gumbel_sigmoid_st(logits + 0.1, 0.4, noise=0.0)
    torch.testing.assert_close(mask, torch.ones(2000))
