"""FP8 and INT8 KV pages (kv_cache_dtype="fp8" / "int8") in the engine and in generate(): their tokens
against generate() on a cache that rounds every stored key and value through e4m3 (or int8 codes) the
same way (dense float32 pools), and the page and scale bookkeeping through compaction and prefix caching."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_engine import assert_pool_clean, prompts_of, reference

import zipage
import zipage.cache
from zipage import LLM, SamplingParams, ZipageConfig
from zipage.kernels import FP8, dequantize_reference, quantize_reference, slot_indices
from zipage.kernels.fp8 import QUANTIZED_KV, is_quantized, kv_rotation, rotate
from zipage.kernels.paged_kv import read_slots

GREEDY = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
KV = pytest.mark.parametrize("kv", ["fp8", "int8"])


@pytest.fixture
def fake_rounded_generate(monkeypatch):
    """``install(kv)``: generate(cache_implementation="zipage") whose stored keys and values are rounded
    through ``kv``'s codes (e4m3 or int8, the latter in the Hadamard-rotated basis) with per-token,
    per-head scales (dense float32 pools): the independent reference of the engine."""
    store, store_rows = zipage.cache.store_kv, zipage.cache.store_rows

    def install(kv: str = "fp8") -> None:
        codes = QUANTIZED_KV[kv]
        # (the rounding here searches FP8 scales by the plain squared error: so do the pages under test, whose
        # query-weighted search, ``query_moments.py``, is tested against its own references below)
        monkeypatch.setenv("ZIPAGE_FP8_QUERY_WEIGHTS", "0")

        def fq(x):  # (INT8 pages round in the rotated basis: kernels/fp8.py)
            rot = kv_rotation(kv, x.shape[-1], x.device)
            return rotate(dequantize_reference(*quantize_reference(rotate(x, rot), codes)), rot).to(x.dtype)

        def rounded(cache, slots, values, cache_b=None, values_b=None, scale=None, scale_b=None, **hint):
            # ``hint`` (the cache's ``span_start``: where its rows take the tokens) goes through as is.
            if cache_b is None or is_quantized(cache):  # a scorer's state, or the quantized cache under test
                return store(cache, slots, values, cache_b, values_b, scale, scale_b, **hint)
            return store(cache, slots, fq(values), cache_b, fq(values_b), **hint)

        monkeypatch.setattr(zipage.cache, "store_kv", rounded)  # (rows a paged kernel reads, and the scorers' state)
        monkeypatch.setattr(zipage.cache, "store_rows",  # (unquantized rows: the dense float32 pools here)
                            lambda keys, values, index, k, v: store_rows(keys, values, index, fq(k), fq(v)))

    return install


@pytest.mark.fp8_scale_search  # (FP8 pages' default scale search: the rounding cache searches the same way)
@KV
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_full_kv_fp8_engine_matches_fp8_rounded_generate(family, kv, fake_rounded_generate):
    fake_rounded_generate(kv)
    model = tiny_model(family)
    prompts = prompts_of((12, 30, 7))
    llm = LLM(model, budget=None, page_size=8, num_pages=64, kv_cache_dtype=kv)
    assert llm.runner.k_pool.dtype == QUANTIZED_KV[kv] and llm.runner.k_scale.shape == llm.runner.k_pool.shape[:-1]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    cfg = {"budget": 4096, "page_size": 8}  # a budget never reached: full KV through the rounding cache
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == reference(model, prompt, 30, cache_implementation="zipage", cache_config=cfg)
    assert_pool_clean(llm)


@pytest.mark.fp8_scale_search
@pytest.mark.parametrize("scorer, redundancy, kv", [("zipage", "none", "fp8"), ("zipage", "lightning", "fp8"),
                                                   ("snapkv", "none", "fp8"), ("zipage", "lightning", "int8"),
                                                   ("snapkv", "none", "int8"), ("zipage", "lightning", "fp8-rotated")])
def test_compressing_fp8_engine_matches_fp8_rounded_generate(scorer, redundancy, kv, fake_rounded_generate,
                                                             monkeypatch):
    """Compressions included: the zipage scorer reads the FP8 codes and scales itself, snapkv gets
    them dequantized; either way the tokens are those of generate() on e4m3-rounded keys and values
    (INT8: int8-rounded; fp8-rotated: FP8 pages stored rotated, ``ZIPAGE_FP8_ROTATION=1``)."""
    if kv == "fp8-rotated":
        monkeypatch.setenv("ZIPAGE_FP8_ROTATION", "1")
        kv = "fp8"
    fake_rounded_generate(kv)
    model = tiny_model("qwen3")
    shared = prompts_of((13,), seed=7)[0]  # prefix-cached pages: compaction then writes to fresh pages
    a, b = prompts_of((5, 9), seed=2, prefix=shared)
    prompts = [a] + prompts_of((12, 30, 7), seed=1) + [b]  # b starts once a's pages are cached
    fields = dict(budget=16, page_size=4, buffer=4, window=4, scorer=scorer)
    if scorer == "zipage":
        fields["redundancy"] = redundancy
    llm = LLM(model, num_pages=128, kv_cache_dtype=kv, max_num_seqs=3, **fields)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.stats()["compressions"] > 0 and llm.stats()["prefix_cache_hits"] > 0
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == reference(model, prompt, 30, cache_implementation="zipage", cache_config=fields)
    assert_pool_clean(llm)


@pytest.mark.fp8_scale_search
@KV
@pytest.mark.parametrize("num_beams", [1, 2])
def test_fp8_generate_matches_fp8_rounded_generate(num_beams, kv, fake_rounded_generate):
    """generate(cache_implementation="zipage") with FP8 pages, compressions and (beam search) reordered
    rows included; the cache's memory accounting counts codes and scales."""
    fake_rounded_generate(kv)
    model = tiny_model("qwen3")
    ids = torch.tensor(prompts_of((24, 24), seed=8))
    cfg = dict(budget=12, page_size=4, buffer=4, window=4)
    kw = dict(max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None, num_beams=num_beams,
              cache_implementation="zipage", return_dict_in_generate=True)
    want = model.generate(ids, cache_config=cfg, **kw)
    got = model.generate(ids, cache_config={**cfg, "kv_cache_dtype": kv}, **kw)
    assert torch.equal(got.sequences, want.sequences)
    cache = got.past_key_values
    assert cache.full[0].keys.dtype == QUANTIZED_KV[kv] and cache.num_compressions > 0
    stats, dense = cache.stats(), want.past_key_values.stats()
    assert stats["kv_bytes_full"] == dense["kv_bytes_full"]
    assert stats["kv_bytes_in_use"] * (4 * 16) == dense["kv_bytes_in_use"] * (16 + 4)  # float32 -> e4m3 + scale


