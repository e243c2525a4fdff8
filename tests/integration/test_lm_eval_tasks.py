"""The tomoe_* lm-eval tasks on a tiny random Llama and a tiny synthetic text cache."""

import json
import math
import os
import shutil
import subprocess

import pytest

from tests.testing_utils import make_model, save_model
from tomoe_modifier.lm_eval_tasks import evaluate_perplexity, include_path
from tomoe_modifier.lm_eval_tasks.docs import load_docs

TASKS = ("tomoe_wiki_test", "tomoe_news")


@pytest.mark.integration
def test_docs_come_from_the_cache(text_cache):
    docs = load_docs("news")["test"]
    assert len(docs) == 4 and docs[0]["title"] == "news-0"
    with pytest.raises(ValueError, match="valid names"):
        load_docs("wikitext")


@pytest.mark.integration
def test_perplexity_is_finite_and_repeatable(tmp_path, text_cache):
    model_dir = save_model(make_model("llama"), tmp_path / "model")
    first = evaluate_perplexity(model_dir, TASKS, max_length=32)
    second = evaluate_perplexity(model_dir, TASKS, max_length=32)
    assert first["results"] == second["results"]
    assert first["settings"]["max_length"] == 32
    for task in TASKS:
        row = first["results"][task]
        assert math.isfinite(row["word_perplexity"]) and row["word_perplexity"] > 1
        assert math.isfinite(row["bits_per_byte"])
        assert row["documents"] == 4
        # one token per word with the test tokenizer: token and word level agree
        assert row["token_perplexity"] == pytest.approx(row["word_perplexity"])
    # a shorter window gives each token less context: the numbers must change
    longer = evaluate_perplexity(model_dir, TASKS, max_length=128)
    assert longer["results"] != first["results"]


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("lm_eval") is None, reason="lm_eval CLI not on PATH")
def test_cli_with_include_path_matches_python(tmp_path, text_cache):
    model_dir = save_model(make_model("llama"), tmp_path / "model")
    expected = evaluate_perplexity(model_dir, TASKS, max_length=32)["results"]
    out = tmp_path / "lm_eval_out"
    cmd = [
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={model_dir},trust_remote_code=True,dtype=float32,max_length=32",
        "--tasks",
        ",".join(TASKS),
        "--include_path",
        include_path(),
        "--batch_size",
        "4",
        "--device",
        "cpu",
        "--output_path",
        str(out),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("**/results_*.json")
    results = json.loads(path.read_text())["results"]
    for task in TASKS:
        for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
            got = results[task][f"{metric},none"]
            assert got == pytest.approx(expected[task][metric], rel=1e-6)


@pytest.mark.integration
def test_token_perplexity_matches_a_manual_computation(tmp_path, text_cache):
    """Articles shorter than max_length: one window, every token predicted once
    from the tokens before it and the tokenizer's BOS (lm-eval's prefix)."""
    import torch
    import torch.nn.functional as F

    from tests.testing_utils import make_tokenizer

    model = make_model("llama")
    model_dir = save_model(model, tmp_path / "model")
    got = evaluate_perplexity(model_dir, ["tomoe_news"], max_length=128)
    tok = make_tokenizer()
    nll, count = 0.0, 0
    with torch.no_grad():
        for doc in load_docs("news")["test"]:
            ids = tok(doc["text"], add_special_tokens=False)["input_ids"]
            assert len(ids) < 128
            x = torch.tensor([[tok.bos_token_id] + ids[:-1]])
            logits = model(x).logits[0]
            nll += F.cross_entropy(logits, torch.tensor(ids), reduction="sum").item()
            count += len(ids)
    row = got["results"]["tomoe_news"]
    assert row["tokens"] == count
    assert row["token_perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
