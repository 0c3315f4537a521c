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

import zipage
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
    return exact_forward(model, ids, kv, lambda i, j: (j > i - tail) | (i < prompt_len))


def exact_forward(model, ids: torch.Tensor, kv: str, rule) -> torch.Tensor:
    """Logits ``[B, T, V]`` of one forward of ``ids`` in which query ``i`` reads key and value ``j`` exactly where
    ``rule(i, j)`` (``[T, 1]`` and ``[1, T]`` positions) holds, and through ``kv``'s page codes elsewhere."""

    def attention(module, q, k, v, mask, scaling=None, **kw):
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        T = q.shape[2]
        i, j = torch.arange(T, device=q.device).view(-1, 1), torch.arange(T, device=q.device).view(1, -1)
        exact = rule(i, j)
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
    layer = cache.full[0]
    assert cache.stats()["exact_tail_bytes"] == 2 * 4 * 2 * layer.keys.shape[2] * layer.keys.shape[3] * 4 * len(
        cache.full)  # (rows x tail tokens x keys and values x heads x head dim x float32 x layers)
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
    (dict(exact_tail=14, budget=16, window=4, sinks=4, kv_cache_dtype="fp8"), "budget=16"),
])
def test_exact_tail_refuses_what_it_cannot_keep(fields, words):
    with pytest.raises(ValueError, match=words):
        ZipageConfig(**fields)


@pytest.mark.parametrize("scorer", ["random", "snapkv"])
def test_compressions_keep_an_exact_tail_longer_than_the_window(scorer):
    """``exact_tail - 1`` above the window: every compression keeps the last ``exact_tail - 1`` tokens too
    (``ZipageConfig.kept_last``), so the tail holds the last stored slots' tokens, each as the model computed it.
    Without the tail the same scorer evicts some of them (the test would not see a compression that forgot)."""
    model = tiny_model("qwen3")
    ids = torch.tensor(prompts_of((24, 24), seed=8))
    kw = dict(max_new_tokens=30, do_sample=False, pad_token_id=0, eos_token_id=None, cache_implementation="zipage",
              return_dict_in_generate=True)
    cfg = dict(budget=16, page_size=4, buffer=4, window=2, scorer=scorer, kv_cache_dtype="fp8", exact_tail=9)
    assert ZipageConfig(**cfg).kept_last == 8
    caches = {tail: model.generate(ids, cache_config={**cfg, "exact_tail": tail}, **kw).past_key_values
              for tail in (9, 0)}
    evicted = 0
    for tail, cache in caches.items():
        assert cache.num_compressions > 1
        for layer in cache.full:
            kept = cache.kept_positions(layer.layer_idx)[:, :, -8:]  # [B, H_kv, 8]
            last = torch.arange(layer.seen - 8, layer.seen)
            if tail:
                assert torch.equal(kept, last.expand_as(kept))
                want, _ = quantize_reference(layer.tail[0].transpose(1, 2), QUANTIZED_KV["fp8"])
                assert torch.equal(layer.keys[:, layer.stored - 8:layer.stored].view(torch.uint8),
                                   want.view(torch.uint8))
            else:
                evicted += int((kept != last).any())
    assert evicted


def test_paged_decode_steps_merge_the_tail_as_the_dense_path_does(monkeypatch):
    """The CUDA path (paged kernel over the pages but the tail, the tail exactly, merged; here with the
    reference kernels on the CPU): the dense path's logits, compressions included, and the band reference's."""
    import zipage.cache as cache_mod

    model = tiny_model("qwen3")
    ids = torch.tensor(prompts_of((16, 16), seed=5))
    kw = dict(max_new_tokens=40, do_sample=False, pad_token_id=0, eos_token_id=None, output_logits=True,
              return_dict_in_generate=True, cache_implementation="zipage")
    evicting = dict(budget=32, page_size=16, buffer=16, window=8, kv_cache_dtype="fp8", exact_tail=6)
    full = {**evicting, "budget": 4096}
    dense = {name: model.generate(ids, cache_config=cfg, **kw) for name, cfg in (("evicting", evicting),
                                                                                   ("full", full))}
    calls = []
    real = cache_mod.paged_decode_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("return_lse"))
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "use_triton", lambda *tensors: True)
    monkeypatch.setattr(cache_mod, "paged_decode_attention", spy)
    for name, cfg in (("evicting", evicting), ("full", full)):
        calls.clear()
        paged = model.generate(ids, cache_config=cfg, **kw)
        assert len(calls) > 2 * 30 and all(calls), (name, len(calls))  # (decode steps of both layers, paged)
        torch.testing.assert_close(torch.stack(paged.logits), torch.stack(dense[name].logits), atol=1e-4, rtol=1e-4)
        assert torch.equal(paged.sequences, dense[name].sequences)
    assert dense["evicting"].past_key_values.num_compressions > 0
    want = reference_logits(model, dense["full"].sequences, ids.shape[1], "fp8", 6)[:, ids.shape[1] - 1:-1]
    torch.testing.assert_close(torch.stack(dense["full"].logits, dim=1), want, atol=1e-4, rtol=1e-4)


