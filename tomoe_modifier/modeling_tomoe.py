"""Converted ToMoE models: decoder LLMs whose MLPs are top-1 mixtures of experts.

This file is self-contained on purpose: ``save_pretrained`` copies it beside the
checkpoint (``auto_map``), so ``trust_remote_code=True`` loads a converted model
without the ``tomoe_modifier`` package. It may import only torch and transformers.

Each expert is a subset of channel blocks of one shared "union" MLP (the channels
any expert uses), so overlapping experts are stored once. Per-layer union widths,
the expert count and the block size live in ``config.json``; which blocks each
expert uses is the ``expert_blocks`` buffer in the state dict.

Dimension legend: T tokens, D hidden, U union width, E experts, B block size.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.activations import ACT2FN
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.models.mistral.modeling_mistral import MistralAttention
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

_CALIBRATION_CONTEXT = "llmcompressor.modeling.moe.context"


def get_calibrate_all_experts_flag() -> bool:
    """llm-compressor's MoE calibration flag (every expert sees every token).

    Read from llm-compressor only where it is already loaded: setting the flag
    imports its module, and importing llm-compressor here would add about 50 MiB
    of resident memory to every process that merely serves a checkpoint.
    """
    if torch.compiler.is_compiling():  # inference only; dynamo skips sys.modules
        return False
    context = sys.modules.get(_CALIBRATION_CONTEXT)
    return context is not None and context.get_calibrate_all_experts_flag()


__all__ = [
    "ToMoESparseMLP",
    "can_use_fast_path",
    "cpu_kernel",
    "moe_mlp",
    "ToMoELlamaConfig",
    "ToMoELlamaForCausalLM",
    "ToMoEMistralConfig",
    "ToMoEMistralForCausalLM",
    "ToMoEQwen2Config",
    "ToMoEQwen2ForCausalLM",
    "ToMoEQwen3Config",
    "ToMoEQwen3ForCausalLM",
    "TOMOE_ARCHITECTURES",
    "prune_qk_dims",
]


# -- CPU fast path ------------------------------------------------------------------
# A converted MLP reads, per token, only the rows of gate_up_proj and of the
# transposed down_proj that its expert uses. One C++ loop does it in a single pass
# per channel (two dot products, SiLU, one axpy), built on first use and cached per
# machine; where it cannot be built a pure-torch path (row gathers + GEMMs)
# computes the same. Groups of more tokens than KERNEL_MAX_TOKENS use the gathers
# and GEMMs too (compute-bound), tokens sorted by expert once. Both are exact
# against ``forward``'s masked reference (tests/unit/test_modeling_tomoe.py).
# KERNEL_MAX_TOKENS was chosen on a 2-core AMD EPYC (AVX-512), torch 2.13,
# SmolLM2-135M MLPs: above it a batched GEMM beats the per-channel loop.
KERNEL_MAX_TOKENS = 16
KERNEL_ENV = "TOMOE_CPU_KERNEL"  # "auto" (default), "cpp" (must build) or "torch"
# A GEMM group multiplies its expert's channels either as views of the contiguous
# runs of the union that hold them (the storage order keeps runs few; nearby runs are
# merged, the channels between them masked) or after gathering its rows, whichever
# the cost model prices lower. Unit: one channel's gate, up and down multiply-adds
# for one token. Gathering a channel's three rows costs GATHER_ROW_COST, each GEMM
# segment SEGMENT_COST (its launches and elementwise ops); measured on SmolLM2-135M
# prefill MLPs on a 2-core Xeon (AVX-512), float32, torch 2.13 (gathering a row ~0.6
# us, a channel-token ~25 ns).
GATHER_ROW_COST = 24
SEGMENT_COST = 1000
SEGMENT_GAPS = (0, 8, 32, 128, 1 << 30)  # merge runs at most this many channels apart
# Below float32, CPU GEMMs go to oneDNN, which compiles one kernel per GEMM shape and
# keeps 1024 of them: a prefill's expert groups (every layer, expert, token count)
# outgrow the cache and recompile on every call (SmolLM2 p = 0.5 bf16 prefill ran at
# 0.24x dense). There the gathered path rounds tokens and channels up to multiples of
# this (zero rows, channels repeated and zeroed), so shapes repeat across calls.
SHAPE_BUCKET = 64


def _gemms_compile_per_shape(x: torch.Tensor) -> bool:
    """Whether CPU GEMMs on ``x`` go to oneDNN, which compiles per shape (below
    float32; see SHAPE_BUCKET)."""
    return x.dtype != torch.float32


_KERNEL_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

inline float bf16_to_float(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

template <typename T> inline void load_row(const T* src, float* dst, int64_t n);
template <> inline void load_row<float>(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}
template <>
inline void load_row<c10::BFloat16>(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(s[i]);
}

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(v.x) << 16);
}

// weights are read in their own dtype and widened in registers: no row copies
template <typename T> inline float dot(const T* w, const float* x, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += to_float(w[i]) * x[i];
  return acc;
}

// w . x for one gate or up row; x_raw is the token in the model's dtype, xf the
// same widened to float. With AVX512-BF16 a bf16 row is multiplied pairwise by
// the bf16 token (vdpbf16ps: exact products, float accumulation), as oneDNN does.
template <typename T>
inline float row_dot(const T* w, const T* x_raw, const float* xf, int64_t n) {
  return dot<T>(w, xf, n);
}
#if defined(__AVX512BF16__)
template <>
inline float row_dot<c10::BFloat16>(const c10::BFloat16* w, const c10::BFloat16* x_raw,
                                    const float* xf, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512i a = _mm512_loadu_si512(reinterpret_cast<const void*>(w + i));
    const __m512i b = _mm512_loadu_si512(reinterpret_cast<const void*>(x_raw + i));
    acc = _mm512_dpbf16_ps(acc, reinterpret_cast<const __m512bh&>(a),
                           reinterpret_cast<const __m512bh&>(b));
  }
  float total = _mm512_reduce_add_ps(acc);
  for (; i < n; ++i) total += to_float(w[i]) * xf[i];
  return total;
}
#endif

// gate_c . x and up_c . x in one pass over x, two independent accumulators per
// row so the multiply-adds pipeline instead of waiting on one chain; float32 rows
// with AVX-512 use it, other dtypes and ISAs two row_dot calls.
template <typename T>
inline void gate_up_dot(const T* wg, const T* wu, const T* x_raw, const float* xf,
                        int64_t n, float* g, float* u) {
  *g = row_dot<T>(wg, x_raw, xf, n);
  *u = row_dot<T>(wu, x_raw, xf, n);
}
#if defined(__AVX512F__)
template <>
inline void gate_up_dot<float>(const float* wg, const float* wu, const float* x_raw,
                               const float* xf, int64_t n, float* g, float* u) {
  __m512 g0 = _mm512_setzero_ps(), g1 = g0, u0 = g0, u1 = g0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 x0 = _mm512_loadu_ps(xf + i), x1 = _mm512_loadu_ps(xf + i + 16);
    g0 = _mm512_fmadd_ps(_mm512_loadu_ps(wg + i), x0, g0);
    g1 = _mm512_fmadd_ps(_mm512_loadu_ps(wg + i + 16), x1, g1);
    u0 = _mm512_fmadd_ps(_mm512_loadu_ps(wu + i), x0, u0);
    u1 = _mm512_fmadd_ps(_mm512_loadu_ps(wu + i + 16), x1, u1);
  }
  for (; i < n; i += 16) {
    const int64_t left = n - i;
    const __mmask16 k =
        left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
    const __m512 x0 = _mm512_maskz_loadu_ps(k, xf + i);
    g0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, wg + i), x0, g0);
    u0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, wu + i), x0, u0);
  }
  *g = _mm512_reduce_add_ps(_mm512_add_ps(g0, g1));
  *u = _mm512_reduce_add_ps(_mm512_add_ps(u0, u1));
}
#endif

// asks for channel c's three rows ahead of use: the rows of consecutive visited
// channels are not always adjacent, so the hardware prefetcher cannot be relied on
template <typename T>
inline void prefetch_channel(const T* gu, const T* dt, int64_t c, int64_t D) {
  const char* a = reinterpret_cast<const char*>(gu + 2 * c * D);
  const char* b = reinterpret_cast<const char*>(dt + c * D);
  const int64_t gu_bytes = 2 * D * static_cast<int64_t>(sizeof(T));
  const int64_t d_bytes = D * static_cast<int64_t>(sizeof(T));
  for (int64_t o = 0; o < gu_bytes; o += 64) __builtin_prefetch(a + o, 0, 3);
  for (int64_t o = 0; o < d_bytes; o += 64) __builtin_prefetch(b + o, 0, 3);
}
constexpr int64_t PREFETCH_AHEAD = 2;  // channels

// y[t] = sum over visited channels c with (member[c] & token_bits[t]) of
//        silu(gate_c . x_t + bg_c) * (up_c . x_t + bu_c) * s(c, t) * down_t[c]
// gate_up: [2U, D], rows 2c (gate) and 2c+1 (up); down_t: [U, D]; visit: [W];
// s(c, t) = token_scale[t] for channels with scaled[c] (a gated shared expert), else 1.
template <typename T>
void subset_mlp_impl(const T* x, const T* gu, const T* gu_bias, const T* dt,
                     const int32_t* visit, const int64_t* member,
                     const int64_t* token_bits, const uint8_t* scaled,
                     const float* token_scale, int64_t W, int64_t tokens,
                     int64_t D, float* out) {
  std::vector<float> xf(tokens * D);
  for (int64_t t = 0; t < tokens; ++t) load_row<T>(x + t * D, xf.data() + t * D, D);
  const int threads = at::get_num_threads();
  std::vector<float> partial(static_cast<size_t>(threads) * tokens * D, 0.f);
  const int64_t grain = std::max<int64_t>(8, W / (4 * threads) + 1);
  at::parallel_for(0, W, grain, [&](int64_t begin, int64_t end) {
    float* y = partial.data() + static_cast<size_t>(at::get_thread_num()) * tokens * D;
    std::vector<char> hit(tokens, 1);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c = visit[i];
      if (i + PREFETCH_AHEAD < end)
        prefetch_channel<T>(gu, dt, visit[i + PREFETCH_AHEAD], D);
      bool any = true;
      if (member != nullptr) {
        any = false;
        for (int64_t t = 0; t < tokens; ++t) {
          hit[t] = (member[c] & token_bits[t]) != 0;
          any = any || hit[t];
        }
      }
      if (!any) continue;
      const T* wg = gu + (2 * c) * D;
      const T* wu = gu + (2 * c + 1) * D;
      const T* wd = dt + c * D;
      float bias[2] = {0.f, 0.f};
      if (gu_bias != nullptr) load_row<T>(gu_bias + 2 * c, bias, 2);
      const bool scale_c = scaled != nullptr && scaled[c] != 0;
      for (int64_t t = 0; t < tokens; ++t) {
        if (!hit[t]) continue;
        const float* xt = xf.data() + t * D;
        float g, u;
        gate_up_dot<T>(wg, wu, x + t * D, xt, D, &g, &u);
        g += bias[0];
        u += bias[1];
        float ht = g / (1.f + std::exp(-g)) * u;
        if (scale_c) ht *= token_scale[t];
        float* yt = y + t * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) yt[d] += ht * to_float(wd[d]);
      }
    }
  });
  for (int64_t k = 0; k < tokens * D; ++k) {
    float acc = 0.f;
    for (int th = 0; th < threads; ++th)
      acc += partial[static_cast<size_t>(th) * tokens * D + k];
    out[k] = acc;
  }
}

template <typename T> const T* ptr_or_null(const c10::optional<torch::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->data_ptr<T>() : nullptr;
}

}  // namespace

torch::Tensor subset_mlp(torch::Tensor x, torch::Tensor gate_up,
                         c10::optional<torch::Tensor> gate_up_bias,
                         torch::Tensor down_t, torch::Tensor visit,
                         c10::optional<torch::Tensor> member,
                         c10::optional<torch::Tensor> token_bits,
                         c10::optional<torch::Tensor> scaled,
                         c10::optional<torch::Tensor> token_scale) {
  TORCH_CHECK(x.dim() == 2 && gate_up.dim() == 2 && down_t.dim() == 2, "2-D inputs");
  TORCH_CHECK(x.is_contiguous() && gate_up.is_contiguous() && down_t.is_contiguous(),
              "contiguous inputs");
  TORCH_CHECK(visit.scalar_type() == torch::kInt32 && visit.is_contiguous(),
              "visit must be contiguous int32");
  TORCH_CHECK(x.scalar_type() == gate_up.scalar_type() &&
                  x.scalar_type() == down_t.scalar_type(),
              "x, gate_up and down_t must share one dtype");
  const int64_t tokens = x.size(0), D = x.size(1), W = visit.numel();
  auto out = torch::empty({tokens, D}, x.options().dtype(torch::kFloat32));
  const int64_t* m = ptr_or_null<int64_t>(member);
  const int64_t* tb = ptr_or_null<int64_t>(token_bits);
  const uint8_t* sc = ptr_or_null<uint8_t>(scaled);
  const float* ts = ptr_or_null<float>(token_scale);
  TORCH_CHECK((sc == nullptr) == (ts == nullptr), "scaled needs token_scale");
  if (x.scalar_type() == torch::kFloat32) {
    subset_mlp_impl<float>(x.data_ptr<float>(), gate_up.data_ptr<float>(),
                           ptr_or_null<float>(gate_up_bias), down_t.data_ptr<float>(),
                           visit.data_ptr<int32_t>(), m, tb, sc, ts, W, tokens, D,
                           out.data_ptr<float>());
  } else if (x.scalar_type() == torch::kBFloat16) {
    subset_mlp_impl<c10::BFloat16>(
        x.data_ptr<c10::BFloat16>(), gate_up.data_ptr<c10::BFloat16>(),
        ptr_or_null<c10::BFloat16>(gate_up_bias), down_t.data_ptr<c10::BFloat16>(),
        visit.data_ptr<int32_t>(), m, tb, sc, ts, W, tokens, D, out.data_ptr<float>());
  } else {
    TORCH_CHECK(false, "subset_mlp supports float32 and bfloat16");
  }
  return out.to(x.scalar_type());
}

// The routing of a few tokens, in C++: token t uses expert expert_ids[t]'s channels
// channels[offsets[e]:offsets[e+1]]; one token visits exactly those, several tokens
// one pass over the union with member bits. Registered as an operator (namespace
// per kernel source) so a compiled decode step calls it without entering Python.
torch::Tensor routed_mlp(torch::Tensor x, torch::Tensor gate_up,
                         c10::optional<torch::Tensor> gate_up_bias,
                         torch::Tensor down_t, torch::Tensor channels,
                         torch::Tensor offsets, torch::Tensor member,
                         torch::Tensor expert_ids, c10::optional<torch::Tensor> scaled,
                         c10::optional<torch::Tensor> token_scale) {
  TORCH_CHECK(channels.scalar_type() == torch::kInt32 && channels.is_contiguous(),
              "channels must be contiguous int32");
  TORCH_CHECK(offsets.scalar_type() == torch::kInt64 &&
                  expert_ids.scalar_type() == torch::kInt64,
              "offsets and expert_ids must be int64");
  const int64_t tokens = x.size(0);
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* ids = expert_ids.data_ptr<int64_t>();
  if (tokens == 1) {
    const int64_t e = ids[0];
    TORCH_CHECK(e >= 0 && e + 1 < offsets.numel(), "expert id out of range");
    auto visit = channels.narrow(0, off[e], off[e + 1] - off[e]);
    return subset_mlp(x, gate_up, gate_up_bias, down_t, visit, c10::nullopt,
                      c10::nullopt, scaled, token_scale);
  }
  TORCH_CHECK(member.numel() == down_t.size(0), "several tokens need member bits");
  auto visit = torch::arange(member.numel(), channels.options());
  auto bits = torch::ones_like(expert_ids).bitwise_left_shift(expert_ids);
  return subset_mlp(x, gate_up, gate_up_bias, down_t, visit, member, bits, scaled,
                    token_scale);
}

TORCH_LIBRARY(TOMOE_NAMESPACE, m) {
  m.def("routed_mlp(Tensor x, Tensor gate_up, Tensor? gate_up_bias, Tensor down_t, "
        "Tensor channels, Tensor offsets, Tensor member, Tensor expert_ids, "
        "Tensor? scaled, Tensor? token_scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(TOMOE_NAMESPACE, CPU, m) { m.impl("routed_mlp", &routed_mlp); }
// shapes for torch.compile's fake tensors: the output is x's shape and dtype
torch::Tensor routed_mlp_meta(torch::Tensor x, torch::Tensor,
                              c10::optional<torch::Tensor>, torch::Tensor,
                              torch::Tensor, torch::Tensor, torch::Tensor,
                              torch::Tensor, c10::optional<torch::Tensor>,
                              c10::optional<torch::Tensor>) {
  return torch::empty_like(x);
}
TORCH_LIBRARY_IMPL(TOMOE_NAMESPACE, Meta, m) { m.impl("routed_mlp", &routed_mlp_meta); }
"""

