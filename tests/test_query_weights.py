"""FP8 keys' query-weighted scale search (``kernels/fp8.py``, ``src/zipage/query_moments.py``): the weights from
the queries' moments, the search against a brute force over the same candidates, the store kernel against the
reference byte for byte, and the moments generate() and the engine count against the queries the model computed."""

from __future__ import annotations

import pytest
import torch
from conftest import CUDA, requires_triton, tiny_model, tiny_sliding_model
from test_engine import prompts_of
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

import zipage.cache
import zipage.engine.runner
from zipage.calibration import CALIBRATION_TEXT, calibration_ids
from zipage import LLM, SamplingParams
from zipage.kernels import dequantize_reference, quantize_reference, store_kv_reference, store_kv_triton
from zipage.kernels.fp8 import (
    FP8,
    FP8_MAX,
    MAX_WEIGHTED_DIM,
    SCALE_STEPS,
    U_MAX,
    V_MAX,
    WEIGHT_BITS,
    WEIGHTED_ERROR_BITS,
    WEIGHTED_WEIGHT_BITS,
    _hadamard,
    check_weights,
    query_weighting,
    query_weights,
    rotate,
    scale_steps_table,
    value_pool,
)
from zipage.kernels.paged_kv import read_slots
from zipage.query_moments import QueryMoments

pytestmark = pytest.mark.fp8_scale_search  # (the weights act through the scale search)
cpu_only = pytest.mark.skipif(CUDA, reason="interpreter case (the GPU runs the gpu cases)")