def test_merge_attention_is_attention_over_the_union():
    """Two key sets (one empty for a row) and sink logits merged: softmax over all their logits at once."""
    from zipage.kernels import exact_attention, merge_attention

    g = torch.Generator().manual_seed(0)
    B, Hkv, G, D = 3, 2, 2, 8
    q = torch.randn(B, Hkv * G, D, generator=g)
    k = torch.randn(B, Hkv, 9, D, generator=g)
    v = torch.randn(B, Hkv, 9, D, generator=g)
    valid = torch.ones(B, 9, dtype=torch.bool)
    valid[1, :4] = False  # row 1's first set holds nothing real
    sinks = torch.randn(Hkv * G, generator=g)
    first = exact_attention(q, k[:, :, :4], v[:, :, :4], valid[:, :4], 0.5, softcap=3.0)
    second = exact_attention(q, k[:, :, 4:], v[:, :, 4:], valid[:, 4:], 0.5, softcap=3.0)
    got = merge_attention([first, second], sinks)
    kk, vv = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    logits = 3.0 * torch.tanh(torch.einsum("bhd,bhnd->bhn", q, kk) * 0.5 / 3.0)
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    logits = torch.cat([logits, sinks.view(1, -1, 1).expand(B, -1, 1)], dim=-1)
    want = torch.einsum("bhn,bhnd->bhd", torch.softmax(logits, dim=-1)[..., :-1], vv)
    torch.testing.assert_close(got, want)
    assert torch.isinf(first[1][1]).all()


