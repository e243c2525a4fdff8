"""Properties of the training losses and the noise schedule."""

import math

import pytest
import torch

from tomoe_modifier.train import (
    balance_loss,
    distillation_loss,
    noise_scale,
    union_loss,
)


@pytest.mark.unit
def test_distillation_is_zero_for_identical_logits_and_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(6, 11)
    valid = torch.ones(6)
    assert distillation_loss(logits, logits, valid).item() == pytest.approx(0, abs=1e-6)
    assert distillation_loss(logits + torch.randn(6, 11), logits, valid) > 0


@pytest.mark.unit
def test_distillation_ignores_padded_tokens():
    torch.manual_seed(0)
    teacher, student = torch.randn(4, 7), torch.randn(4, 7)
    valid = torch.tensor([1.0, 1.0, 0.0, 0.0])
    student_pad = student.clone()
    student_pad[2:] = 100 * torch.randn(2, 7)  # garbage where padded
    assert torch.equal(
        distillation_loss(student, teacher, valid),
        distillation_loss(student_pad, teacher, valid),
    )
    # mean over the two valid tokens of KL(teacher || student), by hand
    p = teacher[:2].softmax(-1)
    kl = (p * (p.log() - student[:2].log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(distillation_loss(student, teacher, valid), kl)


@pytest.mark.unit
def test_balance_is_one_when_tokens_and_probabilities_are_uniform():
    experts, tokens = 4, 8
    choice = torch.eye(experts).repeat(tokens // experts, 1)  # 2 tokens per expert
    probs = torch.full((tokens, experts), 1 / experts)
    valid = torch.ones(tokens)
    assert balance_loss(choice, probs, valid).item() == pytest.approx(1.0)
    # all tokens on expert 0 with certainty: E * 1 * 1
    collapsed = torch.zeros(tokens, experts)
    collapsed[:, 0] = 1
    assert balance_loss(collapsed, collapsed, valid).item() == pytest.approx(experts)


@pytest.mark.unit
def test_union_is_zero_at_full_cover_and_grows_as_channels_are_dropped():
    full = torch.zeros(3, 10)
    full[torch.arange(10) % 3, torch.arange(10)] = 1  # every block in one expert
    assert union_loss(full).item() == pytest.approx(0.0, abs=1e-6)
    half = full.clone()
    half[:, 5:] = 0  # half of the blocks in no expert
    assert union_loss(half).item() == pytest.approx(math.log(1.001 / 0.501))


@pytest.mark.unit
def test_noise_scale_anneals_to_zero_on_the_last_step():
    assert [noise_scale(s, 10, 0.0) for s in range(10)] == [1.0] * 10
    scales = [noise_scale(s, 10, 0.5) for s in range(10)]
    assert scales[:5] == [1.0] * 5
    assert scales[-1] == 0.0
    assert all(a >= b for a, b in zip(scales, scales[1:]))