_kernel_state: dict = {}


def cpu_kernel():
    """The compiled subset-MLP loop, or None where it cannot be built.

    Built with the machine's C++ compiler on first use (about a minute) and cached
    by torch in ``TORCH_EXTENSIONS_DIR``; the name carries the CPU capability (and
    AVX512-BF16), so a cache shared between machines never hands out a binary built
    for another ISA.
    ``TOMOE_CPU_KERNEL=torch`` skips it, ``=cpp`` makes a failed build an error.
    """
    if "module" in _kernel_state:
        return _kernel_state["module"]
    import hashlib
    import logging
    import os

    mode = os.environ.get(KERNEL_ENV, "auto")
    module = None
    if mode != "torch":
        digest = hashlib.sha1(_KERNEL_SOURCE.encode()).hexdigest()[:10]
        namespace = f"tomoe_kernel_{digest}"
        arch = torch.backends.cpu.get_cpu_capability().lower()
        if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
            arch += "_bf16"  # -march=native then emits AVX512-BF16 dot products
        log = logging.getLogger(__name__)
        log.info("ToMoE: building the CPU expert kernel (once per machine, cached)")
        try:
            from torch.utils.cpp_extension import load_inline

            module = load_inline(
                name=f"tomoe_subset_mlp_{arch}_{digest}",
                cpp_sources=_KERNEL_SOURCE,
                functions=["subset_mlp", "routed_mlp"],
                extra_cflags=[
                    "-O3",
                    "-march=native",
                    "-fopenmp",
                    f"-DTOMOE_NAMESPACE={namespace}",
                ],
                extra_ldflags=["-fopenmp"],
            )
        except Exception as error:  # no compiler, no headers, ...
            if mode == "cpp":
                raise RuntimeError(
                    f"{KERNEL_ENV}=cpp but the ToMoE CPU kernel could not be built: "
                    f"{error}"
                ) from error
            log.warning(
                "ToMoE: the CPU expert kernel could not be built (%s); using the "
                "pure-torch path, which computes the same more slowly",
                str(error).splitlines()[0] if str(error) else type(error).__name__,
            )
    _kernel_state["module"] = module
    if module is not None:  # the operator the C++ source registered on loading
        _kernel_state["routed_op"] = getattr(torch.ops, namespace).routed_mlp
    return module


