"""``generate(cache_implementation="zipage")`` on models that mix sliding-window and full layers.

Tiny Gemma 3 (query pre-scaling, a RoPE base per layer type, sdpa) and GPT-OSS (learned sink
logits, eager) configs: with a budget above the length the tokens are those of transformers'
``DynamicCache``; below it, every step's logits are those of a reference that shares no code with
zipage (tests/reference_attention.py) in which each full layer sees the positions the cache kept
and each sliding layer its window, while the sliding layers' pages stay bounded.
"""

from __future__ import annotations

import pytest
import torch
from conftest import SLIDING_WINDOW, left_padded_batch, tiny_sliding_model
from reference_attention import reference_logits
from test_kept_positions import generate_with_kept
from transformers import DynamicCache

import zipage

FAMILIES = ["gemma3", "gpt_oss"]
KW = dict(do_sample=False, pad_token_id=0, eos_token_id=None)


@pytest.mark.parametrize("family", FAMILIES)
def test_identical_to_dynamic_cache_above_the_budget(family):
    model = tiny_sliding_model(family)
    ids, mask = left_padded_batch(lengths=(14, 5, 9))
    ref = model.generate(ids, attention_mask=mask, past_key_values=DynamicCache(config=model.config),
                         max_new_tokens=24, **KW)
    cache = zipage.ZipageCache(config=model.config, budget=64, page_size=4, buffer=4, window=2)
    out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=24, **KW)
    assert torch.equal(out, ref)
    assert cache.num_compressions == 0
    # the sliding layers hold their window (plus the rest of a page), not the 37 tokens seen (the last
    # generated token never went through the model)
    sliding = [i for i, t in enumerate(model.config.layer_types) if t == "sliding_attention"]
    for i in sliding:
        assert SLIDING_WINDOW <= cache.stored_length(i) < SLIDING_WINDOW + 4
        assert cache.kept_positions(i)[0, 0].tolist() == list(range(37 - SLIDING_WINDOW, 37))
    assert cache.stored_length() == 37
    stats = cache.stats()
    # per row: the page of the first position in the last query's window (31, in page 28..31) and on:
    # 3 pages of 4, whatever the length
    assert stats["window_pages_in_use"] == 3 * 3


@pytest.mark.parametrize("family", FAMILIES)
def test_through_the_cache_implementation_name(family):
    model = tiny_sliding_model(family, seed=1)
    ids = torch.randint(3, 96, (1, 11), generator=torch.Generator().manual_seed(1))
    ref = model.generate(ids, max_new_tokens=16, **KW)
    out = model.generate(ids, max_new_tokens=16, cache_implementation="zipage",
                         cache_config={"budget": 40, "page_size": 4, "buffer": 4, "window": 2}, **KW)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("family, scorer", [("gemma3", "zipage"), ("gpt_oss", "snapkv")])
def test_below_the_budget_matches_the_reference(family, scorer):
    model = tiny_sliding_model(family)
    ids, mask = left_padded_batch(lengths=(20, 9, 14))
    B, W = ids.shape
    new = 30
    cfg = dict(budget=10, page_size=4, buffer=4, window=3, scorer=scorer)
    tokens, logits, steps, cache = generate_with_kept(model, ids, mask, cfg, new)
    assert cache.num_compressions >= 4 and cache.stored_length() <= 14
    real = torch.cat([mask.bool(), torch.ones(B, new - 1, dtype=torch.bool)], dim=1)
    kept = [{W + i - 1: [layer[b] for layer in step] for i, step in enumerate(steps)} for b in range(B)]
    ref = reference_logits(model, tokens[:, : W + new - 1], real, kept)[:, W - 1 :]
    torch.testing.assert_close(logits, ref, atol=2e-5, rtol=2e-5)
    # the reference sees the eviction: with every position kept, the logits are far off
    full = reference_logits(model, tokens[:, : W + new - 1], real, [{}] * B)[:, W - 1 :]
    assert (full - logits).abs().max() > max(0.1, 5 * (ref - logits).abs().max())
    # the sliding layers' pages were freed as the window moved: 3 per row at most (window 6, pages of 4),
    # after a prompt of 20 columns (6 pages per row)
    assert cache.window_pages.pool.num_used <= 3 * B and cache.window_pages.pool.peak_used <= 6 * B


def test_sliding_layers_are_not_refused_and_all_sliding_models_are():
    from transformers import MistralConfig

    model = tiny_sliding_model("gemma3")
    zipage.ZipageCache(config=model.config, budget=32)
    with pytest.raises(ValueError, match="sliding-window attention on every layer"):
        zipage.ZipageCache(config=MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=32,
                                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                                max_position_embeddings=256, sliding_window=16), budget=32)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_prompt_longer_than_the_window_leaves_no_pages_held_and_reset_starts_small(family):
    """The sliding layers' pool held every page a long prompt needed for the rest of the run (50 pages where
    3 are in use): past the budget zipage then held about twice a DynamicCache's bytes. Its pages in use now
    move to a smaller pool; the tokens are the same; reset() starts from an empty pool."""
    model = tiny_sliding_model(family)
    ids = torch.randint(3, 96, (1, 200), generator=torch.Generator().manual_seed(3))
    cfg = dict(budget=16, page_size=4, buffer=4, window=2)
    ref_cache = DynamicCache(config=model.config)
    model.generate(ids, past_key_values=ref_cache, max_new_tokens=20, **KW)
    dynamic = _tensor_bytes(t for layer in ref_cache.layers for t in (layer.keys, layer.values))
    cache = zipage.ZipageCache(config=model.config, **cfg)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=20, **KW)
    w = cache.window_pages
    assert w.pool.num_pages <= 2 * w.pool.num_used + 2 and w.k_pool.shape[1] == w.pool.num_pages
    held = _tensor_bytes([w.k_pool, w.v_pool] + [t for layer in cache.full for t in (layer.keys, layer.values)])
    assert held == cache.stats()["kv_bytes_held"] < dynamic / 2
    # the same tokens as a cache whose pool never shrank (no compaction of the window's pages)
    keep = zipage.ZipageCache(config=model.config, **cfg)
    keep.window_pages._shrink = lambda: None
    assert torch.equal(model.generate(ids, past_key_values=keep, max_new_tokens=20, **KW), out)
    assert keep.window_pages.pool.num_pages >= 50
    cache.reset()
    short = ids[:, :8]
    model.generate(short, past_key_values=cache, max_new_tokens=4, **KW)
    assert cache.window_pages.pool.num_pages <= 4


def test_a_cache_built_for_another_model_is_refused():
    from conftest import tiny_model

    llama, gemma = tiny_model("llama", num_hidden_layers=4), tiny_sliding_model("gemma3")
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    for model, other in ((llama, gemma), (gemma, llama), (tiny_model("llama", num_hidden_layers=2), llama)):
        cache = zipage.ZipageCache(config=other.config, budget=256, page_size=4)
        with pytest.raises(ValueError, match="this ZipageCache was built for .* but the model has"):
            model.generate(ids, past_key_values=cache, max_new_tokens=3, **KW)
