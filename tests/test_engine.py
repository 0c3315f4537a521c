"""The continuous-batching engine against per-prompt generate(), and its bookkeeping."""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import tiny_model

import zipage
from zipage import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


def prompts_of(lengths, seed=0, prefix=()):
    g = torch.Generator().manual_seed(seed)
    return [list(prefix) + torch.randint(3, 96, (n,), generator=g).tolist() for n in lengths]


def reference(model, prompt, max_tokens, **kw):
    """Per-prompt greedy generate(); eos_token_id=None matches ignore_eos (never stop, never suppress)."""
    device = next(model.parameters()).device
    out = model.generate(torch.tensor([prompt], device=device), max_new_tokens=max_tokens, do_sample=False,
                         pad_token_id=0, eos_token_id=None, **kw)
    return out[0, len(prompt):].tolist()


def assert_pool_clean(llm):
    stats = llm.stats()
    assert stats["free_pages"] == stats["total_pages"], stats
    assert stats["running"] == stats["waiting"] == 0
    llm.blocks.check([])


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_full_kv_engine_matches_generate(family):
    model = tiny_model(family)
    prompts = prompts_of((12, 30, 7, 50))
    llm = LLM(model, budget=None, page_size=8, num_pages=64)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == reference(model, prompt, 40)
        assert out.finish_reason == "length" and out.finished
    assert_pool_clean(llm)


def test_budget_larger_than_every_sequence_matches_generate():
    model = tiny_model("mistral")
    prompts = prompts_of((9, 25, 40))
    llm = LLM(model, budget=128, page_size=8, num_pages=64)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == [reference(model, p, 40) for p in prompts]
    assert llm.stats()["compressions"] == 0
    assert_pool_clean(llm)


@pytest.mark.parametrize("scorer, family, async_compression", [
    ("zipage", "qwen3", False), ("snapkv", "qwen3", False), ("streaming", "qwen3", False),
    ("zipage", "qwen2", True), ("zipage", "mistral", True),
])
def test_small_budget_matches_generate_with_zipage_cache(scorer, family, async_compression):
    """One algorithm, two front ends: the engine and generate(cache_implementation="zipage")."""
    model = tiny_model(family)
    cfg = {"budget": 16, "page_size": 4, "buffer": 4, "scorer": scorer}
    prompts = prompts_of((12, 30, 7, 50), seed=1)
    llm = LLM(model, num_pages=128, async_compression=async_compression, **cfg)
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ref = reference(model, prompt, 60, cache_implementation="zipage", cache_config=cfg)
        assert out.token_ids == ref
    assert llm.stats()["compressions"] >= 4 * (60 // 4) - 8
    assert_pool_clean(llm)


def test_prefix_caching_on_and_off_give_identical_outputs():
    model = tiny_model("llama")
    shared = prompts_of((33,), seed=5)[0]
    prompts = prompts_of((5, 9, 3, 14), seed=6, prefix=shared)
    params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    results = {}
    for cache in (True, False):
        llm = LLM(model, budget=16, page_size=8, buffer=8, num_pages=64, enable_prefix_caching=cache,
                  max_num_seqs=2)  # two at a time: later requests find the prefix cached
        results[cache] = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        if cache:
            assert llm.stats()["prefix_cache_hits"] >= 4
        assert_pool_clean(llm)
    assert results[True] == results[False]
    ref = [reference(model, p, 50, cache_implementation="zipage",
                     cache_config={"budget": 16, "page_size": 8, "buffer": 8}) for p in prompts]
    assert results[True] == ref


def test_chunked_prefill_and_preemption_keep_outputs():
    model = tiny_model("llama")
    prompts = prompts_of((40, 35, 20, 45), seed=2)
    ref = [reference(model, p, 40) for p in prompts]
    small = LLM(model, budget=None, page_size=4, num_pages=30, max_num_batched_tokens=16)
    outs = small.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == ref
    assert small.stats()["preemptions"] > 0  # 30 pages of 4 cannot hold 4 x 80 tokens
    assert_pool_clean(small)


@pytest.mark.parametrize("async_compression", [False, True])
def test_streaming_and_cancel_return_every_page(async_compression):
    model = tiny_model("llama")
    prompts = prompts_of((10, 20, 30), seed=3)
    llm = LLM(model, budget=16, page_size=4, buffer=4, num_pages=64, async_compression=async_compression)
    ids = [llm.add_request(p, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)) for p in prompts]
    got = []
    for i, chunk in enumerate(llm.stream(ids[0])):
        got.extend(chunk)
        if i == 5:
            llm.cancel(ids[1])
    assert got == llm.output(ids[0]).token_ids and len(got) == 30
    assert llm.output(ids[1]).finish_reason == "cancelled"
    while llm.has_unfinished():
        llm.step()
    assert llm.output(ids[2]).finish_reason == "length"
    assert_pool_clean(llm)
    late = llm.add_request(prompts[0], SamplingParams(max_tokens=5))
    llm.cancel(late)  # cancelled while waiting
    assert_pool_clean(llm)