def _gate_up_rows(channels: torch.Tensor) -> torch.Tensor:
    """Rows of the interleaved gate_up_proj holding ``channels``: [2W]."""
    return torch.stack([2 * channels, 2 * channels + 1], dim=1).flatten()


def _gathered_mlp(x, gate_up, gate_up_bias, down_t, channels, act_fn, scale):
    """Pure-torch subset MLP: copy the channels' rows, then GEMMs. x: [T, D];
    ``scale`` is None or (scaled [U] flags, token_scale [T]), as in the kernel.
    A channel's gate and up rows are adjacent in the interleaved gate_up_proj, so
    one row copy of [U, 2D] takes both and one GEMM multiplies them. Rows are
    gathered with ``embedding``: on CPU it copies whole rows, several times faster
    than ``index_select`` in float32 (2-core AMD EPYC, torch 2.13)."""
    tokens, used = x.shape[0], channels.numel()
    pad_tokens = pad_channels = 0
    if _gemms_compile_per_shape(x):  # few distinct shapes (SHAPE_BUCKET)
        pad_tokens, pad_channels = -tokens % SHAPE_BUCKET, -used % SHAPE_BUCKET
        x = F.pad(x, (0, 0, 0, pad_tokens))
        channels = torch.cat([channels, channels[:1].expand(pad_channels)])
    width, dim = channels.numel(), gate_up.shape[1]
    pairs = F.embedding(channels, gate_up.view(-1, 2 * dim)).view(2 * width, dim)
    bias = None
    if gate_up_bias is not None:
        bias = F.embedding(channels, gate_up_bias.view(-1, 2)).flatten()
    gu = F.linear(x, pairs, bias).view(-1, width, 2)  # [T, W, (gate, up)]
    h = act_fn(gu[..., 0]) * gu[..., 1]  # [T, W]
    if scale is not None:
        scaled, token_scale = scale
        token_scale = F.pad(token_scale, (0, pad_tokens))
        shared = scaled.index_select(0, channels).bool()[None, :]  # [1, W]
        h = (h * torch.where(shared, token_scale[:, None], 1.0)).to(h.dtype)
    if pad_channels:
        h[:, used:] = 0  # the repeated channels add nothing
    y = h @ F.embedding(channels, down_t)  # [T, D]
    return y[:tokens] if pad_tokens else y


