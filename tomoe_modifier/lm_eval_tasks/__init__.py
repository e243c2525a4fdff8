"""lm-eval perplexity tasks over the project's held-out text, and a Python runner.

Tasks (rolling log-likelihood, like lm-eval's ``wikitext``): ``tomoe_wiki_test``
(held-out Wikipedia articles), ``tomoe_news`` (Lee news corpus) and the group
``tomoe_ppl`` with both. From the shell::

    TASKS=$(python -m tomoe_modifier.lm_eval_tasks | tail -n 1)
    ARGS=pretrained=OUT,trust_remote_code=True,dtype=float32,max_length=512
    lm_eval --model hf --model_args $ARGS --tasks tomoe_wiki_test,tomoe_news \\
        --include_path $TASKS --batch_size 4

(``tail``: importing the package makes llm-compressor print a warning on stdout.)
lm-eval scores each article in disjoint windows of the model's max length; without
``max_length=512`` that is the config's ``max_position_embeddings`` (8192 for
SmolLM2), not the project's evaluation context of 512.
"""

from __future__ import annotations

import math
from pathlib import Path

__all__ = [
    "DEFAULT_TASKS",
    "EVAL_CONTEXT",
    "OWN_TASKS",
    "evaluate_perplexity",
    "include_path",
]

DEFAULT_TASKS = ("tomoe_wiki_test", "tomoe_news")
OWN_TASKS = frozenset({*DEFAULT_TASKS, "tomoe_wiki_validation", "tomoe_ppl"})
EVAL_CONTEXT = 512
_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def include_path() -> str:
    """Folder to pass to lm-eval's ``--include_path`` / ``TaskManager``."""
    return str(Path(__file__).resolve().parent)


def _build_lm(model_or_path, tokenizer, batch_size, max_length, dtype, device):
    import torch
    from lm_eval.models.huggingface import HFLM

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(model_or_path, (str, Path)):
        return HFLM(
            pretrained=str(model_or_path),
            tokenizer=tokenizer,
            trust_remote_code=True,
            dtype=dtype,
            device=device,
            batch_size=batch_size,
            max_length=max_length,
        )
    if tokenizer is None:
        from transformers import AutoTokenizer

        source = getattr(model_or_path, "name_or_path", "")
        if not source or not Path(source).is_dir():
            raise ValueError(
                "pass tokenizer= with a model object whose name_or_path is not a "
                f"local folder (got {source!r})"
            )
        tokenizer = AutoTokenizer.from_pretrained(source)
    return HFLM(
        pretrained=model_or_path,
        tokenizer=tokenizer,
        batch_size=batch_size,
        max_length=max_length,
    )


def evaluate_perplexity(
    model_or_path,
    tasks=DEFAULT_TASKS,
    limit: int | float | None = None,
    batch_size: int = 4,
    max_length: int = EVAL_CONTEXT,
    tokenizer=None,
    dtype: str = "float32",
    device: str | None = None,
) -> dict:
    """
    Run the tomoe_* perplexity tasks with ``lm_eval.simple_evaluate``.

    :param model_or_path: a model folder (loaded with ``trust_remote_code``) or a
        loaded ``PreTrainedModel`` (then ``dtype``/``device`` are not applied)
    :param limit: first N articles per task (or a fraction), for quick checks only
    :param max_length: scoring window; lm-eval otherwise uses the model's maximum
    :return: per task, lm-eval's word/byte perplexity and bits per byte, plus
        ``token_perplexity`` (exp of the mean NLL per predicted token, counted
        with the model's tokenizer as lm-eval windows it), and the settings
    """
    from tomoe_modifier.assets.cache import require_extra

    require_extra("lm_eval", "eval")
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    lm = _build_lm(model_or_path, tokenizer, batch_size, max_length, dtype, device)
    # indexing lm-eval's thousands of built-in tasks takes seconds: skip it when
    # only the tomoe_* tasks are asked for
    manager = TaskManager(
        include_path=include_path(), include_defaults=not set(tasks) <= OWN_TASKS
    )
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        limit=limit,
        task_manager=manager,
        log_samples=True,
        bootstrap_iters=0,
    )
    results = {}
    for task in out["results"]:
        if task not in out.get("samples", {}):
            continue  # a group row; its tasks are reported on their own
        row = out["results"][task]
        metrics = {m: row[f"{m},none"] for m in _METRICS if f"{m},none" in row}
        metrics.update(_token_perplexity(lm, out["samples"][task]))
        results[task] = metrics
    return {
        "results": results,
        "settings": {
            "tasks": tasks,
            "limit": limit,
            "batch_size": batch_size,
            "max_length": lm.max_length,
            "dtype": dtype if isinstance(model_or_path, (str, Path)) else None,
            "lm_eval": lm_eval.__version__,
            "scoring": "loglikelihood_rolling, disjoint windows of max_length",
        },
    }


def _token_perplexity(lm, samples) -> dict:
    """Token-level perplexity: lm-eval predicts every token of a document once."""
    nll, tokens = 0.0, 0
    for sample in samples:
        (text,) = sample["arguments"][0]
        loglikelihood = sample["resps"][0][0]
        if isinstance(loglikelihood, (tuple, list)):
            loglikelihood = loglikelihood[0]
        nll -= float(loglikelihood)
        tokens += len(lm.tok_encode(text))
    return {
        "token_perplexity": math.exp(nll / tokens) if tokens else float("nan"),
        "tokens": tokens,
        "documents": len(samples),
    }
