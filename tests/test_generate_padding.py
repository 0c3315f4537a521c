"""generate() with padding inside a sequence, flex attention masks, models that bypass the capture,
and config objects edited after they were built."""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded_batch, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

import zipage
import zipage.cache as cache_mod
from zipage.cache import _new_token_validity

GREEDY = dict(do_sample=False, pad_token_id=0)
# No pooling: max-pooling looks at neighbouring slots, and moving the pads changes the neighbours.
NO_POOL = {"pooling": "none"}


def _two_layouts(seed: int = 0, width: int = 40, pads: int = 6, at: int = 12):
    """The same real tokens twice: row 1 padded at the front, and row 1 with its pads at ``at``
    (inside the sequence). Row 0 has no padding. Returns (ids, mask) for each layout."""
    g = torch.Generator().manual_seed(seed)
    real = torch.randint(3, 96, (2, width - pads), generator=g)
    row0 = torch.randint(3, 96, (width,), generator=g)
    left = torch.zeros(2, width, dtype=torch.long)
    left_mask = torch.ones(2, width, dtype=torch.long)
    left[0], left[1, pads:] = row0, real[1]
    left_mask[1, :pads] = 0
    mid = torch.zeros(2, width, dtype=torch.long)
    mid_mask = torch.ones(2, width, dtype=torch.long)
    mid[0] = row0
    mid[1, :at], mid[1, at + pads :] = real[1, :at], real[1, at:]
    mid_mask[1, at : at + pads] = 0
    return (left, left_mask), (mid, mid_mask)


def _gen(model, ids, mask, n, scores=False, **cache):
    kw = dict(attention_mask=mask, max_new_tokens=n, **GREEDY)
    if cache:
        kw.update(cache_implementation="zipage", cache_config=cache)
    out = model.generate(ids, output_scores=True, return_dict_in_generate=True, **kw)
    tokens = out.sequences[:, ids.shape[1] :]
    return (tokens, torch.stack(out.scores, dim=1)) if scores else tokens


@pytest.mark.parametrize("paged", [False, True])
def test_padding_inside_the_prompt_large_budget_matches_dynamic_cache(monkeypatch, paged):
    model = tiny_model("llama")
    _, (ids, mask) = _two_layouts()
    ref, ref_scores = _gen(model, ids, mask, 30, scores=True)
    if paged:  # the CUDA decode path, wired on the CPU with the reference op
        monkeypatch.setattr(cache_mod, "use_triton", lambda *tensors: True)
    out, out_scores = _gen(model, ids, mask, 30, scores=True, budget=128, page_size=8)
    assert torch.equal(out, ref)
    torch.testing.assert_close(out_scores, ref_scores, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("budget", [16, 36])
def test_padding_inside_the_prompt_is_the_same_as_padding_in_front(monkeypatch, paged, budget):
    """With compressions: the pads are masked, never kept in place of real tokens, and the masks after
    a compression cover exactly the real stored tokens, so where the pads sit does not matter
    (budget 36: the first compressions must keep some of the 6 pads)."""
    model = tiny_model("llama")
    (lids, lmask), (mids, mmask) = _two_layouts()
    assert torch.equal(_gen(model, lids, lmask, 20), _gen(model, mids, mmask, 20))  # the premise, full KV
    cfg = dict(budget=budget, page_size=4, buffer=4, **NO_POOL)
    if paged:
        monkeypatch.setattr(cache_mod, "use_triton", lambda *tensors: True)
    left, left_scores = _gen(model, lids, lmask, 40, scores=True, **cfg)
    mid, mid_scores = _gen(model, mids, mmask, 40, scores=True, **cfg)
    assert torch.equal(left, mid)
    torch.testing.assert_close(mid_scores, left_scores, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("budget", [16, 36])
def test_mask_after_compression_covers_the_real_stored_tokens(budget):
    """The mask the model's attention receives lets through exactly the stored tokens that are real."""
    model = tiny_model("llama")
    _, (ids, mask) = _two_layouts()
    cache = zipage.ZipageCache(config=model.config, budget=budget, page_size=4, buffer=4)
    rows, kept_pads = [], []
    real_attention = zipage.capture._original_function

    def spy(module, name):
        fn = real_attention(module, name)

        def wrapped(mod, q, k, v, attention_mask, **kw):
            if module.layer_idx == 0 and q.shape[2] == 1 and cache.num_compressions:
                layer = cache.layers[0]
                if attention_mask is None:
                    allowed = torch.ones_like(layer.valid)
                else:
                    allowed = attention_mask[:, 0, -1, :]
                    allowed = allowed if allowed.dtype == torch.bool else allowed == 0
                rows.append(torch.equal(allowed[:, :-1], layer.valid[:, :-1]))
                kept_pads.append(int((~layer.valid).sum()))
            return fn(mod, q, k, v, attention_mask, **kw)

        return wrapped

    zipage.capture._original_function = spy
    try:
        model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=30, **GREEDY)
    finally:
        zipage.capture._original_function = real_attention
    assert rows and all(rows)
    assert cache.padding_gap
    assert (max(kept_pads) > 0) == (budget == 36)  # at 36 pads stay stored for a while, and stay masked


@pytest.mark.parametrize("paged", [False, True])
def test_left_padded_continuation_matches_dynamic_cache(monkeypatch, paged):
    """A second turn, left-padded, continues a cache: its pads sit inside the sequence."""
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (2, 20), generator=g)
    turn = torch.randint(3, 96, (2, 11), generator=g)
    turn[1, :5] = 0
    tmask = torch.ones(2, 11, dtype=torch.long)
    tmask[1, :5] = 0

    def two_turns(cache):
        first = model.generate(ids, past_key_values=cache, max_new_tokens=5, **GREEDY)
        ids2 = torch.cat([first, turn], 1)
        mask2 = torch.cat([torch.ones_like(first), tmask], 1)
        return model.generate(ids2, attention_mask=mask2, past_key_values=cache, max_new_tokens=15, **GREEDY)[:, -15:]

    ref = two_turns(DynamicCache(config=model.config))
    if paged:
        monkeypatch.setattr(cache_mod, "use_triton", lambda *tensors: True)
    out = two_turns(zipage.ZipageCache(config=model.config, budget=512, page_size=8))
    assert torch.equal(out, ref)