def _subset_mlp(x, gate_up, gate_up_bias, down_t, channels, act_fn, silu, scale):
    """One expert's channels on its tokens x [T, D] -> [T, D], no down bias."""
    kernel = cpu_kernel() if silu else None
    if kernel is not None and x.shape[0] <= KERNEL_MAX_TOKENS:
        scaled, token_scale = scale if scale is not None else (None, None)
        visit = channels.to(torch.int32)  # already int32 from expert_tables
        return kernel.subset_mlp(
            x, gate_up, gate_up_bias, down_t, visit, None, None, scaled, token_scale
        )
    return _gathered_mlp(x, gate_up, gate_up_bias, down_t, channels, act_fn, scale)


def _expert_segments(mask: torch.Tensor, holes: bool):
    """Per expert and per entry g of SEGMENT_GAPS, the channel ranges covering the
    expert's channels, runs at most g channels apart merged (``holes``: merged
    ranges contain channels it does not use; without ``holes`` every entry lists the
    exact runs). mask: bool [E, U] -> (flat (start, end, holes) triples, offsets
    [E*G+1] into them, channels covered [E*G]: the cost model's inputs, so a forward
    decodes only the list it picks)."""
    flat, offsets, cover = [], [0], []
    for row in mask:
        padded = torch.cat([row.new_zeros(1), row, row.new_zeros(1)]).int()
        edges = padded.diff().nonzero().flatten().tolist()
        runs = list(zip(edges[0::2], edges[1::2]))  # [start, end) of each run
        for gap in SEGMENT_GAPS:
            merged: list[list[int]] = []
            for start, end in runs:
                if merged and holes and start - merged[-1][1] <= gap:
                    merged[-1][1], merged[-1][2] = end, 1
                else:
                    merged.append([start, end, 0])
            flat.extend(v for triple in merged for v in triple)
            offsets.append(len(flat))
            cover.append(sum(end - start for start, end, _ in merged))
    as_long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return as_long(flat), as_long(offsets), as_long(cover)


def _segment_mlp(x, gate_up, gate_up_bias, down_t, segments, member, e, act_fn, scale):
    """One expert's channels on its tokens x [T, D] -> [T, D], multiplying views of
    the union: ``segments`` lists (start, end, holes) channel ranges; in a range with
    holes the channels expert ``e`` does not use (``member`` bit e clear) are zeroed."""
    y = None
    for start, end, holes in segments:
        bias = None if gate_up_bias is None else gate_up_bias[2 * start : 2 * end]
        gu = F.linear(x, gate_up[2 * start : 2 * end], bias).view(-1, end - start, 2)
        h = act_fn(gu[..., 0]) * gu[..., 1]  # [T, W]
        if holes:
            used = member[start:end].bitwise_right_shift(e).bitwise_and(1)
            h = h * used.to(h.dtype)
        if scale is not None:
            scaled, token_scale = scale
            shared = scaled[start:end].bool()[None, :]
            h = (h * torch.where(shared, token_scale[:, None], 1.0)).to(h.dtype)
        down = down_t[start:end]
        y = torch.mm(h, down) if y is None else y.addmm_(h, down)
    return x.new_zeros(x.shape) if y is None else y


def _cheapest_segments(segments, segment_offsets, segment_cover, e, tokens, width):
    """The segment list of expert ``e`` that the cost model prices below gathering
    its ``width`` rows for ``tokens`` tokens, or None (gather)."""
    per_expert = len(SEGMENT_GAPS)
    if segment_offsets.numel() == 0:  # tables built while compiling
        return None
    lo = e * per_expert
    bounds = segment_offsets[lo : lo + per_expert + 1]
    costs = segment_cover[lo : lo + per_expert] * tokens
    costs = costs + bounds.diff() // 3 * SEGMENT_COST
    g = int(costs.argmin())  # the first of equal costs
    if int(costs[g]) >= width * (GATHER_ROW_COST + tokens) + 2 * SEGMENT_COST:
        return None
    chosen = segments[int(bounds[g]) : int(bounds[g + 1])].view(-1, 3)
    return [tuple(triple) for triple in chosen.tolist()]