def moments_of(q: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sums of the queries ``[N, H_q, D]`` of each KV head's group and of their squares (float64), and how many."""
    x = q.double().reshape(q.shape[0], heads, -1, q.shape[-1])
    return x.sum(dim=(0, 2)), (x * x).sum(dim=(0, 2)), x.shape[0] * x.shape[2]


def queries(n: int, heads: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Queries with a large shared mean (as a head's queries have) and channels of unequal spread."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(heads, dim, generator=g) * 2
    return mean + torch.randn(n, heads, dim, generator=g) * torch.rand(dim, generator=g) * 2


# ----------------------------------------------------------------------------- the weights
def test_query_weights_are_the_mean_and_variance_scaled_together():
    q = queries(4000, 3, 64)
    s, sq, n = moments_of(q, 3)
    w = query_weights(s, sq, n)
    assert w.dtype == torch.int64 and w.shape == (2, 3, 64)
    u, v = w[0].double(), w[1].double()
    mean, var = s / n, sq / n - (s / n) ** 2
    for h in range(3):
        # one factor z per head: u = round(mean * sqrt(z)), v = round(var * z), the larger term at its range's top
        z = min(U_MAX**2 / mean[h].abs().max() ** 2, V_MAX / var[h].max())
        assert torch.equal(u[h], torch.round(mean[h] * z**0.5))
        assert torch.equal(v[h], torch.round(var[h] * z))
        assert u[h].abs().max() == U_MAX or v[h].max() == V_MAX
    assert (u.abs() <= U_MAX).all() and (v >= 0).all() and (v <= V_MAX).all()
    # what the search compares is unchanged by a common factor of the queries (a softmax temperature)
    assert torch.equal(query_weights(s * 4, sq * 16, n), w)
    # batched over layers, and before any query: u = 0, v = 1 (the plain squared error)
    both = query_weights(torch.stack([s, torch.zeros_like(s)]), torch.stack([sq, torch.zeros_like(sq)]),
                         torch.tensor([float(n), 0.0])[:, None, None])
    assert torch.equal(both[0], w)
    assert not both[1, 0].any() and (both[1, 1] == 1).all()


def test_query_weights_are_checked(monkeypatch):
    w = torch.zeros(2, 3, 64, dtype=torch.int64)
    check_weights("t", w, (3, 64))
    for bad in (w.int(), w[:, :2], w[:1]):
        with pytest.raises(ValueError, match="query weights must be int64 of shape"):
            check_weights("t", bad, (3, 64))
    with pytest.raises(ValueError, match="head dims up to 256"):
        check_weights("t", torch.zeros(2, 1, 512, dtype=torch.int64), (1, 512))
    with pytest.raises(ValueError, match="query weights must be"):
        quantize_reference(torch.randn(4, 3, 64), FP8, w[:, :2])
    assert query_weighting("fp8", 128) and not query_weighting("int8", 128) and not query_weighting("auto", 128)
    assert not query_weighting("fp8", 512)
    monkeypatch.setenv("ZIPAGE_FP8_QUERY_WEIGHTS", "0")
    assert not query_weighting("fp8", 128)
    monkeypatch.setenv("ZIPAGE_FP8_QUERY_WEIGHTS", "yes")
    with pytest.raises(ValueError, match="ZIPAGE_FP8_QUERY_WEIGHTS='yes'"):
        query_weighting("fp8", 128)
    monkeypatch.setenv("ZIPAGE_FP8_QUERY_WEIGHTS", "1")
    monkeypatch.setenv("ZIPAGE_FP8_SCALE_STEPS", "1")  # one scale per row: nothing to weight
    assert not query_weighting("fp8", 128)


def test_the_weighted_error_cannot_overflow():
    """The largest error the weighted search can count, in Python's exact integers, stays below 2^63: every
    element half of e4m3's widest step (16 codes) off, the weights at their largest, the largest candidate."""
    e = 16 * 2**WEIGHTED_ERROR_BITS
    _, weight, _ = scale_steps_table(64, "cpu")
    top = int(weight.max()) >> (WEIGHT_BITS - WEIGHTED_WEIGHT_BITS)
    worst = (V_MAX * e * e * MAX_WEIGHTED_DIM + (U_MAX * e * MAX_WEIGHTED_DIM) ** 2) * top
    assert worst < 2**63


# ----------------------------------------------------------------------------- the search
def test_the_weighted_search_picks_the_least_logit_error():
    """Each row's scale is the candidate whose codes have the least ``e^T (u u^T + diag(v)) e`` (brute force
    with torch's e4m3 cast, in float64), and over the queries the weights came from, the logits move far less
    than with the plain squared error's choice."""
    torch.manual_seed(0)
    H, D = 3, 64
    x = torch.randn(200, H, D) * torch.exp(torch.randn(200, H, 1))
    q = queries(2000, H, D, seed=1)
    w = query_weights(*moments_of(q, H))
    codes, scales = quantize_reference(x, FP8, w)
    plain_codes, plain_scales = quantize_reference(x)
    base = x.abs().amax(-1) / FP8_MAX
    u, v = w[0].double(), w[1].double()
    errs = []
    for i in range(SCALE_STEPS):
        s = (base * torch.tensor(2.0 ** (i / SCALE_STEPS))).double()
        c = (x.double() / s[..., None]).clamp(-FP8_MAX, FP8_MAX)
        e = c.float().to(FP8).double() - c  # in codes
        errs.append(((v * e * e).sum(-1) + (u * e).sum(-1) ** 2) * (2 ** (i / SCALE_STEPS)) ** 2)
    errs = torch.stack(errs, -1)
    chosen = torch.round(torch.log2(scales.double() / base.double()) * SCALE_STEPS).long()
    assert torch.equal(scales, (base * (2.0 ** (chosen.float() / SCALE_STEPS))).float())
    got = errs.gather(-1, chosen[..., None]).squeeze(-1)
    # (the search counts errors in 2^-6 codes: a near-tie may go either way)
    assert (got <= errs.min(-1).values * 1.02 + 1e-9).all()
    assert (chosen == errs.argmin(-1)).float().mean() > 0.9
    def shift(c, s):  # every query's logit shift by every row's rounding
        return torch.einsum("nhd,thd->nth", q.double(), dequantize_reference(c, s).double() - x.double())

    weighted, plain = shift(codes, scales).pow(2).mean(), shift(plain_codes, plain_scales).pow(2).mean()
    assert weighted < 0.5 * plain
    # the plain error grows a little: the search trades it for the logits'
    l2 = lambda c, s: (dequantize_reference(c, s) - x).pow(2).sum()  # noqa: E731
    assert l2(plain_codes, plain_scales) < l2(codes, scales) < 2 * l2(plain_codes, plain_scales)


def test_the_weighted_search_gives_the_same_bytes_in_any_batch():
    """A large call (the reference sums the weighted errors as float64 matrix products, exact for these whole
    numbers) gives the bytes of row-by-row calls (int64 sums): rows of every size, a zero row, head dim 256."""
    torch.manual_seed(7)
    H, D = 4, 256
    w = query_weights(*moments_of(queries(300, H, D, seed=7), H))
    x = torch.randn(64, H, D) * torch.exp(torch.randn(64, H, 1) * 3)
    x[0, 1] = 0.0
    codes, scales = quantize_reference(x, FP8, w)
    for i in range(x.shape[0]):
        c, s = quantize_reference(x[i : i + 1], FP8, w)
        assert torch.equal(c.view(torch.uint8), codes[i : i + 1].view(torch.uint8)) and torch.equal(s, scales[i : i + 1])


def test_uniform_weights_search_by_the_squared_error():
    """Before any query (u = 0, v = 1) the weighted search chooses as the plain one does, but for near-ties the
    coarser units may decide otherwise."""
    torch.manual_seed(2)
    x = torch.randn(500, 2, 64) * 3
    uniform = query_weights(torch.zeros(2, 64), torch.zeros(2, 64), 0)
    _, s1 = quantize_reference(x, FP8, uniform)
    _, s0 = quantize_reference(x)
    assert (s1 == s0).float().mean() > 0.97


@cpu_only
@requires_triton
@pytest.mark.parametrize("dtype, D", [(torch.bfloat16, 128), (torch.float32, 256), (torch.float16, 80)])
def test_store_kernel_weighs_keys_as_the_reference(dtype, D):
    """The store kernel's weighted search against the reference's, byte for byte, on hard rows (tiny, huge, e4m3
    subnormals beside normals, all zero), 16-bit inputs, a head dim that is not a power of two; values (searched
    by the plain error) in the dimension-major layout, and the weights changing the keys' choice."""
    torch.manual_seed(D)
    N, H, page = 12, 3, 8
    mag = torch.tensor([1e-30, 1e-6, 1.0, 3e4, 1e30, 1.0])[torch.arange(N * H) % 6].view(N, 1, H, 1)
    k = torch.randn(N, 1, H, D) * mag
    k[2, 0, 1, : D // 2] *= 1e-4
    k[4, 0, 0] = 0.0
    v = torch.randn(N, 1, H, D)
    if dtype != torch.float32:
        k, v = k.clamp(-6e4, 6e4).to(dtype), v.to(dtype)
    w = query_weights(*moments_of(queries(500, H, D, seed=D), H))
    slots = torch.randperm(4 * page)[:N].view(N, 1)
    kc, kss = torch.zeros(4, page, H, D, dtype=FP8), torch.zeros(4, page, H)
    vc, vss = value_pool((4, page, H, D), FP8, "cpu"), torch.zeros(4, page, H)
    want = [kc.clone(), vc.clone(), kss.clone(), vss.clone()]
    store_kv_reference(want[0], slots, k, want[2], w)
    store_kv_reference(want[1], slots, v, want[3])
    store_kv_triton(kc, slots, k, vc, v, kss, vss, key_weights=w)
    for got, ref in ((kc, want[0]), (vc, want[1]), (kss, want[2]), (vss, want[3])):
        assert torch.equal(got.contiguous().view(torch.uint8), ref.contiguous().view(torch.uint8))
    plain = torch.zeros_like(kss)
    store_kv_reference(torch.zeros_like(kc), slots, k, plain)
    assert not torch.equal(plain, kss)  # (the weights decide something here)


# ----------------------------------------------------------------------------- the moments
def test_query_moments_count_the_real_queries():
    m = QueryMoments(2, 2, 16, "cpu", limit=38)
    assert not m.weights[:, 0].any() and (m.weights[:, 1] == 1).all()
    assert m.layer_weights[1].data_ptr() == m.weights[1].data_ptr()  # (views: captured graphs see updates)
    q = queries(24, 4, 16, seed=3).view(2, 12, 4, 16)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[0, :5] = False  # left padding
    assert m.add(1, q, valid) and m.add(1, q[1, :3])
    real = torch.cat([q[valid], q[1, :3]])
    s, sq, n = moments_of(real, 2)
    torch.testing.assert_close(m.sums[1, 0], s, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(m.sums[1, 1], sq, rtol=1e-6, atol=1e-9)
    assert m.count[1] == n == (19 + 3) * 2 and m.count[0] == 0
    assert torch.equal(m.layer_weights[1], query_weights(s, sq, n))
    assert not m.weights[0, 0].any() and (m.weights[0, 1] == 1).all()
    # 27 tokens offered (padding included), then 12: past the limit of 38 a layer's moments stay as they are
    assert m.tokens == [0, 27] and m.wants(1) and m.add(1, q[1]) and not m.wants(1)
    before = m.weights.clone()
    assert not m.add(1, q[0]) and torch.equal(m.weights, before) and m.count[1] == n + 24
    with pytest.raises(ValueError, match="3 query heads do not group onto 2 KV heads"):
        m.add(0, torch.randn(5, 3, 16))


def test_query_moments_of_16_bit_queries():
    """fp16 queries whose squares pass fp16's range count in float32; moments that are not finite (a broken
    forward) give the plain error, never garbage weights."""
    m = QueryMoments(2, 1, 8, "cpu")
    q = torch.full((3, 2, 8), 300.0, dtype=torch.float16)
    q[:, :, 0] = -500.0
    m.add(0, q)
    assert torch.equal(m.weights[0], query_weights(*moments_of(q.float(), 1)))
    assert m.weights[0, 0].abs().max() == U_MAX and (m.weights[0, 1] >= 0).all()
    m.add(1, torch.full((2, 2, 8), float("inf")))
    assert not m.weights[1, 0].any() and (m.weights[1, 1] == 1).all()


class Recorder:
    """The model's attention with its queries recorded: ``calls`` holds (layer, queries ``[B, H_q, q, D]``)."""

    def __init__(self, model) -> None:
        self.calls: list[tuple[int, torch.Tensor]] = []
        name = f"record_queries_{id(self)}"
        AttentionInterface.register(name, self)
        AttentionMaskInterface.register(name, sdpa_mask)  # (the masks sdpa gets: padding included)
        model.set_attn_implementation(name)

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        self.calls.append((module.layer_idx, query.detach().clone()))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


class StoreSpy:
    """``store_kv`` of a module: every store of FP8 keys recorded (the keys, their weights), and what it wrote
    checked against the reference quantization of those keys with those weights."""

    def __init__(self, monkeypatch, module) -> None:
        self.calls: list[dict] = []
        real = module.store_kv

        def spy(cache, slots, values, *args, key_weights=None, span_start=None, **kw):
            real(cache, slots, values, *args, key_weights=key_weights, span_start=span_start, **kw)
            if cache.dtype != FP8:
                return
            scales = args[2] if len(args) >= 3 else kw["scale"]
            codes, want = quantize_reference(values, FP8, key_weights)
            if span_start is not None and cache.dim() == 4 and slots is None:  # generate()'s rows, on a CPU
                n = values.shape[1]
                got_codes, got = cache[:, span_start:span_start + n], scales[:, span_start:span_start + n]
            else:
                got_codes, got = read_slots(cache, slots), scales.view(-1, scales.shape[-1])[slots]
            assert torch.equal(got_codes.view(torch.uint8), codes.view(torch.uint8)) and torch.equal(got, want)
            self.calls.append(dict(values=values.detach().clone(), keys_only=len(args) < 1,
                                   weights=None if key_weights is None else key_weights.clone()))

        monkeypatch.setattr(module, "store_kv", spy)


def rotated_if(queries: torch.Tensor, rotation: bool) -> torch.Tensor:
    return rotate(queries, _hadamard(queries.shape[-1], "cpu")) if rotation else queries.float()


UNIFORM = query_weights(torch.zeros(2, 16), torch.zeros(2, 16), 0)


@pytest.mark.parametrize("rotation, tail", [("0", 0), ("1", 0), ("0", 4)])
def test_generate_weighs_keys_by_the_prompt_queries(rotation, tail, monkeypatch):
    """generate(): the moments are the real (not padding) prompt tokens' queries as the model computed them, in
    the pages' basis; the prompt's keys, first stored with the plain error (no query counted yet), are stored
    again with their weights once the layer's queries are counted, and every later key with them."""
    monkeypatch.setenv("ZIPAGE_FP8_ROTATION", rotation)
    model = tiny_model("qwen3")
    rec = Recorder(model)
    spy = StoreSpy(monkeypatch, zipage.cache)
    ids = torch.tensor([[7] * 5 + prompts_of((15,), seed=4)[0], prompts_of((20,), seed=5)[0]])
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding (a token whose queries are not zero: padding must be left out)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                         eos_token_id=None, cache_implementation="zipage", return_dict_in_generate=True,
                         cache_config={"budget": 64, "page_size": 4, "kv_cache_dtype": "fp8", "exact_tail": tail})
    m = out.past_key_values.query_moments
    L, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    for layer in range(L):
        prompt_q = [q for i, q in rec.calls if i == layer and q.shape[2] > 1]
        assert len(prompt_q) == 1
        real = rotated_if(prompt_q[0].transpose(1, 2)[mask.bool()], rotation == "1")  # [real tokens, H_q, D]
        s, sq, n = moments_of(real, heads)
        torch.testing.assert_close(m.sums[layer, 0], s, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.sums[layer, 1], sq, rtol=1e-5, atol=1e-6)
        assert m.count[layer] == n == 35 * 2
    weights = query_weights(m.sums[:, 0], m.sums[:, 1], m.count[:, None, None])
    assert [c["keys_only"] for c in spy.calls] == [False, True] * L + [False] * 5 * L  # (the last token: not stored)
    for i, call in enumerate(spy.calls):
        layer = i // 2 if i < 2 * L else i % L
        if i < 2 * L and not call["keys_only"]:  # (no query counted yet: the plain error)
            assert call["weights"] is None
        else:
            assert torch.equal(call["weights"], weights[layer])


@pytest.mark.parametrize("rotation", ["0", "1"])
def test_engine_weighs_keys_by_the_prompt_queries(rotation, monkeypatch):
    """The engine counts a step's prompt queries before its store, so every key, the first prompt's included,
    is stored with the weights of the prompt queries counted so far (codes and scales as the reference gives
    them); they are generate()'s for the same prompt, and both give the same tokens (ZIPAGE_FP8_QUERY_WEIGHTS=1:
    the moments that follow the prompts served; the default counts a fixed text once, below)."""
    monkeypatch.setenv("ZIPAGE_FP8_QUERY_WEIGHTS", "1")
    monkeypatch.setenv("ZIPAGE_FP8_ROTATION", rotation)
    model = tiny_model("qwen3")
    spy = StoreSpy(monkeypatch, zipage.engine.runner)
    prompts = prompts_of((21, 9), seed=6)
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    llm = LLM(model, budget=None, page_size=4, num_pages=64, kv_cache_dtype="fp8", enable_prefix_caching=False)
    first = llm.generate(prompts[:1], sp, use_tqdm=False)[0]
    m = llm.runner.query_moments
    L, g = model.config.num_hidden_layers, model.config.num_attention_heads // model.config.num_key_value_heads
    assert (m.count == 21 * g).all() and len(spy.calls) == 12 * L
    assert all(torch.equal(c["weights"], m.weights[i % L]) for i, c in enumerate(spy.calls))
    assert not any(torch.equal(c["weights"], UNIFORM) for c in spy.calls)
    want = model.generate(torch.tensor([prompts[0]]), max_new_tokens=12, do_sample=False, pad_token_id=0,
                          eos_token_id=None, cache_implementation="zipage", return_dict_in_generate=True,
                          cache_config={"budget": 4096, "page_size": 4, "kv_cache_dtype": "fp8"})
    torch.testing.assert_close(m.sums, want.past_key_values.query_moments.sums, rtol=1e-5, atol=1e-6)
    assert torch.equal(m.weights, want.past_key_values.query_moments.weights)
    assert first.outputs[0].token_ids == want.sequences[0, 21:].tolist()
    llm.generate(prompts[1:], sp, use_tqdm=False)  # a second prompt adds its queries
    assert (m.count == 30 * g).all()


def test_engine_counts_prompt_queries_of_mixed_steps_only(monkeypatch):
    """A prompt prefilled in steps that also decode another request, in chunks: its queries count, the decoding
    rows' do not; every key stored is the reference's for its weights (the moments that follow the prompts)."""
    monkeypatch.setenv("ZIPAGE_FP8_QUERY_WEIGHTS", "1")
    model = tiny_model("qwen3")
    spy = StoreSpy(monkeypatch, zipage.engine.runner)
    llm = LLM(model, budget=None, page_size=4, num_pages=64, kv_cache_dtype="fp8", enable_prefix_caching=False,
              max_num_batched_tokens=8)
    a, b = prompts_of((6, 19), seed=10)
    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    llm.add_request(a, sp)
    llm.step()  # a's prompt
    llm.add_request(b, sp)
    mixed = 0
    while llm.has_unfinished():
        mixed += len(llm.scheduler.running) > 1
        llm.step()
    g = model.config.num_attention_heads // model.config.num_key_value_heads
    assert mixed and (llm.runner.query_moments.count == (6 + 19) * g).all() and len(spy.calls) > 20


def test_generate_restores_prompt_keys_through_compressions_and_beams(monkeypatch):
    """generate() with beam search and compressions from the first decode step: every key stored (restored
    prompt keys included) is the reference's for its weights, and the moments count the prompt's real tokens."""
    model = tiny_model("qwen3")
    spy = StoreSpy(monkeypatch, zipage.cache)
    ids = torch.tensor([[7] * 3 + prompts_of((21,), seed=11)[0], prompts_of((24,), seed=12)[0]])
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, num_beams=2, pad_token_id=0,
                         eos_token_id=None, cache_implementation="zipage", return_dict_in_generate=True,
                         cache_config={"budget": 12, "page_size": 4, "buffer": 4, "window": 4, "kv_cache_dtype": "fp8",
                                       "exact_tail": 4})
    cache = out.past_key_values
    g = model.config.num_attention_heads // model.config.num_key_value_heads
    assert cache.num_compressions > 0 and sum(c["keys_only"] for c in spy.calls) == model.config.num_hidden_layers
    assert (cache.query_moments.count == 2 * (21 + 24) * g).all()  # (beams: every prompt row twice)


def test_query_weights_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("ZIPAGE_FP8_QUERY_WEIGHTS", "0")
    model = tiny_model("qwen3")
    llm = LLM(model, budget=None, page_size=4, num_pages=16, kv_cache_dtype="fp8")
    assert llm.runner.query_moments is None
    out = model.generate(torch.tensor([prompts_of((9,))[0]]), max_new_tokens=3, do_sample=False, pad_token_id=0,
                         cache_implementation="zipage", return_dict_in_generate=True,
                         cache_config={"budget": 64, "kv_cache_dtype": "fp8"})
    assert out.past_key_values.query_moments is None


def _engine_and_generate_keys(device: str, weighted: bool, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The dequantized keys ``[positions, layers, H, D]`` of one prompt and its first decoded tokens, as the
    engine's pages (mid-run) and as generate()'s cache hold them."""
    monkeypatch.setenv("ZIPAGE_FP8_QUERY_WEIGHTS", "1" if weighted else "0")
    model = tiny_model("qwen3").to(device)
    prompt, n = prompts_of((21,), seed=9)[0], 30
    llm = LLM(model, budget=None, page_size=4, num_pages=64, kv_cache_dtype="fp8", enable_prefix_caching=False)
    rid = llm.add_request(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    seq = llm.requests[rid]
    while seq.stored < n:
        llm.step()
    slots = torch.tensor([p * 4 + i for p in seq.pages for i in range(4)][:n], device=device)
    r = llm.runner
    engine = torch.stack([dequantize_reference(read_slots(r.k_pool[j], slots), r.k_scale[j].flatten(0, 1)[slots])
                          for j in range(r.k_pool.shape[0])], 1)
    out = model.generate(torch.tensor([prompt], device=device), max_new_tokens=n, do_sample=False, pad_token_id=0,
                         eos_token_id=None, cache_implementation="zipage", return_dict_in_generate=True,
                         cache_config={"budget": 4096, "page_size": 4, "kv_cache_dtype": "fp8"})
    cache = out.past_key_values
    gen = torch.stack([dequantize_reference(lay.keys[0, :n], lay.key_scales[0, :n]) for lay in cache.full], 1)
    return engine, gen


def _same_rows(a: torch.Tensor, b: torch.Tensor) -> float:
    """The share of rows equal up to float noise (keys computed by two implementations differ in the last bits,
    and so do their scales; another scale choice moves elements by about the rounding error, percents)."""
    return torch.isclose(a, b, rtol=1e-4, atol=1e-6).all(-1).float().mean().item()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not CUDA, reason="needs a CUDA GPU")])])
def test_engine_pages_hold_generates_weighted_keys(device, monkeypatch):
    """Every key the engine stores, the prompt's and the decoded tokens' (on a GPU through captured CUDA
    graphs, which must read the weights as the prompt left them), is the one generate() stores for the same
    prompt (but for rows that are near-ties of two scales); and the test can tell the weights from none."""
    engine, gen = _engine_and_generate_keys(device, True, monkeypatch)
    _, plain = _engine_and_generate_keys(device, False, monkeypatch)
    assert _same_rows(engine, gen) > 0.97
    assert _same_rows(gen, plain) < 0.7


# ----------------------------------------------------------------------------- calibrated once
def _request_keys(mode: str, before: list[list[int]], monkeypatch, device: str = "cpu") -> torch.Tensor:
    """The FP8 key codes ``[layers, 30, H, D]`` (bytes) the engine stores for one prompt and its first decoded
    tokens, in a new engine that first served ``before``."""
    monkeypatch.setenv("ZIPAGE_FP8_QUERY_WEIGHTS", mode)
    llm = LLM(tiny_model("qwen3").to(device), budget=None, page_size=4, num_pages=128, kv_cache_dtype="fp8",
              enable_prefix_caching=False)
    if before:
        llm.generate(before, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
    rid = llm.add_request(prompts_of((21,), seed=9)[0], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    seq = llm.requests[rid]
    while seq.stored < 30:
        llm.step()
    slots = torch.tensor([p * 4 + i for p in seq.pages for i in range(4)][:30], device=device)
    r = llm.runner
    return torch.stack([read_slots(r.k_pool[j], slots).view(torch.uint8) for j in range(r.k_pool.shape[0])])


CUDA_ONLY = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]
ON_DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_ONLY)]


@pytest.mark.parametrize("device", ON_DEVICES)
def test_calibrated_weights_round_a_request_s_keys_whatever_ran_before(device, monkeypatch):
    """ZIPAGE_FP8_QUERY_WEIGHTS=calibrated: a request's FP8 keys are the same bytes in a new engine and in one
    that served other prompts first (on a GPU with the fused ops and captured decode graphs); with the moments
    that follow the traffic (1) they are not."""
    before = [[3] * 40, prompts_of((33,), seed=2)[0]]
    calibrated = [_request_keys("calibrated", b, monkeypatch, device) for b in ([], before)]
    assert torch.equal(*calibrated)
    adaptive = _request_keys("1", [], monkeypatch, device), _request_keys("1", before, monkeypatch, device)
    assert (adaptive[0] != adaptive[1]).float().mean() > 0.1


@pytest.mark.parametrize("family, rotation, device", [
    ("qwen3", "0", "cpu"), ("qwen3", "1", "cpu"), ("gemma3", "0", "cpu"),
    pytest.param("qwen3", "1", "cuda", marks=CUDA_ONLY)])
def test_calibrated_moments_are_the_fixed_text_s_queries_and_stay(family, rotation, device, monkeypatch):
    """The engine's calibrated moments are those of the calibration ids' queries as the model's own forward
    computes them (in the pages' basis; a sliding-window model's full layers, over at most one window of
    tokens); serving requests leaves them as they are, and every key is stored with them."""
    monkeypatch.setenv("ZIPAGE_FP8_QUERY_WEIGHTS", "calibrated")
    monkeypatch.setenv("ZIPAGE_FP8_ROTATION", rotation)
    model = (tiny_model("qwen3") if family == "qwen3" else tiny_sliding_model("gemma3")).to(device)
    spy = StoreSpy(monkeypatch, zipage.engine.runner)
    llm = LLM(model, budget=None, page_size=4, num_pages=128, kv_cache_dtype="fp8", enable_prefix_caching=False,
              enforce_eager=True)  # (the spy checks each store on the host: no graph capture)
    m = llm.runner.query_moments
    cfg = model.config
    limit = 512  # (the tiny models' positions; past a sliding model's window of 6)
    ids = calibration_ids(None, cfg.vocab_size, limit)
    assert len(ids) == limit and ids == calibration_ids(None, cfg.vocab_size, limit)  # (fixed)
    g = cfg.num_attention_heads // cfg.num_key_value_heads
    assert (m.count == limit * g).all() and not any(m.wants(j) for j in range(len(m.tokens)))
    rec = Recorder(model)  # (the model's own forward through SDPA, its queries recorded)
    with torch.no_grad():
        model(torch.tensor([ids], device=device), use_cache=False)
    full = llm.runner.full_index
    assert set(full) == {i for i, _ in rec.calls} - set(llm.runner.window_index) and len(full) == len(m.tokens)
    for layer, q in rec.calls:
        if layer in full:
            s, sq, n = moments_of(rotated_if(q[0].transpose(0, 1).cpu(), rotation == "1"), cfg.num_key_value_heads)
            tol = dict(rtol=1e-5, atol=1e-5) if device == "cpu" else dict(rtol=1e-3, atol=1e-3)  # (fused kernels)
            torch.testing.assert_close(m.sums[full[layer], 0].cpu(), s, **tol)
            torch.testing.assert_close(m.sums[full[layer], 1].cpu(), sq, **tol)
    weights = m.weights.clone()
    spy.calls.clear()
    llm.generate(prompts_of((21, 9), seed=6), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                 use_tqdm=False)
    assert torch.equal(m.weights, weights) and (m.count == limit * g).all()
    assert spy.calls and all(torch.equal(c["weights"], weights[i % len(weights)]) for i, c in enumerate(spy.calls))


def test_calibration_ids_come_from_the_tokenizer_or_a_fixed_draw():
    class Tok:
        def __call__(self, text, add_special_tokens=True):  # (a prompt's tokenization: its specials added)
            assert text == CALIBRATION_TEXT and add_special_tokens
            return {"input_ids": list(range(len(text.split())))}

    words = len(CALIBRATION_TEXT.split())
    assert words > 500 and calibration_ids(Tok(), None, 10_000) == list(range(words))
    assert calibration_ids(Tok(), None, 7) == list(range(7))
    drawn = calibration_ids(None, 50, 10_000)
    assert len(drawn) == 512 and max(drawn) < 50 and len(set(drawn)) == 50
    with pytest.raises(ValueError, match="no tokenizer and no vocab_size"):
        calibration_ids(None, None, 10)
    with pytest.raises(ValueError, match="limit=0"):
        calibration_ids(None, 50, 0)


def test_a_failing_calibration_falls_back_by_default_and_is_refused_when_asked_for(monkeypatch):
    """The calibration forward failing partway (here at the second layer, after the first counted its queries):
    with the mode left to its default, one warning names the error and the moments start from nothing and follow
    the prompts served; asked for by name, the engine is refused, saying why."""
    from transformers import AttentionInterface

    runner_mod = zipage.engine.runner
    runner_mod.register_attention()

    def failing(module, *args, **kwargs):
        if module.layer_idx == 1:
            raise ValueError("no calibration at layer 1")
        return runner_mod.calibration_attention(module, *args, **kwargs)

    AttentionInterface.register(runner_mod.CALIBRATION_NAME, failing)
    try:
        monkeypatch.delenv("ZIPAGE_FP8_QUERY_WEIGHTS", raising=False)
        model = tiny_model("qwen3")
        with pytest.warns(RuntimeWarning, match="calibration forward failed .*no calibration at layer 1"):
            llm = LLM(model, budget=None, page_size=4, num_pages=64, kv_cache_dtype="fp8")
        m = llm.runner.query_moments
        assert (m.count == 0).all() and m.wants(0) and torch.equal(m.weights[0], UNIFORM.expand_as(m.weights[0]))
        llm.generate(prompts_of((21,), seed=6), SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
        g = model.config.num_attention_heads // model.config.num_key_value_heads
        assert (m.count == 21 * g).all()
        monkeypatch.setenv("ZIPAGE_FP8_QUERY_WEIGHTS", "calibrated")
        with pytest.raises(RuntimeError, match="calibrated: the calibration forward failed .*layer 1"):
            LLM(model, budget=None, page_size=4, num_pages=64, kv_cache_dtype="fp8")
        with pytest.raises(RuntimeError, match="calibration forward failed"):  # (layer 0 counted, then refused)
            llm.runner.calibrate_query_moments(list(range(5, 30)))
        assert (m.count == 0).all() and m.wants(0)  # (no partial counts left behind)
    finally:
        AttentionInterface.register(runner_mod.CALIBRATION_NAME, runner_mod.calibration_attention)


def test_calibration_runs_the_model_s_own_attention_sinks_included(monkeypatch):
    """A model whose attention has learned sink logits and runs eager (GPT-OSS): the calibration forward goes
    through the model's own eager attention, so each full layer's queries, which follow the earlier layers'
    outputs, are those of the model's own forward (recorded from its modeling module's eager attention)."""
    import sys

    monkeypatch.setenv("ZIPAGE_FP8_QUERY_WEIGHTS", "calibrated")
    model = tiny_sliding_model("gpt_oss")
    llm = LLM(model, budget=None, page_size=4, num_pages=128, kv_cache_dtype="fp8", enable_prefix_caching=False)
    m, full = llm.runner.query_moments, llm.runner.full_index
    attn = next(mod for mod in model.modules() if getattr(mod, "sinks", None) is not None)
    modeling = sys.modules[type(attn).__module__]
    real, calls = modeling.eager_attention_forward, []

    def recorded(module, query, *args, **kwargs):
        calls.append((module.layer_idx, query.detach().clone()))
        return real(module, query, *args, **kwargs)

    monkeypatch.setattr(modeling, "eager_attention_forward", recorded)
    cfg = model.config
    ids = calibration_ids(None, cfg.vocab_size, 512)
    with torch.no_grad():
        model(torch.tensor([ids]), use_cache=False)
    assert (m.count == len(ids) * cfg.num_attention_heads // cfg.num_key_value_heads).all()
    later = [(layer, q) for layer, q in calls if layer in full and layer > min(full)]
    assert later  # (a full layer after another layer: its queries depend on the sinks before it)
    for layer, q in calls:
        if layer in full:
            s, sq, n = moments_of(q[0].transpose(0, 1), cfg.num_key_value_heads)
            torch.testing.assert_close(m.sums[full[layer], 0], s, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(m.sums[full[layer], 1], sq, rtol=1e-5, atol=1e-5)


def test_calibration_runs_a_registered_implementation_under_its_own_name(monkeypatch):
    """A model on an attention implementation registered by name (as flash attention's is): the calibration
    forward calls it with the masks made for it, and it sees its own name in the config (flash attention's
    loader reads it), not the engine's; the moments are those of the queries it was given."""
    monkeypatch.setenv("ZIPAGE_FP8_QUERY_WEIGHTS", "calibrated")
    model = tiny_model("qwen3")
    rec = Recorder(model)
    seen = []
    real = rec.__call__

    def call(module, *args, **kwargs):
        seen.append(module.config._attn_implementation)
        return real(module, *args, **kwargs)

    AttentionInterface.register(f"record_queries_{id(rec)}", call)
    llm = LLM(model, budget=None, page_size=4, num_pages=64, kv_cache_dtype="fp8", enable_prefix_caching=False)
    m, cfg = llm.runner.query_moments, model.config
    assert seen and set(seen) == {f"record_queries_{id(rec)}"}
    calibration = [(layer, q) for layer, q in rec.calls if q.shape[2] == 512]  # (not the position probe's 3 tokens)
    assert len(calibration) == cfg.num_hidden_layers
    for layer, q in calibration:
        s, sq, n = moments_of(q[0].transpose(0, 1), cfg.num_key_value_heads)
        torch.testing.assert_close(m.sums[layer, 0], s, rtol=1e-5, atol=1e-5)
        assert m.count[layer] == n


def test_no_calibration_text_falls_back_by_default_and_is_refused_when_asked_for(monkeypatch):
    """No tokenizer and no vocab size to draw ids from: left to its default, one warning and the runner is not
    calibrated (its moments follow the prompts); asked for by name, or on several ranks, the error is raised."""
    from types import SimpleNamespace

    from zipage.calibration import calibrate_engine

    class Runner:
        calls = []

        def calibrate_query_moments(self, ids, fallback=False):
            Runner.calls.append((ids, fallback))

    config = SimpleNamespace(max_position_embeddings=64, vocab_size=None)
    monkeypatch.delenv("ZIPAGE_FP8_QUERY_WEIGHTS", raising=False)
    with pytest.warns(RuntimeWarning, match="no calibration text .*no tokenizer and no vocab_size"):
        calibrate_engine(Runner(), None, config, 1 << 30, single_process=True)
    assert Runner.calls == []
    with pytest.raises(ValueError, match="no tokenizer and no vocab_size"):
        calibrate_engine(Runner(), None, config, 1 << 30, single_process=False)
    monkeypatch.setenv("ZIPAGE_FP8_QUERY_WEIGHTS", "calibrated")
    with pytest.raises(ValueError, match="no tokenizer and no vocab_size"):
        calibrate_engine(Runner(), None, config, 1 << 30, single_process=True)
    config.vocab_size = 50  # (the ids: at most the model's 64 positions, and the fallback only by default)
    calibrate_engine(Runner(), None, config, 1 << 30, single_process=True)
    monkeypatch.delenv("ZIPAGE_FP8_QUERY_WEIGHTS")
    calibrate_engine(Runner(), None, config, 40, single_process=True)
    assert [(len(ids), fallback) for ids, fallback in Runner.calls] == [(64, False), (40, True)]


def test_two_engines_calibrating_at_once_in_two_threads_each_get_their_own_masks(monkeypatch):
    """Two engines on two models, one eager and one SDPA, calibrating at the same time in two threads: each
    forward makes its masks after the other thread has started its own calibration (the eager model's after the
    SDPA model's), and each engine's moments are still those it gets calibrating alone (masks picked per thread:
    the eager model given SDPA's masks, or none, would attend to later tokens)."""
    import threading

    monkeypatch.setenv("ZIPAGE_FP8_QUERY_WEIGHTS", "calibrated")
    models = tiny_model("qwen3", attn="eager"), tiny_model("qwen3", seed=1)
    llms = [LLM(m, budget=None, page_size=4, num_pages=64, kv_cache_dtype="fp8", enable_prefix_caching=False)
            for m in models]
    alone = [llm.runner.query_moments.sums.clone() for llm in llms]
    ids = calibration_ids(None, models[0].config.vocab_size, 512)
    started = [threading.Event(), threading.Event()]
    for i, model in enumerate(models):  # (each calibration's forward, its state set, waits for the other's)
        def forward(*args, __i=i, __real=model.forward, **kwargs):
            started[__i].set()
            assert started[1 - __i].wait(30)
            return __real(*args, **kwargs)

        monkeypatch.setattr(model, "forward", forward)
    errors = []

    def calibrate(i):
        try:
            llms[i].runner.query_moments.reset()
            llms[i].runner.calibrate_query_moments(ids)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=calibrate, args=(i,)) for i in (0, 1)]
    threads[0].start()
    assert started[0].wait(30)  # (the SDPA engine sets its calibration up after the eager one)
    threads[1].start()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    assert not errors, errors
    for llm, sums in zip(llms, alone):
        torch.testing.assert_close(llm.runner.query_moments.sums, sums, rtol=1e-5, atol=1e-5)
