"""ZipageConfig.exact_tail: 8-bit pages whose queries read their last ``exact_tail`` tokens exactly.

The reference is the model's own forward over the whole sequence with an attention that rounds every key
and value through the page codes except, for query ``i``, the keys ``j > i - exact_tail`` (and, for a
prompt's queries, the whole prompt, which generate() attends to in one step before it is read back)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_engine import prompts_of
from transformers import AttentionInterface

from zipage import LLM, ZipageConfig
from zipage.kernels import dequantize_reference, quantize_reference
from zipage.kernels.fp8 import QUANTIZED_KV, kv_rotation, rotate

REF = "zipage_exact_tail_reference"


def rounded(x: torch.Tensor, kv: str) -> torch.Tensor:
    """``x`` [..., D] as 8-bit pages of ``kv`` read it back (INT8 in the rotated basis)."""
    rot = kv_rotation(kv, x.shape[-1], x.device)
    return rotate(dequantize_reference(*quantize_reference(rotate(x, rot), QUANTIZED_KV[kv])), rot).to(x.dtype)


def reference_logits(model, ids: torch.Tensor, prompt_len: int, kv: str, tail: int) -> torch.Tensor:
    """Logits ``[B, T, V]`` of one forward of ``ids`` whose attention follows the exact-tail rule."""

    def attention(module, q, k, v, mask, scaling=None, **kw):
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        T = q.shape[2]
        i, j = torch.arange(T).view(-1, 1), torch.arange(T).view(1, -1)
        exact = (j > i - tail) | (i < prompt_len)
        logits = torch.where(exact, q @ k.transpose(-1, -2), q @ rounded(k, kv).transpose(-1, -2)) * scaling
        p = torch.softmax(logits.masked_fill(j > i, float("-inf")), dim=-1)
        out = (p * exact) @ v + (p * ~exact) @ rounded(v, kv)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(REF, attention)
    before = model.config._attn_implementation
    model.set_attn_implementation(REF)
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        model.set_attn_implementation(before)


@pytest.mark.parametrize("kv, tail, family", [("fp8", 5, "qwen3"), ("fp8", 1, "llama"), ("int8", 3, "llama")])
def test_exact_tail_matches_the_band_reference(kv, tail, family):
    """No eviction: every decode step's logits are the reference's, and differ from pages read whole."""
    model = tiny_model(family)
    ids = torch.tensor(prompts_of((11, 11), seed=4))
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None, output_logits=True,
              return_dict_in_generate=True, cache_implementation="zipage")
    cfg = dict(budget=4096, page_size=4, window=8, kv_cache_dtype=kv)
    got = model.generate(ids, cache_config={**cfg, "exact_tail": tail}, **kw)
    plain = model.generate(ids, cache_config=cfg, **kw)
    want = reference_logits(model, got.sequences, ids.shape[1], kv, tail)[:, ids.shape[1] - 1:-1]
    logits = torch.stack(got.logits, dim=1)
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)
    # (the test can tell: pages read whole give other logits once the first decode step reads them)
    assert (torch.stack(plain.logits, dim=1)[:, 1:] - want[:, 1:]).abs().max() > 1e-3


@pytest.mark.parametrize("kv", ["fp8", "int8"])
def test_exact_tail_holds_the_last_kept_tokens_through_compressions(kv):
    """With compressions: the tail each layer keeps is, rounded through the page codes, exactly what the
    pages hold in the last ``exact_tail - 1`` stored slots (the same tokens, in the same order)."""
    model = tiny_model("qwen3")
    ids = torch.tensor(prompts_of((24, 24), seed=8))
    cfg = dict(budget=12, page_size=4, buffer=4, window=4, kv_cache_dtype=kv, exact_tail=5)
    out = model.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=0, eos_token_id=None,
                         cache_implementation="zipage", cache_config=cfg, return_dict_in_generate=True)
    cache = out.past_key_values
    assert cache.num_compressions > 1
    for layer in cache.full:
        stored = layer.stored
        tk, tv = layer.tail
        assert tk.shape[2] == 4
        for tail, codes, scales in ((tk, layer.keys, layer.key_scales), (tv, layer.values, layer.value_scales)):
            rot = kv_rotation(kv, tail.shape[-1], tail.device)
            want_codes, want_scales = quantize_reference(rotate(tail, rot).transpose(1, 2), QUANTIZED_KV[kv])
            assert torch.equal(codes[:, stored - 4:stored].view(torch.uint8), want_codes.view(torch.uint8))
            torch.testing.assert_close(scales[:, stored - 4:stored], want_scales)


def test_exact_tail_beam_search_runs_and_keeps_tails_per_beam():
    model = tiny_model("qwen3")
    ids = torch.tensor(prompts_of((10,), seed=2))
    cfg = dict(budget=12, page_size=4, buffer=4, window=4, kv_cache_dtype="fp8", exact_tail=3)
    out = model.generate(ids, max_new_tokens=16, num_beams=2, do_sample=False, pad_token_id=0, eos_token_id=None,
                         cache_implementation="zipage", cache_config=cfg, return_dict_in_generate=True)
    assert out.sequences.shape == (1, 26) and out.past_key_values.full[0].tail[0].shape[0] == 2


@pytest.mark.parametrize("fields, words", [
    (dict(exact_tail=4), "8-bit pages"),
    (dict(exact_tail=-1, kv_cache_dtype="fp8"), "exact_tail=-1"),
    (dict(exact_tail=18, window=16, kv_cache_dtype="fp8"), "window=16"),
])
def test_exact_tail_refuses_what_it_cannot_keep(fields, words):
    with pytest.raises(ValueError, match=words):
        ZipageConfig(**fields)


def test_the_engine_refuses_exact_tail():
    with pytest.raises(NotImplementedError, match="exact_tail"):
        LLM(tiny_model("qwen3"), budget=16, page_size=4, window=4, num_pages=16, kv_cache_dtype="fp8", exact_tail=4)