def moe_mlp(
    moe: "ToMoESparseMLP",
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    token_scale: torch.Tensor | None = None,
):
    """The fast path: x [T, D] whose tokens picked ``expert_ids`` [T] -> [T, D];
    ``token_scale`` [T] (float32) scales the gated shared channels (shared layout)."""
    tables = moe.expert_tables()
    compiling = torch.compiler.is_compiling()
    # decode: the routing and the kernel in one C++ call; eager through pybind,
    # compiled through the operator the kernel registered (no Python per step; the
    # kernel is built on the eager prefill: building it cannot be traced)
    routed = None
    if moe.hidden_act == "silu" and not compiling:
        kernel = cpu_kernel()
        routed = None if kernel is None else kernel.routed_mlp
    elif moe.hidden_act == "silu":
        routed = _kernel_state.get("routed_op")
    tokens = x.shape[0]
    if (
        routed is not None
        and tokens <= KERNEL_MAX_TOKENS
        and (tokens == 1 or tables["member"].numel())
    ):
        y = routed(
            x.contiguous(),
            moe.gate_up_proj.weight,
            moe.gate_up_proj.bias,
            moe.down_weight_t(),
            tables["channels"],
            tables["offsets"],
            tables["member"],
            expert_ids,
            None if token_scale is None else tables["scaled"],
            token_scale,
        )
        if moe.down_proj.bias is not None:
            y = y + moe.down_proj.bias
        return y
    # the custom op keeps the data-dependent routing opaque to torch.compile; eager
    # calls the function itself and skips the op's dispatch (tens of us per call)
    op = _moe_mlp_op if compiling else _moe_mlp_impl
    y = op(
        x.contiguous(),
        moe.gate_up_proj.weight,
        moe.gate_up_proj.bias,
        moe.down_weight_t(),  # [U, D], a view of the column-major weight
        tables["channels"],
        tables["offsets"],
        tables["member"],
        tables["segments"],
        tables["segment_offsets"],
        tables["segment_cover"],
        expert_ids,
        None if token_scale is None else tables["scaled"],
        token_scale,
        moe.hidden_act,
    )
    if moe.down_proj.bias is not None:
        y = y + moe.down_proj.bias
    return y


@functools.cache
def _activation(name: str) -> nn.Module:
    """``ACT2FN[name]``, made once: ACT2FN builds a new module per lookup, which
    costs more per decode step than the router."""
    return ACT2FN[name]


def _op_name(fn) -> str:
    """``tomoe::moe_mlp_<digest of the op's module and source>``. One process may hold
    several copies of this file (the package and checkpoints' ``modeling_tomoe.py``,
    possibly of other releases), and torch accepts a second definition of a custom
    op under an existing name, after which calls of it corrupt memory (even with an
    equal schema, torch 2.13): a name per copy keeps their ops apart."""
    import hashlib
    import inspect

    key = f"{fn.__module__}\n{inspect.getsource(fn)}"
    return f"tomoe::moe_mlp_{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def _moe_mlp_impl(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
    down_t: torch.Tensor,
    channels: torch.Tensor,
    offsets: torch.Tensor,
    member: torch.Tensor,
    segments: torch.Tensor,
    segment_offsets: torch.Tensor,
    segment_cover: torch.Tensor,
    expert_ids: torch.Tensor,
    scaled: torch.Tensor | None,
    token_scale: torch.Tensor | None,
    hidden_act: str,
) -> torch.Tensor:
    """Opaque to torch.compile (routing stays data dependent inside the op).

    channels [sum of widths] lists each expert's union channels, expert e at
    channels[offsets[e]:offsets[e+1]]; member [U] holds bit e for channel c when
    expert e uses it; scaled [U] (uint8) marks the channels multiplied by the
    token's token_scale [T] (the shared layout's gated shared channels);
    segments holds, per expert and per entry of SEGMENT_GAPS, the (start, end, holes)
    channel ranges covering the expert, flattened, located by segment_offsets, and
    segment_cover the channels each list covers.
    """
    act_fn = _activation(hidden_act)
    silu = hidden_act == "silu"
    num_tokens = x.shape[0]
    scale = None if scaled is None else (scaled, token_scale)
    kernel = cpu_kernel() if silu else None
    if num_tokens == 1:
        e = int(expert_ids[0])
        start, end = offsets[e : e + 2].tolist()
        return _subset_mlp(
            x, gate_up, gate_up_bias, down_t, channels[start:end], act_fn, silu, scale
        )
    if kernel is not None and num_tokens <= KERNEL_MAX_TOKENS and member.numel():
        # one pass over the union, each row read once for all tokens using it (what
        # moe_mlp calls directly once the kernel is built before tracing)
        return kernel.routed_mlp(
            x,
            gate_up,
            gate_up_bias,
            down_t,
            channels,
            offsets,
            member,
            expert_ids,
            scaled,
            token_scale,
        )
    # tokens sorted by expert once: each group is a contiguous slice
    order = torch.argsort(expert_ids, stable=True)
    xs = F.embedding(order, x)
    ts = None if scale is None else token_scale.index_select(0, order)
    counts = torch.bincount(expert_ids, minlength=offsets.numel() - 1).tolist()
    bounds = offsets.tolist()
    parts = []
    start = 0
    for e, n in enumerate(counts):
        if n:
            xe = xs[start : start + n]
            se = None if scale is None else (scaled, ts[start : start + n])
            width = bounds[e + 1] - bounds[e]
            plan = None
            views_ok = not _gemms_compile_per_shape(x)  # views have any shape
            if (n > KERNEL_MAX_TOKENS or kernel is None) and views_ok:
                plan = _cheapest_segments(
                    segments, segment_offsets, segment_cover, e, n, width
                )
            if plan is not None:
                ye = _segment_mlp(
                    xe, gate_up, gate_up_bias, down_t, plan, member, e, act_fn, se
                )
            else:
                ye = _subset_mlp(
                    xe,
                    gate_up,
                    gate_up_bias,
                    down_t,
                    channels[bounds[e] : bounds[e + 1]],
                    act_fn,
                    silu,
                    se,
                )
            parts.append(ye)
        start += n
    return F.embedding(torch.argsort(order), torch.cat(parts))


_moe_mlp_op = torch.library.custom_op(_op_name(_moe_mlp_impl), mutates_args=())(
    _moe_mlp_impl
)


