"""
One recipe, two compressions: ToMoE (p = 0.5), then GPTQ int4 weights, on SmolLM2.

    python examples/smollm2_tomoe_w4a16.py          # about 30 minutes on 2 CPU cores

The same recipe as ``recipes/tomoe_50_w4a16.yaml`` built from Python objects with the
example's CPU training budget. ToMoE converts the MLPs in its ``on_initialize``, so
GPTQ (listed after it) quantizes every expert Linear; the routers stay in high
precision. The result is saved in compressed-tensors format (packed int4, group 64:
SmolLM2's hidden size 576 is not a multiple of 128) and reloads with
``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from llmcompressor import oneshot  # noqa: E402
from llmcompressor.modifiers.gptq import GPTQModifier  # noqa: E402
from smollm2_common import (  # noqa: E402
    add_tomoe_arguments,
    calibration_set,
    evaluate_folder,
    machine,
    peak_rss_mib,
    smollm2,
    tomoe_from_args,
    write_json,
)

import tomoe_modifier  # noqa: E402,F401  (registers ToMoEModifier + architectures)

GROUP_SIZE = 64


def w4a16_gptq() -> GPTQModifier:
    """int4 symmetric weights, group 64; routers and lm_head left alone."""
    return GPTQModifier(
        targets=["Linear"],
        ignore=["lm_head", "re:.*mlp\\.router$"],
        config_groups={
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 4,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "group",
                    "group_size": GROUP_SIZE,
                },
            }
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_tomoe_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    # Select model and load it.
    model_dir, tokenizer = smollm2()
    save_dir = Path(
        args.output
        or f"outputs/SmolLM2-135M-Instruct-ToMoE-E{args.num_experts}"
        f"-p{int(round(args.ratio * 100))}-W4A16-G{GROUP_SIZE}"
    )

    # Select calibration dataset.
    dataset = calibration_set(tokenizer, args.seq_len)

    # Apply algorithms.
    t0 = time.perf_counter()
    oneshot(
        model=str(model_dir),
        dataset=dataset,
        recipe=[tomoe_from_args(args, save_dir / "tomoe_report.json"), w4a16_gptq()],
        max_seq_length=args.seq_len,
        num_calibration_samples=args.num_calibration_samples,
        batch_size=args.batch_size,
        output_dir=str(save_dir),
    )
    wall_s = time.perf_counter() - t0
    peak_rss = peak_rss_mib()
    report = json.loads((save_dir / "tomoe_report.json").read_text())

    # Confirm generations of the quantized model look sane.
    result = evaluate_folder(save_dir, tokenizer)
    config = json.loads((save_dir / "config.json").read_text())
    results = {
        "model": "SmolLM2-135M-Instruct",
        "recipe": "ToMoE + GPTQ W4A16 (group 64)",
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "quant_method": config["quantization_config"]["quant_method"],
        "tomoe_w4a16_ppl": result["ppl"],
        "active_ratio_mean": result["active_ratio_mean"],
        "calibration_tokens": report["tokens"],
        "oneshot_wall_s": round(wall_s, 1),
        "peak_rss_mib": round(peak_rss, 1),
        "machine": machine(),
        "sample": result["sample"],
    }
    write_json(save_dir / "results.json", results)
    print(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
