"""
One recipe, two compressions: ToMoE (p = 0.5), then GPTQ int4 weights, on SmolLM2.

    python examples/smollm2_tomoe_w4a16.py          # about 40 minutes on 2 CPU cores

Runs ``recipes/tomoe_50_w4a16.yaml`` as shipped. ToMoE converts the MLPs in its
``on_initialize``, so GPTQ (listed after it) quantizes every expert Linear; the
routers stay in high precision. The result is saved in compressed-tensors format
(packed int4, group 64: SmolLM2's hidden size 576 is not a multiple of 128) and
reloads with ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from llmcompressor import oneshot  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import tomoe_modifier  # noqa: E402,F401  (registers ToMoEModifier + architectures)
from tomoe_modifier.assets import (  # noqa: E402
    build_calibration_dataset,
    load_split,
    prepare_smollm2,
)
from tomoe_modifier.lm_eval_tasks import evaluate_perplexity  # noqa: E402
from tomoe_modifier.precision import machine_info  # noqa: E402
from tomoe_modifier.stats import active_ratio_on_text, peak_rss_mib  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tomoe_50_w4a16.yaml"
MAX_SEQUENCE_LENGTH = 128
BATCH_SIZE = 4
NUM_CALIBRATION_SAMPLES = 512
EVAL_CONTEXT = 512
THREADS = 2


def main() -> None:
    torch.set_num_threads(THREADS)

    # Select model and load it.
    model_dir = prepare_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    save_dir = Path("outputs/SmolLM2-135M-Instruct-ToMoE-E8-p50-W4A16-G64")

    # Select calibration dataset.
    dataset = build_calibration_dataset(
        tokenizer, load_split("wiki_train"), MAX_SEQUENCE_LENGTH, seed=0
    )

    # Apply algorithms.
    t0 = time.perf_counter()
    oneshot(
        model=str(model_dir),
        dataset=dataset,
        recipe=str(RECIPE),
        max_seq_length=MAX_SEQUENCE_LENGTH,
        num_calibration_samples=NUM_CALIBRATION_SAMPLES,
        batch_size=BATCH_SIZE,
        output_dir=str(save_dir),
    )
    wall_s = time.perf_counter() - t0
    peak_rss = peak_rss_mib()

    # Confirm generations of the quantized model look sane.
    ppl = evaluate_perplexity(
        save_dir, max_length=EVAL_CONTEXT, dtype="float32", device="cpu"
    )["results"]
    model = AutoModelForCausalLM.from_pretrained(save_dir, dtype=torch.float32)
    active = active_ratio_on_text(
        model, tokenizer, load_split("wiki_test"), EVAL_CONTEXT
    )
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    generated = model.generate(**prompt, max_new_tokens=24, do_sample=False)
    config = json.loads((save_dir / "config.json").read_text())
    results = {
        "model": "SmolLM2-135M-Instruct",
        "recipe": "recipes/tomoe_50_w4a16.yaml",
        "quant_method": config["quantization_config"]["quant_method"],
        "eval_dtype": "float32",
        "tomoe_w4a16_ppl": ppl["tomoe_wiki_test"]["token_perplexity"],
        "tomoe_w4a16_news_ppl": ppl["tomoe_news"]["token_perplexity"],
        "active_ratio_mean": active["active_ratio_mean"],
        "oneshot_wall_s": round(wall_s, 1),
        "peak_rss_mib": round(peak_rss, 1),
        "machine": machine_info(),
        "sample": tokenizer.decode(generated[0, prompt["input_ids"].shape[1] :]),
    }
    (save_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