@_moe_mlp_op.register_fake
def _(x, gate_up, gate_up_bias, down_t, channels, *rest):
    return torch.empty_like(x)


def can_use_fast_path(moe: "ToMoESparseMLP", x: torch.Tensor) -> bool:
    """Whether ``moe`` may run the CPU fast path on ``x``.

    The fast path reads the raw weights: quantized or wrapped Linears, calibration
    (where every expert must see every token), tracing, autograd, modules marked
    ``reference_only`` (training hooks act inside the reference) and devices other
    than the CPU use the masked reference.
    """
    if x.device.type != "cpu" or get_calibrate_all_experts_flag():
        return False
    if moe.reference_only:  # set by training hooks
        return False
    if torch.jit.is_tracing() or (torch.is_grad_enabled() and x.requires_grad):
        return False
    if x.dtype not in (torch.float32, torch.bfloat16):
        return False
    # (compressed-tensors sets quantization_scheme as a plain attribute: looking in
    # the instance dict spares nn.Module.__getattr__'s failed lookups, ~4 us each)
    linears = (moe.gate_up_proj, moe.down_proj)
    return all(
        type(m) is nn.Linear
        and "quantization_scheme" not in vars(m)
        and m.weight.dtype == x.dtype
        for m in linears
    )


# -- the module ----------------------------------------------------------------------


class ToMoESparseMLP(nn.Module):
    """
    Top-1 mixture of experts whose experts are channel subsets of one gated MLP.

    ``gate_up_proj`` holds gate and up rows interleaved (row 2c is gate channel c,
    row 2c+1 its up channel), the precedent being gpt-oss's interleaved
    ``gate_up_proj``. The router output is used only for its argmax: the chosen
    expert's output is not scaled, exactly as ToMoE trains it. The router runs in
    float32 whatever the model's dtype (``_keep_in_fp32_modules``), as in training.

    With ``shared=True`` (the "shared" layout) the channel blocks marked in
    ``shared_blocks`` belong to every expert and are scaled per token by
    ``sigmoid(shared_gate(x))``, as Qwen2-MoE gates its shared expert. With
    ``expert_bias=True`` each expert adds its own output vector (the mean
    contribution of the channels it drops, computed in closed form after training;
    with one expert this is FLAP's bias compensation).

    ``forward`` is the masked reference (the whole union, then each token's expert
    mask) plus one dispatch line to ``moe_mlp``, the CPU fast path that reads only
    the routed experts' channels and computes the same.
    """

    reference_only = False  # training hooks set it on instances (masked reference)

    def __init__(
        self,
        hidden_size: int,
        union_size: int,
        num_experts: int,
        block_size: int,
        hidden_act: str = "silu",
        bias: bool = False,
        shared: bool = False,
        expert_bias: bool = False,
    ):
        super().__init__()
        if union_size % block_size:
            raise ValueError(
                f"union_size must be a multiple of block_size, got {union_size} "
                f"and {block_size}"
            )
        self.hidden_size = hidden_size
        self.union_size = union_size
        self.num_experts = num_experts
        self.block_size = block_size
        self.hidden_act = hidden_act
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        self.gate_up_proj = nn.Linear(hidden_size, 2 * union_size, bias=bias)
        self.down_proj = nn.Linear(union_size, hidden_size, bias=bias)
        self.act_fn = ACT2FN[hidden_act]
        blocks = torch.ones(num_experts, union_size // block_size, dtype=torch.bool)
        self.register_buffer("expert_blocks", blocks)
        self.expert_bias = None
        if expert_bias:
            self.expert_bias = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.shared_gate = None
        if shared:
            self.shared_gate = nn.Linear(hidden_size, 1, bias=False)
            flags = torch.zeros(union_size // block_size, dtype=torch.bool)
            self.register_buffer("shared_blocks", flags)
        self._tables_key: tuple | None = None
        self._tables: dict = {}

    def expert_widths(self) -> torch.Tensor:
        """Channels per expert, shape [E]."""
        return self.expert_blocks.sum(dim=1) * self.block_size

    def channel_mask(self) -> torch.Tensor:
        """Per expert, which union channels it uses, shape [E, U]."""
        return self.expert_blocks.repeat_interleave(self.block_size, dim=1)

    def expert_tables(self) -> dict:
        """Index tables of the fast path, rebuilt when ``expert_blocks`` changes:
        ``channels`` (each expert's channels, concatenated), ``offsets`` [E+1],
        ``member`` [U] (bit e set when expert e uses the channel; empty if E > 63),
        ``scaled`` [U] (uint8: the gated shared channels) and each expert's
        contiguous ranges (``segments``, ``segment_offsets``, ``segment_cover``; see
        ``_moe_mlp_impl``).
        """
        if torch.compiler.is_compiling() and self._tables:
            # the expert sets are fixed at inference; dynamo cannot trace the
            # data-pointer key, and the eager prefill has built the tables
            return self._tables
        key = (self.expert_blocks.data_ptr(), self.expert_blocks._version)
        if self.shared_gate is not None:
            key += (self.shared_blocks.data_ptr(), self.shared_blocks._version)
        if key != self._tables_key:
            mask = self.channel_mask().detach().cpu()  # [E, U]
            widths = mask.sum(dim=1)
            offsets = torch.zeros(self.num_experts + 1, dtype=torch.long)
            offsets[1:] = widths.cumsum(0)
            # row-major: by expert; int32, the kernel's index type (no copy per call)
            channels = mask.nonzero()[:, 1].to(torch.int32).contiguous()
            member = torch.zeros(0, dtype=torch.long)
            if self.num_experts <= 63:
                bits = 2 ** torch.arange(self.num_experts, dtype=torch.long)  # [E]
                member = (mask.long() * bits[:, None]).sum(dim=0)  # [U]
            scaled = torch.zeros(self.union_size, dtype=torch.uint8)
            if self.shared_gate is not None:
                scaled = self.shared_channels().to(torch.uint8).cpu()
            compiling = torch.compiler.is_compiling()
            if compiling:  # dynamo cannot trace the run lengths; decode needs none
                empty = torch.zeros(0, dtype=torch.long)
                segments = segment_offsets = segment_cover = empty
            else:
                segments, segment_offsets, segment_cover = _expert_segments(
                    mask, member.numel() > 0
                )
            self._tables = {
                "channels": channels,
                "offsets": offsets,
                "member": member,
                "scaled": scaled,
                "segments": segments,
                "segment_offsets": segment_offsets,
                "segment_cover": segment_cover,
            }
            self._tables_key = None if compiling else key  # eager rebuilds them
        return self._tables

    def shared_channels(self) -> torch.Tensor:
        """Which union channels are the gated shared ones, bool [U]."""
        return self.shared_blocks.repeat_interleave(self.block_size)

    def token_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """Per-token scale of the shared channels, float32 [T] (None: no gate)."""
        if self.shared_gate is None:
            return None
        gate = self.shared_gate(x.to(self.shared_gate.weight.dtype))  # [T, 1]
        return torch.sigmoid(gate.float()).squeeze(-1)

    def down_weight_t(self) -> torch.Tensor:
        """``down_proj.weight`` transposed, [U, D] contiguous: each channel's output
        column is one contiguous row. The parameter is rewritten column-major once,
        in its own storage when it owns it (same shape; nn.Linear and saving are
        unaffected): a copy beside it would keep both resident, since
        ``from_pretrained`` maps the checkpoint file and the pages the copy read
        stay in the process (about 100 MiB more peak RSS on SmolLM2-135M). Writing
        into the private file mapping replaces its pages instead of adding some.

        Shared memory is never rewritten: under torchrun, llm-compressor's
        distributed CPU offload keeps one copy that every rank maps, and two ranks
        rewriting it at once scramble it."""
        weight = self.down_proj.weight
        if not weight.t().is_contiguous():
            with torch.no_grad(), torch.inference_mode(False):
                data = weight.data
                # (dynamo cannot trace storages; generate's eager prefill has
                # rewritten the weight before any compiled step)
                owned = (
                    not torch.compiler.is_compiling()
                    and not data.is_shared()
                    and data.is_contiguous()
                    and data.storage_offset() == 0
                    and data.untyped_storage().nbytes() == data.nbytes
                )
                if owned:
                    rows = data.clone()
                    columns = data.as_strided(data.shape, (1, data.shape[0]))
                    columns.copy_(rows)
                    weight.data = columns
                else:  # a view of a larger buffer: copy beside it
                    weight.data = data.t().contiguous().t()
        return self.down_proj.weight.t()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)  # [T, D]
        expert_ids = self.router(x.to(self.router.weight.dtype)).argmax(dim=-1)  # [T]
        token_scale = self.token_scale(x)  # [T] or None
        if can_use_fast_path(self, x):
            y = moe_mlp(self, x, expert_ids, token_scale)
            return self._add_expert_bias(y, expert_ids).view(shape)
        gate_up = self.gate_up_proj(x).view(-1, self.union_size, 2)  # [T, U, 2]
        h = self.act_fn(gate_up[..., 0]) * gate_up[..., 1]  # [T, U]
        mask = self.channel_mask()[expert_ids].float()  # [T, U]
        if token_scale is not None:
            shared = self.shared_channels()[None, :]
            mask = mask * torch.where(shared, token_scale[:, None], 1.0)
        mask = mask.to(h.dtype)
        if get_calibrate_all_experts_flag():
            # let observers of down_proj see every channel on every token, as
            # llm-compressor's MoE calibration does; the output uses only routed ones
            self.down_proj(h)
            weight, bias = self.down_proj.weight, self.down_proj.bias
            y = F.linear(h * mask, weight.to(h.dtype), bias)
        else:
            y = self.down_proj(h * mask)
        return self._add_expert_bias(y, expert_ids).view(shape)

    def _add_expert_bias(self, y: torch.Tensor, expert_ids: torch.Tensor):
        if self.expert_bias is None:
            return y
        return y + self.expert_bias[expert_ids].to(y.dtype)  # [T, D]


# -- attention with pruned q/k head dims --------------------------------------------


def qk_pruned_forward(
    self,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    past_key_values=None,
    **kwargs,
):
    """Llama-style attention whose queries and keys keep only the head dims in
    ``qk_index`` (the same in every head; RoPE pairs kept together, ordered so the
    pruned vector's halves are still the rotated pairs). Values and o_proj keep the
    whole head, and the scale stays 1/sqrt(head_dim): q.k over the kept dims is the
    dense score with the pruned dims' contributions removed, as trained."""
    input_shape = hidden_states.shape[:-1]
    kept = self.qk_index.numel()
    query = self.q_proj(hidden_states).view(*input_shape, -1, kept).transpose(1, 2)
    key = self.k_proj(hidden_states).view(*input_shape, -1, kept).transpose(1, 2)
    value = self.v_proj(hidden_states).view(*input_shape, -1, self.head_dim)
    value = value.transpose(1, 2)
    cos, sin = position_embeddings
    cos, sin = cos[..., self.qk_index], sin[..., self.qk_index]
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    if past_key_values is not None:
        key, value = past_key_values.update(key, value, self.layer_idx)
    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, eager_attention_forward
    )
    window = getattr(
        self, "sliding_window", getattr(self.config, "sliding_window", None)
    )
    output, weights = attention_interface(
        self,
        query,
        key,
        value,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        sliding_window=window,
        **kwargs,
    )
    output = output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(output), weights


