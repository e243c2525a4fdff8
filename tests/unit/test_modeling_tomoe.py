"""The converted MoE MLP: the CPU fast path (compiled loop and pure-torch fallback)
equals the masked reference; padding, calibration, config."""

import pytest
import torch
from llmcompressor.modeling.moe.context import moe_calibration_context

import tomoe_modifier.modeling_tomoe as modeling
from tests.testing_utils import make_model
from tomoe_modifier.convert import build_sparse_mlp
from tomoe_modifier.mappings import MLPLayout
from tomoe_modifier.modeling_tomoe import ToMoESparseMLP, can_use_fast_path


def masked_reference(moe, x):
    """ToMoESparseMLP.forward with the CPU fast path switched off."""
    original = modeling.can_use_fast_path
    modeling.can_use_fast_path = lambda *_: False
    try:
        with torch.no_grad():
            return moe(x)
    finally:
        modeling.can_use_fast_path = original


@pytest.fixture(params=["cpp", "torch"])
def kernel(request, monkeypatch):
    """Run a test with the compiled loop and with the pure-torch fallback."""
    monkeypatch.setenv(modeling.KERNEL_ENV, request.param)
    monkeypatch.setattr(modeling, "_kernel_state", {})
    return request.param


def _random_moe(
    bias=False, seed=0, experts=4, union=96, block=16, hidden=64, shared=False
):
    torch.manual_seed(seed)
    moe = ToMoESparseMLP(
        hidden, union, experts, block, "silu", bias=bias, shared=shared
    )
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    moe.expert_blocks.copy_(torch.rand(experts, union // block) > 0.4)
    moe.expert_blocks[:, 0] = True
    if shared:  # the first blocks are in every expert and gated
        moe.shared_blocks[: 2 * 16 // block] = True
        moe.expert_blocks[:, moe.shared_blocks] = True
    return moe.eval()


@pytest.mark.unit
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tokens", [1, 3, 16, 37])
@pytest.mark.parametrize("block", [1, 16])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("hidden", [64, 72])  # 72: the kernel's vector tail
def test_fast_path_equals_masked_reference(kernel, bias, tokens, block, shared, hidden):
    moe = _random_moe(bias=bias, block=block, shared=shared, hidden=hidden)
    x = torch.randn(tokens, hidden)
    assert can_use_fast_path(moe, x)
    with torch.no_grad():
        fast = moe(x)
    assert (modeling.cpu_kernel() is not None) == (kernel == "cpp")
    torch.testing.assert_close(fast, masked_reference(moe, x), atol=1e-5, rtol=1e-5)


@pytest.mark.unit
@pytest.mark.parametrize("shared", [False, True])
def test_large_groups_take_views_or_gathers_and_equal_the_reference(kernel, shared):
    """Prefill-sized groups: experts covering few runs of the union multiply views of
    them (holes between merged runs masked), scattered ones gather their rows."""
    moe = _random_moe(experts=3, union=256, block=1, bias=True, shared=shared)
    moe.expert_blocks[0] = torch.arange(256) < 200  # one run
    moe.expert_blocks[1] = torch.arange(256) % 68 < 64  # 4 runs, gaps of 4
    moe.expert_blocks[2] = torch.rand(256) > 0.8  # scattered
    if shared:
        moe.expert_blocks[:, moe.shared_blocks] = True
    tables = moe.expert_tables()
    segments = [
        modeling._cheapest_segments(
            tables["segments"],
            tables["segment_offsets"],
            tables["segment_cover"],
            e,
            150,
            int(width),
        )
        for e, width in enumerate(moe.expert_widths())
    ]
    if not shared:
        assert segments[0] == [(0, 200, 0)]
        assert segments[1] == [(0, 256, 1)]  # merged across its holes
        assert segments[2] is None  # gathered
    x = torch.randn(450, 64)
    with torch.no_grad():
        fast = moe(x)
    torch.testing.assert_close(fast, masked_reference(moe, x), atol=1e-5, rtol=1e-5)


@pytest.mark.unit
def test_expert_segments_list_exact_runs_and_merged_ranges():
    mask = torch.tensor([[1, 1, 0, 0, 1, 0, 1, 1]], dtype=torch.bool)
    flat, offsets, cover = modeling._expert_segments(mask, holes=True)
    per_gap = [
        flat[offsets[g] : offsets[g + 1]].view(-1, 3).tolist()
        for g in range(len(modeling.SEGMENT_GAPS))
    ]
    assert per_gap[0] == [[0, 2, 0], [4, 5, 0], [6, 8, 0]]
    assert per_gap[-1] == [[0, 8, 1]]
    assert cover[0] == 5 and cover[-1] == 8  # channels each list covers
    exact, _, _ = modeling._expert_segments(mask, holes=False)  # no member bits
    assert exact.view(-1, 3).tolist() == per_gap[0] * len(modeling.SEGMENT_GAPS)


@pytest.mark.unit
@pytest.mark.parametrize("tokens", [1, 5, 40, 150])
@pytest.mark.parametrize("shared", [False, True])
def test_bfloat16_fast_path_matches_reference(kernel, tokens, shared):
    """Groups above the kernel's token limit take the gathered path, whose shapes
    are rounded up (SHAPE_BUCKET) below float32: padding must add nothing."""
    moe = _random_moe(bias=True, shared=shared).to(torch.bfloat16)
    moe.router.float()  # the router stays in float32, as from_pretrained keeps it
    if moe.shared_gate is not None:
        moe.shared_gate.float()
    x = torch.randn(tokens, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        fast = moe(x)
    reference = masked_reference(moe, x)
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), reference.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.unit
def test_failed_build_falls_back_to_torch(monkeypatch, caplog):
    import torch.utils.cpp_extension as cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setenv(modeling.KERNEL_ENV, "auto")
    monkeypatch.setattr(modeling, "_kernel_state", {})
    monkeypatch.setattr(cpp_extension, "load_inline", no_compiler)
    moe = _random_moe()
    x = torch.randn(2, 64)
    with torch.no_grad():
        out = moe(x)
    assert modeling.cpu_kernel() is None
    assert "pure-torch path" in caplog.text
    torch.testing.assert_close(out, masked_reference(moe, x))
    monkeypatch.setenv(modeling.KERNEL_ENV, "cpp")
    monkeypatch.setattr(modeling, "_kernel_state", {})
    with pytest.raises(RuntimeError, match="could not be built"):
        modeling.cpu_kernel()


@pytest.mark.unit
def test_routing_compiles_without_graph_breaks():
    moe = _random_moe()
    x = torch.randn(1, 64)
    compiled = torch.compile(moe, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), masked_reference(moe, x))


@pytest.mark.unit
def test_compiled_decode_after_eager_prefill():
    """generate's order: an eager prefill builds the index tables, then the
    compiled decode step reads them without tracing their cache key."""
    torch.manual_seed(0)
    moe = _random_moe()
    with torch.no_grad():
        moe(torch.randn(5, 64))  # eager prefill
        compiled = torch.compile(moe, backend="eager", fullgraph=True)
        for _ in range(2):
            x = torch.randn(1, 64)
            torch.testing.assert_close(compiled(x), masked_reference(moe, x))


@pytest.mark.unit
def test_compiled_decode_calls_the_kernels_operator_not_python():
    """With the C++ kernel built, a compiled decode step runs the routing through
    the operator the kernel registered (its Meta kernel gives the fake shapes)."""
    if modeling.cpu_kernel() is None:
        pytest.skip("the C++ kernel cannot be built here")
    torch.manual_seed(0)
    moe = _random_moe(bias=True)
    targets = []

    def recording_backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    with torch.no_grad():
        moe(torch.randn(5, 64))  # eager prefill
        compiled = torch.compile(moe, backend=recording_backend, fullgraph=True)
        x = torch.randn(1, 64)
        torch.testing.assert_close(compiled(x), masked_reference(moe, x))
    assert any("routed_mlp" in t for t in targets), targets
    assert not any("moe_mlp" in t for t in targets), targets


@pytest.mark.unit
def test_down_weight_is_stored_column_major_once_in_its_own_storage():
    moe = _random_moe()
    before = moe.down_proj.weight.detach().clone()
    pointer = moe.down_proj.weight.data_ptr()
    moe.down_weight_t()
    assert moe.down_proj.weight.t().is_contiguous()
    assert moe.down_proj.weight.data_ptr() == pointer  # rewritten, not copied
    assert torch.equal(moe.down_proj.weight, before)
    assert moe.down_proj.weight.shape == before.shape
    moe.down_weight_t()  # idempotent
    assert torch.equal(moe.down_proj.weight, before)


@pytest.mark.unit
def test_down_weight_view_of_a_larger_buffer_is_copied_not_overwritten():
    moe = _random_moe()
    buffer = torch.randn(2 * moe.down_proj.weight.numel())
    other_half = buffer[moe.down_proj.weight.numel() :].clone()
    view = buffer[: moe.down_proj.weight.numel()].view_as(moe.down_proj.weight)
    moe.down_proj.weight.data = view
    before = view.clone()
    moe.down_weight_t()
    assert torch.equal(moe.down_proj.weight, before)
    assert torch.equal(buffer[moe.down_proj.weight.numel() :], other_half)
    assert torch.equal(view, before)  # the buffer itself is untouched


@pytest.mark.unit
def test_down_weight_in_shared_memory_is_copied_not_overwritten():
    # under torchrun the distributed CPU offload maps one copy into every rank
    moe = _random_moe()
    moe.down_proj.weight.data.share_memory_()
    shared = moe.down_proj.weight.data
    before = shared.clone()
    moe.down_weight_t()
    assert moe.down_proj.weight.t().is_contiguous()
    assert moe.down_proj.weight.data_ptr() != shared.data_ptr()
    assert torch.equal(shared, before)  # the other ranks' view is untouched
    assert torch.equal(moe.down_proj.weight, before)


@pytest.mark.unit
def test_offloaded_module_computes_the_same_and_keeps_its_cached_weight():
    from compressed_tensors.offload import offload_module

    torch.manual_seed(0)
    moe = _random_moe()
    x = torch.randn(5, 64)
    expected = moe(x)
    offload_module(moe.down_proj, "cpu", "cpu")
    cached = moe.down_proj._parameters["weight"]
    before = cached.clone()
    torch.testing.assert_close(moe(x), expected)
    assert torch.equal(cached, before)  # the cache's tensor keeps its layout
    torch.testing.assert_close(moe(x), expected)


@pytest.mark.unit
def test_batch_with_mixed_experts_matches_token_by_token():
    moe = _random_moe()
    x = torch.randn(3, 11, 64)
    ids = moe.router(x.reshape(-1, 64)).argmax(-1)
    assert ids.unique().numel() > 1, "test needs tokens routed to several experts"
    batched = moe(x)
    single = torch.stack([moe(x[b, t : t + 1]) for b in range(3) for t in range(11)])
    torch.testing.assert_close(batched.reshape(-1, 64), single.reshape(-1, 64))


@pytest.mark.unit
def test_union_is_padded_to_the_width_multiple_with_unused_channels():
    dense = make_model("llama").model.layers[0].mlp  # 128 channels
    router = torch.nn.Linear(64, 2, bias=False)
    masks = torch.zeros(2, 128, dtype=torch.bool)
    masks[0, :10] = True
    masks[1, 5:40] = True  # union of 40 channels, padded to 64
    moe = build_sparse_mlp(dense, MLPLayout(), router, masks, 1, "silu", 32)
    assert moe.union_size == 64
    assert moe.expert_widths().tolist() == [10, 35]
    assert not moe.expert_blocks[:, 40:].any()
    x = torch.randn(5, 64)
    expected = dense.down_proj(
        dense.act_fn(dense.gate_proj(x)) * dense.up_proj(x) * masks[0].float()
    )
    torch.nn.init.zeros_(moe.router.weight)  # every token to expert 0
    torch.testing.assert_close(moe(x), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.unit
def test_full_masks_reproduce_dense_mlp():
    dense = make_model("llama").model.layers[0].mlp
    router = torch.nn.Linear(64, 4, bias=False)
    masks = torch.ones(4, 8, dtype=torch.bool)
    moe = build_sparse_mlp(dense, MLPLayout(), router, masks, 16, "silu")
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(moe(x), dense(x), atol=1e-6, rtol=1e-5)


@pytest.mark.unit
def test_calibration_flag_shows_down_proj_every_channel():
    dense = make_model("llama").model.layers[0].mlp
    masks = torch.zeros(4, 8, dtype=torch.bool)
    masks[torch.arange(4), torch.arange(4)] = True  # disjoint one-block experts
    moe = build_sparse_mlp(
        dense, MLPLayout(), torch.nn.Linear(64, 4, bias=False), masks, 16, "silu"
    )
    seen = []
    moe.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    x = torch.randn(6, 64)
    routed = moe(x)
    with moe_calibration_context():
        calibrated = moe(x)
    torch.testing.assert_close(calibrated, routed)
    assert (seen[-1] != 0).all(), "observers must see every channel on every token"


@pytest.mark.unit
def test_config_names_one_expert_per_token_and_no_dense_mlp_in_tp_plan():
    from tomoe_modifier.modeling_tomoe import TOMOE_ARCHITECTURES

    for config_cls, _ in TOMOE_ARCHITECTURES.values():
        config = config_cls()
        assert config.num_experts_per_tok == 1
        plan = config.base_model_tp_plan or {}
        assert plan and not any(".mlp." in key for key in plan)


@pytest.mark.unit
@pytest.mark.parametrize("release", ["this", "another"])
def test_a_checkpoint_copy_of_the_file_keeps_its_own_op(tmp_path, monkeypatch, release):
    """A process can hold the package's modeling file and checkpoints' copies of it
    (of this or another release). Each copy's custom op gets its own name: torch
    accepts a second definition under one name, and calls of it then corrupt memory
    (std::bad_alloc or a segfault, torch 2.13, even with an equal schema)."""
    import importlib.util
    import sys

    source = open(modeling.__file__).read()
    if release == "another":
        assert "    act_fn = _activation(hidden_act)\n    silu =" in source
        source = source.replace(
            "    act_fn = _activation(hidden_act)\n    silu =",
            "    act_fn = _activation(hidden_act)  # another release\n    silu =",
        )
    path = tmp_path / "modeling_tomoe.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"checkpoint_{release}", path)
    copy = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, copy)  # as transformers registers it
    spec.loader.exec_module(copy)
    assert copy._op_name(copy._moe_mlp_impl) != modeling._op_name(
        modeling._moe_mlp_impl
    )
    torch.manual_seed(0)
    ours = _random_moe()
    theirs = copy.ToMoESparseMLP(64, 96, 4, 16, "silu").eval()
    theirs.load_state_dict(ours.state_dict())
    with torch.no_grad():
        for tokens in (1, 40, 1):
            x = torch.randn(tokens, 64)
            torch.testing.assert_close(theirs(x), ours(x), atol=1e-5, rtol=1e-5)
        # eager calls the implementation directly; under torch.compile each copy
        # calls its op (the tables and the column-major weight exist by now)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        for tokens in (1, 40, 1):
            x = torch.randn(tokens, 64)
            torch.testing.assert_close(theirs(x), ours(x), atol=1e-5, rtol=1e-5)
