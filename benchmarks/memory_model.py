"""
Predicted training memory of ToMoE's train modes, from a model's shapes.

    python -m benchmarks.memory_model [--out benchmarks/results/memory_prediction.json]

Prints the README's table (Llama-3-8B and Llama-3-70B on one 141 GB GPU, and
SmolLM2 as run by ``benchmarks.memory``, whose measurement checks the formula) and
writes it as JSON. The formula counts what one training step keeps alive, term by
term, from the code:

global (the whole model on the device, one backward through every layer)
    weights       P * w                      (w bytes per weight: 2 bf16, 4 fp32)
    activations   N * L * (36 D + 8 D_kv + 12 I)
                  per token and layer, what autograd saves under bf16 autocast with
                  an fp32 residual stream: 4 fp32 D-vectors (two RMSNorms' inputs
                  and outputs), bf16 copies of every Linear's input (q, k, v, o,
                  gate, up, down), RoPE'd q/k and SDPA's q, k, v, out, and in the
                  MLP gate, up, act(gate), act*up, the expert mask and the masked
                  product (6 I)
    logits        N * V * 24                 teacher and student logits, their fp32
                  log-softmaxes and the KL's gradient, [N, V] each
    trainable     16 * (L * (D E + 128 I + E I) + 70k)
                  routers, mask decoders, per-expert block logits and the GRU
                  hypernetwork, with fp32 AdamW state

layerwise (llm-compressor's sequential pipeline: one decoder layer on the device)
    weights       max(one decoder layer, embedding) * w
    activations   B * S * (2 D + 2 I + 2 D_kv) * a   one calibration batch through
                  one layer, no grad (a activation bytes)
    the captured MLP inputs, the fit and the pipeline's intermediates live on
    the CPU, not the device:
    host          N_cal * S * (D + 2 d_head) * a     one copy of every batch's
                  hidden states and RoPE cos/sin (llm-compressor keeps a subgraph's
                  inputs until it has propagated them)
                  + N_cal * S^2 * a                  every batch's causal mask
                  + T_fit * (2 D + 2 I) * 4          the fit at its peak (inputs,
                  their unit copy, h and the channel energy, fp32; the rest is
                  sliced 4096 tokens at a time)
                  + 3 D I * 4                        the fitted layer's dense MLP
                  weights, onloaded in fp32 for its fit (every other converted MLP
                  stays offloaded, on disk if the model is: ``match_offloading``)
N tokens per step (batch x window), L layers, D hidden, D_kv key/value width, I MLP
width, V vocabulary, E experts. Attention is SDPA (no [S, S] matrix is stored).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.common import write_json

GIB = 1024**3
MIB = 1024**2


@dataclass(frozen=True)
class Shapes:
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @property
    def kv_width(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    @property
    def layer_params(self) -> int:
        d, i, kv = self.hidden, self.intermediate, self.kv_width
        return d * (2 * d + 2 * kv) + 3 * d * i + 2 * d

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        heads = 1 if self.tied else 2
        final_norm = self.hidden
        return (
            self.layers * self.layer_params + heads * self.embedding_params + final_norm
        )

    @classmethod
    def from_config(cls, name: str, config: dict) -> Shapes:
        return cls(
            name=name,
            layers=config["num_hidden_layers"],
            hidden=config["hidden_size"],
            intermediate=config["intermediate_size"],
            heads=config["num_attention_heads"],
            kv_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
            vocab=config["vocab_size"],
            tied=bool(config.get("tie_word_embeddings", False)),
        )


# the public configs' shapes (meta-llama/Meta-Llama-3-8B and -70B config.json)
LLAMA3_8B = Shapes("Llama-3-8B", 32, 4096, 14336, 32, 8, 128256, False)
LLAMA3_70B = Shapes("Llama-3-70B", 80, 8192, 28672, 64, 8, 128256, False)


def trainable_params(s: Shapes, experts: int = 8) -> int:
    per_layer = s.hidden * experts + 128 * s.intermediate + experts * s.intermediate
    return s.layers * per_layer + 70_000  # + GRU hypernetwork (input 32, hidden 64)


def global_bytes(
    s: Shapes, tokens: int, weight_bytes: int = 2, experts: int = 8
) -> dict:
    """Device bytes of one global-mode training step, per term."""
    d, i, kv = s.hidden, s.intermediate, s.kv_width
    terms = {
        "weights": s.params * weight_bytes,
        "activations": tokens * s.layers * (36 * d + 8 * kv + 12 * i),
        "logits": tokens * s.vocab * 24,
        "trainable": 16 * trainable_params(s, experts),
    }
    return {**terms, "total": sum(terms.values())}


def layerwise_bytes(
    s: Shapes,
    batch: int,
    window: int,
    calibration_samples: int,
    fit_tokens: int,
    weight_bytes: int = 2,
    act_bytes: int = 2,
) -> dict:
    """Device bytes of layer-wise mode, and what it keeps on the host."""
    d, i, kv = s.hidden, s.intermediate, s.kv_width
    terms = {
        "weights": max(s.layer_params, s.embedding_params) * weight_bytes,
        "activations": batch * window * (2 * d + 2 * i + 2 * kv) * act_bytes,
    }
    head_dim = d // s.heads
    host = (
        calibration_samples * window * (d + 2 * head_dim) * act_bytes
        + calibration_samples * window * window * act_bytes
        + fit_tokens * (2 * d + 2 * i) * 4
        + 3 * d * i * 4
    )
    return {**terms, "total": sum(terms.values()), "host": host}


def prediction_table(smollm2: Shapes | None = None) -> list[dict]:
    """Rows for the README: the two Llama-3 sizes in bf16 at the GPU batch a user
    would pick (4 x 2048 tokens), and SmolLM2 as ``benchmarks.memory`` runs it on
    this CPU (fp32 weights, bf16 autocast, batch 4 x 128, 512 samples)."""
    rows = []
    for shapes in (LLAMA3_8B, LLAMA3_70B):
        g = global_bytes(shapes, tokens=4 * 2048, weight_bytes=2)
        lw = layerwise_bytes(shapes, 4, 2048, 512, 16384, weight_bytes=2)
        rows.append(_row(shapes, "4 x 2048, bf16 weights", g, lw))
    if smollm2 is not None:
        g = global_bytes(smollm2, tokens=4 * 128, weight_bytes=4)
        lw = layerwise_bytes(smollm2, 4, 128, 512, 16384, weight_bytes=4, act_bytes=4)
        rows.append(_row(smollm2, "4 x 128, fp32 weights (this CPU)", g, lw))
    return rows


def _row(s: Shapes, setting: str, g: dict, lw: dict) -> dict:
    return {
        "model": s.name,
        "params_billion": round(s.params / 1e9, 3),
        "setting": setting,
        "global_gib": {k: round(v / GIB, 2) for k, v in g.items()},
        "layerwise_gib": {k: round(v / GIB, 2) for k, v in lw.items()},
        "global_fits_141gb": g["total"] <= 141e9,
        "layerwise_fits_141gb": lw["total"] <= 141e9,
        "shapes": asdict(s),
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | setting | global: weights + activations + logits + trainable "
        "= total | fits 141 GB | layer-wise device (host) | fits |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        g, lw = r["global_gib"], r["layerwise_gib"]
        lines.append(
            f"| {r['model']} ({r['params_billion']}B) | {r['setting']} | "
            f"{g['weights']} + {g['activations']} + {g['logits']} + "
            f"{g['trainable']} = **{g['total']} GiB** | "
            f"{'yes' if r['global_fits_141gb'] else 'no'} | "
            f"**{lw['total']} GiB** ({lw['host']} GiB) | "
            f"{'yes' if r['layerwise_fits_141gb'] else 'no'} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/memory_prediction.json")
    args = p.parse_args(argv)
    import json

    from tomoe_modifier.assets import prepare_smollm2

    config = json.loads((prepare_smollm2() / "config.json").read_text())
    rows = prediction_table(Shapes.from_config("SmolLM2-135M", config))
    write_json(Path(args.out), rows)
    print(markdown(rows))


if __name__ == "__main__":
    main()