class ToMoELlamaQKAttention(LlamaAttention):
    forward = qk_pruned_forward


class ToMoEMistralQKAttention(MistralAttention):
    forward = qk_pruned_forward


class ToMoEQwen2QKAttention(Qwen2Attention):
    forward = qk_pruned_forward


QK_PRUNED_ATTENTION = {
    LlamaAttention: ToMoELlamaQKAttention,
    MistralAttention: ToMoEMistralQKAttention,
    Qwen2Attention: ToMoEQwen2QKAttention,
}


def prune_qk_dims(
    attention: nn.Module, dims: torch.Tensor, copy_weights: bool = True
) -> nn.Module:
    """Keep only head dims ``dims`` (sorted pairs [P, P + hd/2]) of q_proj/k_proj,
    in place; the module becomes its family's q/k-pruned attention. Without
    ``copy_weights`` only the shapes change (a checkpoint fills them)."""
    cls = QK_PRUNED_ATTENTION.get(type(attention))
    if cls is None:
        raise ValueError(
            f"q/k head-dim pruning does not support {type(attention).__name__} "
            f"(supported: {sorted(c.__name__ for c in QK_PRUNED_ATTENTION)})"
        )
    head_dim = attention.head_dim
    dims = dims.to(torch.long).cpu()
    for name in ("q_proj", "k_proj"):
        old = getattr(attention, name)
        heads = old.out_features // head_dim
        rows = torch.arange(heads, device="cpu")[:, None] * head_dim + dims[None, :]
        rows = rows.flatten()
        new = nn.Linear(
            old.in_features,
            rows.numel(),
            bias=old.bias is not None,
            device=old.weight.device,
            dtype=old.weight.dtype,
        )
        if copy_weights:
            with torch.no_grad():
                new.weight.copy_(old.weight[rows.to(old.weight.device)])
                if old.bias is not None:
                    new.bias.copy_(old.bias[rows.to(old.bias.device)])
        setattr(attention, name, new)
    attention.register_buffer("qk_index", dims.to(attention.q_proj.weight.device))
    attention.__class__ = cls
    return attention