def test_asyncio_requests_share_the_engine():
    model = tiny_model("llama")
    prompts = prompts_of((8, 16), seed=4)
    llm = LLM(model, budget=None, page_size=8, num_pages=32)

    async def main():
        return await asyncio.gather(*(llm.agenerate(p, GREEDY) for p in prompts))

    outs = asyncio.run(main())
    assert [o.token_ids for o in outs] == [reference(model, p, 40) for p in prompts]
    assert_pool_clean(llm)


def test_seeded_sampling_does_not_depend_on_the_batch():
    model = tiny_model("llama")
    prompts = prompts_of((8, 16, 12), seed=7)
    p = SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, top_k=30, seed=11, ignore_eos=True)
    alone = LLM(model, budget=None, page_size=8, num_pages=32).generate([prompts[0]], p, use_tqdm=False)
    together = LLM(model, budget=None, page_size=8, num_pages=32).generate(prompts, p, use_tqdm=False)
    assert alone[0].token_ids == together[0].token_ids


def test_stop_token_ids_and_eos():
    model = tiny_model("llama")
    prompt = prompts_of((10,), seed=8)[0]
    ref = reference(model, prompt, 30)
    stop_at = ref[7]
    llm = LLM(model, budget=None, page_size=8, num_pages=32)
    out = llm.generate([prompt], SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[stop_at]),
                       use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.token_ids == ref[: ref.index(stop_at) + 1]


def test_bad_requests_are_refused_without_disturbing_others():
    model = tiny_model("llama")
    llm = LLM(model, budget=16, page_size=4, buffer=4, num_pages=64)
    good = llm.add_request(prompts_of((10,))[0], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    llm.step()
    with pytest.raises(ValueError, match="empty"):
        llm.add_request([])
    with pytest.raises(ValueError, match="context"):
        llm.add_request([5] * 3000)
    with pytest.raises(ValueError, match="max_tokens"):
        llm.add_request([5, 6], SamplingParams(max_tokens=0))
    with pytest.raises(TypeError, match="stop"):
        llm.add_request([5, 6], SamplingParams(stop=[3]))
    with pytest.raises(ValueError, match="tokenizer"):
        llm.add_request("text without a tokenizer")
    with pytest.raises(ValueError, match="KV pool has 64"):
        llm.add_request([5] * 300)
    with pytest.raises(TypeError, match="prompt"):
        llm.add_request(3.5)
    with pytest.raises(ValueError, match="in flight"):
        llm.add_request([5, 6], request_id=good)
    with pytest.raises(ValueError, match="window"):
        LLM(model, budget=8, window=16, num_pages=8)
    with pytest.raises(ValueError, match="num_pages"):
        LLM(model, budget=16, page_size=4, num_pages=0)
    while llm.has_unfinished():
        llm.step()
    out = llm.output(good)
    assert out.token_ids == reference(model, prompts_of((10,))[0], 20, cache_implementation="zipage",
                                      cache_config={"budget": 16, "page_size": 4, "buffer": 4})
    assert_pool_clean(llm)


def test_concurrency_from_the_memory_formula():
    model = tiny_model("llama")
    llm = LLM(model, budget=32, page_size=8, buffer=8, num_pages=50, max_num_seqs=100)
    assert llm.stats()["max_concurrency"] == 50 // 5  # N_max = (32 + 8) / 8 = 5 pages a request
    prompts = prompts_of([6] * 14, seed=9)
    outs = llm.generate(prompts, SamplingParams(max_tokens=60, temperature=0, ignore_eos=True), use_tqdm=False)
    assert all(len(o.token_ids) == 60 for o in outs)
    assert llm.stats()["preemptions"] == 0  # bounded KV: every admitted request can finish
    assert_pool_clean(llm)


def test_exports():
    assert zipage.LLM is LLM and zipage.SamplingParams is SamplingParams


@pytest.mark.parametrize("budget", [None, 16])
@pytest.mark.parametrize("async_compression", [False, True])
def test_async_scheduling_gives_the_same_tokens_and_stops(budget, async_compression):
    """Tokens fed on the device and read a step late: the same outputs, stops and finish reasons as
    the synchronous engine, and against per-prompt generate() for the greedy requests."""
    model = tiny_model("llama")
    prompts = prompts_of((9, 23, 14, 31, 5), seed=21)
    refs = [reference(model, p, 30) for p in prompts]
    params = [
        SamplingParams(max_tokens=30, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[refs[1][6]]),  # stops early
        SamplingParams(max_tokens=25, temperature=0.9, top_k=20, seed=5, ignore_eos=True),
        SamplingParams(max_tokens=1, temperature=0, ignore_eos=True),  # its only token is its last
        SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[refs[4][0]]),  # stops at once
    ]
    kw = dict(budget=budget, page_size=4, num_pages=80, async_compression=async_compression)
    if budget is not None:
        kw.update(buffer=4, window=2)
    runs = {}
    for mode in (False, True):
        llm = LLM(model, async_scheduling=mode, **kw)
        runs[mode] = llm.generate(prompts, params, use_tqdm=False)
        assert_pool_clean(llm)
        assert llm.stats()["generated_tokens"] == sum(len(o.token_ids) for o in runs[mode])
    for sync, overlapped in zip(runs[False], runs[True]):
        assert overlapped.token_ids == sync.token_ids and overlapped.finish_reason == sync.finish_reason
    got = runs[True]
    if budget is None:
        assert got[0].token_ids == refs[0]
    assert got[1].finish_reason == "stop" and got[1].token_ids == refs[1][: refs[1].index(refs[1][6]) + 1]
    assert got[3].token_ids == refs[3][:1] and got[3].finish_reason == "length"
    assert got[4].token_ids == refs[4][:1] and got[4].finish_reason == "stop"