def _stored(llm, seq, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized keys and values ``[stored, H, D]`` of ``seq`` in ``layer``, read through its pages."""
    r = llm.runner
    slots = slot_indices(torch.tensor([seq.pages]), 0, seq.stored, r.page_size)[0]
    flat = lambda t: read_slots(t[layer], slots)  # noqa: E731  (values may be stored dimension-major)
    return dequantize_reference(flat(r.k_pool), flat(r.k_scale)), dequantize_reference(flat(r.v_pool), flat(r.v_scale))


def test_compaction_moves_scales_with_their_codes():
    """After a compression every stored token of every layer and head reads back (codes times scale)
    exactly as the token it came from: the kept positions say which one."""
    model = tiny_model("qwen3")
    llm = LLM(model, budget=16, page_size=4, buffer=4, window=4, num_pages=64, kv_cache_dtype="fp8",
              enable_prefix_caching=False)
    prompt = prompts_of((30,), seed=3)[0]
    rid = llm.add_request(prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    llm.step()  # the prompt stored whole
    seq = llm.requests[rid]
    assert seq.stored == len(prompt) and llm.scheduler.compressions == 0
    before = {layer: _stored(llm, seq, layer) for layer in range(2)}
    while llm.scheduler.compressions == 0:  # the first decode step compresses the prompt to the budget
        llm.step()
    llm.core.compressions.collect(block=True)
    for layer in range(2):
        kept = llm.kept_positions(rid, layer)  # [H, stored] logical positions
        keys, values = _stored(llm, seq, layer)
        old_k, old_v = before[layer]
        for h in range(kept.shape[0]):
            for j, pos in enumerate(kept[h].tolist()):
                if pos < len(prompt):
                    assert torch.equal(keys[j, h], old_k[pos, h]) and torch.equal(values[j, h], old_v[pos, h])


def test_prefix_cached_pages_keep_their_scales():
    """A request whose prompt starts with a finished request's prompt reads that request's cached
    pages, codes and scales alike, and gets the tokens a fresh engine gives it."""
    model = tiny_model("llama")
    shared = prompts_of((24,), seed=4)[0]
    first, second = prompts_of((6, 9), seed=5, prefix=shared)
    cfg = dict(budget=None, page_size=8, num_pages=64, kv_cache_dtype="fp8")
    fresh = LLM(model, **cfg).generate([second], GREEDY, use_tqdm=False)[0]
    llm = LLM(model, **cfg)
    llm.generate([first, prompts_of((40,), seed=6)[0]], GREEDY, use_tqdm=False)
    out = llm.generate([second], GREEDY, use_tqdm=False)[0]
    assert llm.stats()["prefix_cache_hits"] >= 3
    assert out.token_ids == fresh.token_ids
    assert_pool_clean(llm)


def test_fp8_halves_the_page_bytes():
    from zipage.engine.runner import ModelRunner

    config = tiny_model("qwen3").config  # head_dim 16, 2 KV heads, 2 layers
    bf16 = ModelRunner.bytes_per_page(config, 8, torch.bfloat16, False)
    fp8 = ModelRunner.bytes_per_page(config, 8, torch.bfloat16, False, "fp8")
    assert bf16 == 8 * 2 * 2 * (2 * 16 * 2) and fp8 == 8 * 2 * 2 * (2 * 16 + 2 * 4)


@pytest.mark.parametrize("bad", ["fp16", "e4m3", None, 8])
def test_bad_kv_cache_dtype_is_refused(bad):
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        ZipageConfig(kv_cache_dtype=bad)
    with pytest.raises(ValueError, match=r"LLM\(kv_cache_dtype\)"):
        LLM(tiny_model("llama"), budget=None, num_pages=8, kv_cache_dtype=bad)


def test_cli_flags_take_the_kv_cache_dtype():
    from zipage import demo
    from zipage_cli import serve_parser

    for kv in ("fp8", "int8"):
        assert serve_parser().parse_args(["--kv-cache-dtype", kv]).kv_cache_dtype == kv
        assert demo.build_parser().parse_args(["--kv-cache-dtype", kv]).kv_cache_dtype == kv
    with pytest.raises(SystemExit):
        serve_parser().parse_args(["--kv-cache-dtype", "int4"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@KV
@pytest.mark.parametrize("budget", [None, 16])
def test_fp8_engine_on_cuda_matches_fp8_rounded_generate(budget, kv, fake_rounded_generate):
    """The compiled FP8 kernels with everything on (CUDA graphs, prefix caching, asynchronous
    compression): the tokens of generate() on e4m3-rounded (INT8: int8-rounded) keys and values
    (float32 model)."""
    fake_rounded_generate(kv)
    model = tiny_model("qwen3", scale=1.0).cuda()
    shared = prompts_of((17,), seed=3)[0]
    prompts = prompts_of((12, 30, 7, 50), seed=1) + prompts_of((5, 9), seed=2, prefix=shared)
    fields = {} if budget is None else dict(budget=budget, buffer=4, window=4)
    llm = LLM(model, page_size=4, num_pages=256, max_num_seqs=3, kv_cache_dtype=kv,
              async_compression=budget is not None, **({"budget": None} if budget is None else fields))
    # the last prompt after the others have finished: its shared prefix is in the cache by then
    outs = llm.generate(prompts[:-1], GREEDY, use_tqdm=False) + llm.generate(prompts[-1:], GREEDY, use_tqdm=False)
    cfg = {"budget": 4096, "page_size": 4} if budget is None else {**fields, "page_size": 4}
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == reference(model, prompt, 30, cache_implementation="zipage", cache_config=cfg)
    assert llm.runner.graphs and llm.stats()["prefix_cache_hits"] > 0
    assert_pool_clean(llm)


def test_engine_value_pools_are_dimension_major_unless_asked(monkeypatch):
    """8-bit value pools are stored dimension-major (each page [H_kv, D, page]) by default, token-major with
    ZIPAGE_DIM_MAJOR_VALUES=0, and both engines give the same tokens; a bad setting is named."""
    from zipage.kernels.fp8 import dim_major

    model = tiny_model("qwen3")
    prompts = prompts_of((12, 5), seed=3)
    sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("ZIPAGE_DIM_MAJOR_VALUES", flag)
        llm = LLM(model, budget=16, page_size=4, buffer=4, window=4, num_pages=64, kv_cache_dtype="int8")
        assert dim_major(llm.runner.v_pool[0]) == (flag == "1") and not dim_major(llm.runner.k_pool[0])
        outs[flag] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    assert outs["1"] == outs["0"] and all(len(t) == 24 for t in outs["1"])
    monkeypatch.setenv("ZIPAGE_DIM_MAJOR_VALUES", "yes")
    with pytest.raises(ValueError, match="ZIPAGE_DIM_MAJOR_VALUES='yes'"):
        LLM(model, budget=16, page_size=4, buffer=4, window=4, num_pages=64, kv_cache_dtype="int8")


def test_where_the_engine_stores_values_dimension_major(monkeypatch):
    """Unset, 8-bit values are dimension-major where tensor-descriptor tiles read them (compute capability 9+,
    pages of whole 128-token tiles, a power-of-two head dim) and on a CPU; token-major on other GPUs and for
    16-bit pages; ZIPAGE_DIM_MAJOR_VALUES decides when set."""
    from zipage.engine.runner import dim_major_values

    monkeypatch.delenv("ZIPAGE_DIM_MAJOR_VALUES", raising=False)
    assert dim_major_values("fp8", 256, 128, (9, 0)) and dim_major_values("int8", 128, 64, (10, 0))
    assert dim_major_values("int8", 16, 64, None)  # a CPU
    assert not dim_major_values("fp8", 256, 128, (8, 0))  # no tensor descriptors
    assert not dim_major_values("fp8", 64, 128, (9, 0))  # pages smaller than a tile
    assert not dim_major_values("fp8", 256, 96, (9, 0))  # head dim not a power of two
    assert not dim_major_values("auto", 256, 128, (9, 0)) and not dim_major_values("auto", 16, 64, None)
    monkeypatch.setenv("ZIPAGE_DIM_MAJOR_VALUES", "1")
    assert dim_major_values("fp8", 64, 96, (8, 0)) and not dim_major_values("auto", 256, 128, (9, 0))
    monkeypatch.setenv("ZIPAGE_DIM_MAJOR_VALUES", "0")
    assert not dim_major_values("fp8", 256, 128, (9, 0))