def _replace_attention(model: nn.Module, config) -> None:
    """Prune q/k of each decoder layer as ``config.moe_qk_dims`` says (on load)."""
    dims = getattr(config, "moe_qk_dims", None)
    if not dims:
        return
    for layer, kept in zip(model.model.layers, dims):
        if kept is None:
            continue
        head_dim = layer.self_attn.head_dim
        half = torch.arange(kept // 2, device="cpu")  # placeholder; loaded later
        placeholder = torch.cat([half, half + head_dim // 2])
        prune_qk_dims(layer.self_attn, placeholder, copy_weights=False)


def _replace_mlps(model: nn.Module, config) -> None:
    """Swap each decoder layer's MLP for a ToMoESparseMLP sized from the config."""
    if config.moe_union_sizes is None:
        return
    layers = model.model.layers
    if len(config.moe_union_sizes) != len(layers):
        raise ValueError(
            f"moe_union_sizes has {len(config.moe_union_sizes)} entries but the "
            f"model has {len(layers)} layers; the config.json is inconsistent"
        )
    bias = bool(getattr(config, "mlp_bias", False))
    for layer, union in zip(layers, config.moe_union_sizes):
        if union is None:  # layer left dense
            continue
        layer.mlp = ToMoESparseMLP(
            config.hidden_size,
            union,
            config.num_experts,
            config.moe_block_size,
            config.hidden_act,
            bias=bias,
            expert_bias=bool(getattr(config, "moe_expert_bias", False)),
        )


def _without_mlp_entries(plan: dict | None) -> dict:
    """A tensor-parallel plan without the dense MLP's entries: after conversion
    ``mlp.gate_proj/up_proj/down_proj`` no longer exist, and the experts are not
    split across devices."""
    return {k: v for k, v in (plan or {}).items() if ".mlp." not in k}


@dataclass(repr=False)
class _ToMoEConfigFields:
    """The per-layer ToMoE expert layout every ToMoE config adds to its family's."""

    num_experts: int = 8
    num_experts_per_tok: int = 1
    moe_block_size: int = 64
    moe_union_sizes: list | None = None
    moe_expert_bias: bool = False
    moe_qk_dims: list | None = None


def _own_uncast_tensors(model: nn.Module) -> None:
    """Give the tensors that loaded without a dtype cast memory of their own.

    ``from_pretrained`` maps the checkpoint file; a tensor it casts (every weight of
    a float32 file loaded in bfloat16) gets new memory, one it does not cast (the
    float32 routers, the bool expert tables) stays a view of the mapping and keeps
    the whole file resident: SmolLM2 p = 0.5 in bfloat16 held 525 MiB more than the
    dense model, which lets the mapping go. In float32 nothing is cast and the
    mapping is the weights' memory; copying the tables costs under a MiB."""
    dtype = model.dtype
    with torch.no_grad():
        for module in model.modules():
            for group in (module._parameters, module._buffers):
                for name, tensor in group.items():
                    if tensor is None or tensor.dtype == dtype:
                        continue
                    if tensor.device.type != "cpu":
                        continue
                    if isinstance(tensor, nn.Parameter):
                        # a new Parameter: assigning .data would keep a loaded
                        # view's base (and with it the mapping) alive
                        group[name] = nn.Parameter(
                            tensor.detach().clone(), tensor.requires_grad
                        )
                    else:
                        group[name] = tensor.clone()


class _ToMoEModel:
    """A family's causal LM with its MLPs (and pruned q/k) replaced as the config
    says; the routers stay fp32 whatever dtype the model loads in (``_strict``:
    transformers keeps the plain list in fp32 only for float16)."""

    _keep_in_fp32_modules = _keep_in_fp32_modules_strict = ["router", "shared_gate"]

    def __init__(self, config):
        super().__init__(config)
        _replace_mlps(self, config)
        _replace_attention(self, config)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        # (model, loading_info) with output_loading_info=True
        _own_uncast_tensors(loaded[0] if isinstance(loaded, tuple) else loaded)
        return loaded


class ToMoELlamaConfig(_ToMoEConfigFields, LlamaConfig):
    model_type = "tomoe_llama"
    base_model_tp_plan = _without_mlp_entries(LlamaConfig.base_model_tp_plan)


class ToMoELlamaForCausalLM(_ToMoEModel, LlamaForCausalLM):
    config_class = ToMoELlamaConfig


class ToMoEMistralConfig(_ToMoEConfigFields, MistralConfig):
    model_type = "tomoe_mistral"
    base_model_tp_plan = _without_mlp_entries(MistralConfig.base_model_tp_plan)


class ToMoEMistralForCausalLM(_ToMoEModel, MistralForCausalLM):
    config_class = ToMoEMistralConfig


class ToMoEQwen2Config(_ToMoEConfigFields, Qwen2Config):
    model_type = "tomoe_qwen2"
    base_model_tp_plan = _without_mlp_entries(Qwen2Config.base_model_tp_plan)


class ToMoEQwen2ForCausalLM(_ToMoEModel, Qwen2ForCausalLM):
    config_class = ToMoEQwen2Config


class ToMoEQwen3Config(_ToMoEConfigFields, Qwen3Config):
    model_type = "tomoe_qwen3"
    base_model_tp_plan = _without_mlp_entries(Qwen3Config.base_model_tp_plan)


class ToMoEQwen3ForCausalLM(_ToMoEModel, Qwen3ForCausalLM):
    config_class = ToMoEQwen3Config


# dense class name -> (ToMoE config class, ToMoE model class)
TOMOE_ARCHITECTURES = {
    "LlamaForCausalLM": (ToMoELlamaConfig, ToMoELlamaForCausalLM),
    "MistralForCausalLM": (ToMoEMistralConfig, ToMoEMistralForCausalLM),
    "Qwen2ForCausalLM": (ToMoEQwen2Config, ToMoEQwen2ForCausalLM),
    "Qwen3ForCausalLM": (ToMoEQwen3Config, ToMoEQwen3ForCausalLM),
}