def test_async_scheduling_streams_and_cancels_without_losing_pages():
    model = tiny_model("llama")
    prompts = prompts_of((10, 20, 30), seed=3)
    llm = LLM(model, budget=16, page_size=4, buffer=4, num_pages=64, async_scheduling=True)
    ids = [llm.add_request(p, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)) for p in prompts]
    llm.step()
    llm.step()  # the second step's tokens are still on the device
    assert llm.core.inflight is not None and all(llm.requests[i].pending == 1 for i in ids)
    llm.cancel(ids[1])  # cancelled with a token in flight: that token is dropped
    streamed = [t for chunk in llm.stream(ids[0]) for t in chunk]
    assert streamed == llm.output(ids[0]).token_ids and len(streamed) == 30
    while llm.has_unfinished():
        llm.step()
    assert llm.output(ids[1]).finish_reason == "cancelled" and len(llm.output(ids[1]).token_ids) == 1
    assert llm.output(ids[2]).finish_reason == "length"
    assert_pool_clean(llm)


def test_pool_is_sized_by_default_on_a_cpu(llama):
    model = llama
    """``LLM(model, tok, budget=...)`` works on a CPU without ``num_pages``: the pool holds what
    ``max_num_seqs`` requests need at most (``budget + buffer`` tokens each, or the context with
    full KV), and at least what one prompt of ``max_model_len`` tokens needs before its first
    compression, no more."""
    llm = LLM(model, budget=16, page_size=4, buffer=4, max_num_seqs=3, max_model_len=64)
    assert llm.stats()["total_pages"] == 3 * 6  # ceil((16 + 4 + 1) / 4) pages per request
    long = LLM(model, budget=16, page_size=4, buffer=4, max_num_seqs=1, max_model_len=120)
    assert long.stats()["total_pages"] == 31  # ceil(121 / 4): a 100-token prompt is stored whole first
    prompt = prompts_of((100,))[0]
    out = long.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    assert out.token_ids == reference(model, prompt, 8, cache_implementation="zipage",
                                      cache_config={"budget": 16, "page_size": 4, "buffer": 4})
    assert_pool_clean(long)
    prompt = prompts_of((10,))[0]
    out = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    assert out.token_ids == reference(model, prompt, 20, cache_implementation="zipage",
                                      cache_config={"budget": 16, "page_size": 4, "buffer": 4})
    full = LLM(model, budget=None, page_size=4, max_num_seqs=2, max_model_len=64)
    assert full.stats()["total_pages"] == 2 * 16
    assert_pool_clean(llm)