def test_flex_block_mask_validity_reads_the_padding():
    from transformers.masking_utils import create_causal_mask

    model = tiny_model("llama", attn="flex_attention")
    ids, mask = left_padded_batch(lengths=(12, 5, 9))
    emb = model.model.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    block = create_causal_mask(
        config=model.config, inputs_embeds=emb, attention_mask=mask, past_key_values=None, position_ids=pos
    )
    assert not isinstance(block, torch.Tensor)
    valid = _new_token_validity(block, 3, ids.shape[1], ids.device)
    assert torch.equal(valid, mask.bool())
    assert torch.equal(_new_token_validity(block, 3, 4, ids.device), mask[:, -4:].bool())


def _falcon():
    cfg = AutoConfig.for_model(
        "falcon", vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_kv_heads=2, new_decoder_architecture=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _xglm():
    cfg = AutoConfig.for_model(
        "xglm", vocab_size=96, d_model=64, num_layers=2, attention_heads=4, ffn_dim=128,
        max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    cfg._attn_implementation = "eager"  # (XGLM has no SDPA path)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("arch", ["xglm", "falcon"])
def test_model_whose_attention_bypasses_the_capture(arch):
    """XGLM (and Falcon up to transformers 5.24) does not call its attention through the AttentionInterface: a
    scorer that needs the queries is refused at the first step, the model's attention setting is left as it
    was, and a scorer that reads no queries works (and equals DynamicCache while nothing is evicted)."""
    from test_engine_models import falcon_has_its_own_attention

    if arch == "falcon" and not falcon_has_its_own_attention():
        pytest.skip("this transformers' Falcon goes through the AttentionInterface")
    model = _falcon() if arch == "falcon" else _xglm()
    name = model.config._attn_implementation
    ids, mask = left_padded_batch()
    with pytest.raises(RuntimeError, match="does not go through transformers' AttentionInterface"):
        _gen(model, ids, mask, 5, budget=64, page_size=8)
    assert model.config._attn_implementation == name
    ref = _gen(model, ids, mask, 20)
    out = _gen(model, ids, mask, 20, budget=64, page_size=8, scorer="streaming")
    assert torch.equal(out, ref)
    assert model.config._attn_implementation == name
    small = _gen(model, ids, mask, 40, budget=16, page_size=4, scorer="streaming")
    assert small.shape == (3, 40)
    assert model.config._attn_implementation == name


def test_edited_config_is_checked_again():
    cfg = zipage.ZipageConfig(budget=64, page_size=8)
    cfg.budget = -3
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="budget=-3"):
        zipage.ZipageCache(config=model.config, zipage_config=cfg)


def test_replace_page_size_moves_a_default_buffer():
    assert zipage.ZipageConfig(budget=64).replace(page_size=8).buffer == 8
    assert zipage.ZipageConfig(budget=64, buffer=32).replace(page_size=8).buffer == 32
    assert zipage.ZipageConfig(budget=64, page_size=8).replace(page_size=16, buffer=4).buffer == 4
