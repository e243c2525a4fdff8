"""The closed-form per-expert output bias."""

import pytest
import torch

from tests.testing_utils import make_model
from tomoe_modifier.correction import expert_output_biases
from tomoe_modifier.router import LayerMasks, LayerRouter


@pytest.mark.unit
def test_bias_is_the_mean_contribution_of_each_experts_dropped_channels():
    model = make_model("llama", layers=1)
    mlp = model.model.layers[0].mlp
    router = LayerRouter(64, 2, 128)
    torch.nn.init.normal_(router.gate.weight)
    experts = torch.zeros(2, 128)
    experts[0, :64] = 1
    experts[1, 32:] = 1
    batch = {"input_ids": torch.randint(4, 256, (2, 10))}
    (bias,) = expert_output_biases(
        model,
        [mlp],
        [mlp.down_proj],
        [router],
        [LayerMasks(experts)],
        [batch],
        block_size=1,
        num_tokens=10_000,
        device="cpu",
    )
    inputs = []
    hook = mlp.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    with torch.no_grad():
        model(**batch)
        hook.remove()
        xs = inputs[0].reshape(-1, 64)  # every token's MLP input
        hs = mlp.act_fn(mlp.gate_proj(xs)) * mlp.up_proj(xs)  # [T, I]
        ids = router.gate(xs).argmax(-1)
    assert ids.unique().numel() == 2, "test needs tokens on both experts"
    for e in range(2):
        rows = hs[ids == e]
        dropped = rows.mean(0) * (1 - experts[e])
        expected = mlp.down_proj.weight @ dropped
        torch.testing.assert_close(bias[e], expected, atol=1e-5, rtol=1e-4)