@pytest.mark.parametrize("triton", [False, True])
@pytest.mark.parametrize("splits", [1, 3])
def test_paged_decode_returns_the_logsumexp(triton, splits):
    """``return_lse``: the output unchanged and ``logsumexp`` of each row's logits (-inf for a row with nothing
    to attend), from the reference and from the Triton kernel (its interpreter on a CPU), FP8 pages included."""
    from zipage.kernels import FP8, paged_decode_attention_reference, paged_decode_attention_triton
    from zipage.kernels.paged_attention import _dense_kv

    if triton and torch.cuda.is_available():
        pytest.skip("interpreter case (the GPU runs the gpu cases)")
    g = torch.Generator().manual_seed(1)
    B, Hq, Hkv, D, page = 3, 4, 2, 16, 8
    k = torch.randn(6, page, Hkv, D, generator=g)
    v = torch.randn(6, page, Hkv, D, generator=g)
    kq, ks = quantize_reference(k, FP8)
    vq, vs = quantize_reference(v, FP8)
    table = torch.tensor([[0, 1, 2], [3, 4, 5], [5, 4, 3]], dtype=torch.int32)
    lens = torch.tensor([20, 9, 3], dtype=torch.int32)
    starts = torch.tensor([0, 2, 3], dtype=torch.int32)  # (row 2: nothing to attend)
    q = torch.randn(B, Hq, D, generator=g)
    for scales in ((None, None), (ks, vs)):
        kc, vc = (k, v) if scales[0] is None else (kq, vq)
        if triton:
            run = lambda **kw: paged_decode_attention_triton(  # noqa: E731
                q, kc, vc, table, lens, 0.25, starts, num_splits=splits, k_scale=scales[0], v_scale=scales[1], **kw)
        else:
            run = lambda **kw: paged_decode_attention_reference(  # noqa: E731
                q, kc, vc, table, lens, 0.25, starts, *scales, **kw)
        out, lse = run(return_lse=True)
        torch.testing.assert_close(out, run(), atol=0, rtol=0)
        for b in range(B):
            kd, _ = _dense_kv(kc, vc, table, b, int(lens[b]), *scales)
            logits = torch.einsum("hd,lhd->hl", q[b], kd[int(starts[b]):].repeat_interleave(Hq // Hkv, dim=1)) * 0.25
            torch.testing.assert_close(lse[b], torch.logsumexp(logits, dim=-1), atol=1e-5, rtol=1e-5)
        assert torch.isinf(lse[2]).all()
    with pytest.raises(ValueError, match="sinks"):
        paged_decode_attention_reference(q, k, v, table, lens, 0.25, return_lse=True, sinks=torch.zeros(Hq))


CUDA = torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("kv, dtype", [("fp8", torch.float32), ("int8", torch.float32), ("fp8", torch.bfloat16)])
def test_exact_tail_on_cuda_takes_the_paged_path_and_matches_the_band_reference(kv, dtype, monkeypatch):
    """On the GPU the decode steps run the Triton paged kernel (the general kernel for float32 queries, the 8-bit
    decode kernel for bf16 ones) with ``return_lse`` and merge the tail: the band reference's logits (float32:
    to 1e-3; bf16: to its rounding)."""
    import zipage.cache as cache_mod

    model = tiny_model("qwen3").to("cuda", dtype)
    ids = torch.tensor(prompts_of((40, 40), seed=4), device="cuda")
    calls = []
    real = cache_mod.paged_decode_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("return_lse"))
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "paged_decode_attention", spy)
    out = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None,
                         output_logits=True, return_dict_in_generate=True, cache_implementation="zipage",
                         cache_config=dict(budget=4096, page_size=16, window=16, kv_cache_dtype=kv, exact_tail=16))
    assert calls and all(calls)
    want = reference_logits(model, out.sequences, ids.shape[1], kv, 16)[:, ids.shape[1] - 1:-1].float()
    got = torch.stack(out.logits, dim=1).float()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
    else:
        assert (got - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("splits", [1, 4])
def test_paged_decode_returns_the_logsumexp_on_cuda(splits):
    """The compiled kernels' ``return_lse`` (the general kernel on float32 queries, the 8-bit decode kernel on
    bf16 ones) against the reference's."""
    from zipage.kernels import FP8, paged_decode_attention_reference, paged_decode_attention_triton

    g = torch.Generator(device="cuda").manual_seed(1)
    B, Hq, Hkv, D, page = 4, 8, 2, 128, 64
    k = torch.randn(12, page, Hkv, D, generator=g, device="cuda")
    v = torch.randn(12, page, Hkv, D, generator=g, device="cuda")
    kq, ks = quantize_reference(k, FP8)
    vq, vs = quantize_reference(v, FP8)
    table = torch.arange(12, dtype=torch.int32, device="cuda").view(4, 3)
    lens = torch.tensor([150, 64, 1, 192], dtype=torch.int32, device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(B, Hq, D, generator=g, device="cuda").to(dtype)
        out, lse = paged_decode_attention_triton(q, kq, vq, table, lens, 0.1, num_splits=splits, k_scale=ks,
                                                 v_scale=vs, return_lse=True)
        want_out, want_lse = paged_decode_attention_reference(q, kq, vq, table, lens, 0.1, None, ks, vs,
                                                              return_lse=True)
        torch.testing.assert_close(lse, want_lse, atol=2e-2, rtol=1e-3)
        torch.testing.assert_close(out.float(), want_out.float(), atol=2e-2, rtol=2e-2)


def test_exact_tail_follows_the_tokens_when_a_compression_evicts_padding_from_the_window():
    """Padding inside a sequence, within the observation window at a compression: the compression evicts it and
    older tokens move into the last slots. The tail then holds the tokens of those slots (their page values where
    they were not in it), never the evicted padding's keys and values."""
    model = tiny_model("llama")
    ids = torch.randint(3, 96, (2, 18), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 18, dtype=torch.long)
    ids[1, 12:15], mask[1, 12:15] = 0, 0  # row 1: 12 real tokens, 3 of padding, 3 real
    cfg = dict(budget=12, page_size=4, buffer=4, window=8, kv_cache_dtype="fp8", exact_tail=9)
    cache = zipage.ZipageCache(config=model.config, **cfg)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, max_new_tokens=1, past_key_values=cache)
    model.generate(ids, attention_mask=mask, **kw)
    more = torch.cat([ids, torch.full((2, 1), 5)], 1)
    model.generate(more, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1), **kw)
    assert cache.num_compressions == 1 and cache.padding_gap
    for layer in cache.full:
        stored, (tk, tv) = layer.stored, layer.tail
        real = layer.valid[:, stored - 8:stored]  # (evicted padding leaves only real tokens there)
        assert real.all()
        for tail, codes, scales in ((tk, layer.keys, layer.key_scales), (tv, layer.values, layer.value_scales)):
            # (one scale per row here, tests/conftest.py: page values requantize to their own codes)
            want_codes, _ = quantize_reference(tail.transpose(1, 2), QUANTIZED_KV["fp8"])
            assert torch.equal(codes[:, stored - 8:stored].view(torch.uint8), want_codes.view(torch.uint8))
