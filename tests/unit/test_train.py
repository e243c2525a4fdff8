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


@pytest.mark.unit
def test_forward_logits_equal_the_models_own():
    from tests.testing_utils import make_model
    from tomoe_modifier.train import forward_logits

    model = make_model("llama")
    x = torch.randint(4, 256, (2, 9))
    with torch.no_grad():
        hidden, logits = forward_logits(model, x, torch.ones_like(x))
        assert torch.equal(logits, model(x).logits)
    assert hidden.shape == (2, 9, 64)


@pytest.mark.unit
def test_sampled_teacher_targets_estimate_the_kl_without_bias():
    from tomoe_modifier.train import TeacherCache, sampled_distillation

    torch.manual_seed(0)
    teacher = torch.randn(1, 6, 11) * 2
    student = torch.randn(1, 6, 11)
    ids = torch.randint(0, 9, (1, 6))
    valid = torch.ones(6)
    exact = distillation_loss(student.reshape(-1, 11), teacher.reshape(-1, 11), valid)
    cache = TeacherCache(samples=20000, keep_hidden=False)
    cache.store(ids, teacher, None)
    (entry,) = cache.lookup(ids)
    assert entry["samples"].shape == (6, 20000)
    estimate = sampled_distillation(student, [entry], valid, "cpu")
    assert estimate.item() == pytest.approx(exact.item(), rel=0.03)
    assert cache.lookup(torch.zeros(1, 6, dtype=torch.long)) is None


@pytest.mark.unit
def test_hidden_term_is_zero_for_identical_states():
    from tomoe_modifier.train import hidden_distillation

    h = torch.randn(2, 5, 8)
    assert hidden_distillation(h, h, torch.ones(10)).item() == 0.0
    assert hidden_distillation(h * 0, h, torch.ones(10)).item() == pytest.approx(1.0)


@pytest.mark.unit
def test_training_windows_cut_rows_except_every_nth_step():
    from types import SimpleNamespace

    from tomoe_modifier.train import training_window

    ids = torch.arange(2 * 10).reshape(2, 10)
    mask = torch.ones_like(ids)
    settings = SimpleNamespace(train_window=4, long_window_every=3)
    short, _ = training_window(ids, mask, 0, settings)
    assert short.tolist() == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [10, 11, 12, 13],
        [14, 15, 16, 17],
    ]
    long, _ = training_window(ids, mask, 2, settings)  # the 3rd step: whole rows
    assert torch.equal(long, ids)
    none = SimpleNamespace(train_window=None, long_window_every=0)
    assert torch.equal(training_window(ids, mask, 0, none)[0], ids)
