"""The engine's front ends (generate, step, agenerate) and its input checks: regressions of reviewed bugs."""

from __future__ import annotations

import asyncio
import math
import random
import time

import numpy as np
import pytest
import torch
from test_engine import assert_pool_clean

from zipage import LLM, SamplingParams
from zipage.engine.sampler import sample

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


# ------------------------------------------------------------------ a stop read while compressing
COMPRESS = dict(budget=16, page_size=4, buffer=4, window=2, num_pages=64, async_scheduling=True,
                async_compression=True)


def _stop_during_compression(model):
    """A prompt, its free-running greedy tokens and the index of a (first-seen) token that is read on
    the host while that request's asynchronous compression is in flight."""
    free = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    for seed in range(6):
        rnd = random.Random(seed)
        prompt = [rnd.randrange(3, 96) for _ in range(10)]
        llm = LLM(model, **COMPRESS)
        seq = llm.requests[llm.add_request(prompt, free)]
        hit = []
        start = llm.core.compressions.launch
        llm.core.compressions.launch = lambda plan, start=start, seq=seq, hit=hit: (hit.append(len(seq.output_ids)),
                                                                                     start(plan))[1]
        while llm.has_unfinished():
            llm.step()
        ref = seq.output_ids
        ks = [k for k in hit if k < len(ref) and ref[k] not in ref[:k]]
        if ks:
            return prompt, ref, ks[0]
    pytest.fail("no token is read while a compression is in flight")


def test_stop_token_read_while_compressing_is_reported_finished(llama):
    prompt, ref, k = _stop_during_compression(llama)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop_token_ids=[ref[k]])

    llm = LLM(llama, **COMPRESS)
    out = llm.generate([prompt], params, use_tqdm=False)[0]  # raised "requests ['0'] were lost"
    assert out.finish_reason == "stop" and out.finished and out.token_ids == ref[: k + 1]
    assert_pool_clean(llm)

    llm = LLM(llama, **COMPRESS)
    rid = llm.add_request(prompt, params)
    seq = llm.requests[rid]
    finished, read_while_compressing = [], False
    while llm.has_unfinished():
        for o in llm.step():
            if o.request_id != rid:
                continue
            if o.finished:
                finished.append(o)
            elif o.token_ids and o.token_ids[-1] == ref[k] and seq.compressing:
                read_while_compressing = True
                assert seq.pages and not seq.finished  # its pages stay until the compression lands
    assert read_while_compressing
    assert len(finished) == 1, finished  # exactly one step reports it finished
    assert finished[0].finish_reason == "stop" and finished[0].token_ids == ref[: k + 1]
    assert_pool_clean(llm)


# ------------------------------------------------------------------ automatic ids vs the caller's
def test_automatic_ids_never_take_a_callers_id(llama):
    llm = LLM(llama, budget=None, page_size=4, num_pages=64)
    mine = llm.add_request([5, 6, 7], GREEDY, request_id="0")  # still running
    auto = llm.add_request([1, 2], GREEDY)
    assert auto != mine
    out = llm.generate([[8, 9, 10]], GREEDY, use_tqdm=False)[0]  # raised "request id '0' is already in flight"
    assert out.prompt_token_ids == [8, 9, 10] and out.request_id not in (mine, auto)
    while llm.has_unfinished():
        llm.step()
    before = llm.output(mine)
    assert before.prompt_token_ids == [5, 6, 7] and before.finished

    llm.add_request([4, 4], GREEDY, request_id="7")  # a finished caller's result, kept
    while llm.has_unfinished():
        llm.step()
    outs = llm.generate([[8, 9, 10]] * 9, GREEDY, use_tqdm=False)
    assert len({o.request_id for o in outs} | {mine, auto, "7"}) == 12
    assert llm.output(mine) == before  # was overwritten, then popped by generate()
    assert llm.output("7").prompt_token_ids == [4, 4]
    assert set(llm.requests) == {mine, auto, "7"}
    assert_pool_clean(llm)


# ------------------------------------------------------------------ agenerate
def _slow_steps(llm):
    inside, overlaps = [0], [0]
    real_step = llm.step

    def slow_step():
        inside[0] += 1
        overlaps[0] = max(overlaps[0], inside[0])
        try:
            time.sleep(0.05)  # a long GPU step
            return real_step()
        finally:
            inside[0] -= 1

    llm.step = slow_step
    return overlaps


def test_cancelled_agenerate_aborts_its_request_and_steps_never_overlap(llama):
    llm = LLM(llama, budget=None, page_size=4, num_pages=64)
    overlaps = _slow_steps(llm)
    p = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)

    async def main():
        a = asyncio.create_task(llm.agenerate([5, 6, 7], p))
        await asyncio.sleep(0.02)  # a's step is running in the worker thread
        a.cancel()  # the client went away
        b = asyncio.create_task(llm.agenerate([8, 9, 10], p))
        with pytest.raises(asyncio.CancelledError):
            await a
        return await b

    out = asyncio.run(main())
    assert out.finish_reason == "length" and len(out.token_ids) == 30
    assert overlaps[0] == 1  # was 2: b's step ran while a's worker was still inside step()
    assert llm.requests == {}  # a's request was left running in llm.requests
    assert not llm.has_unfinished()
    assert_pool_clean(llm)


def test_agenerate_with_a_timeout_cancels_its_request(llama):
    llm = LLM(llama, budget=None, page_size=4, num_pages=64)
    _slow_steps(llm)

    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(llm.agenerate([5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True)), 0.12)

    asyncio.run(main())
    assert llm.requests == {} and not llm.has_unfinished()
    assert_pool_clean(llm)


def test_agenerate_works_in_successive_event_loops(llama):
    llm = LLM(llama, budget=None, page_size=4, num_pages=64)
    p = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

    async def batch():
        return await asyncio.gather(*(llm.agenerate(q, p) for q in ([5, 6, 7], [8, 9, 10])))

    first = asyncio.run(batch())
    second = asyncio.run(batch())  # raised: the lock is bound to a different event loop
    assert [o.token_ids for o in second] == [o.token_ids for o in first]
    assert all(o.finish_reason == "length" for o in first + second)
    assert llm.requests == {}
    assert_pool_clean(llm)


def test_a_failing_agenerate_leaves_no_request_behind(llama):
    llm = LLM(llama, budget=None, page_size=4, num_pages=64)
    real_step = llm.step

    def failing_step():
        real_step()
        raise RuntimeError("boom")

    llm.step = failing_step
    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(llm.agenerate([5, 6, 7], GREEDY))
    assert llm.requests == {} and not llm.has_unfinished()
    assert_pool_clean(llm)


# ------------------------------------------------------------------ sampling parameters
@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=math.nan), "temperature=nan"),
    (dict(temperature=math.inf), "temperature=inf"),
    (dict(temperature=-0.5), "temperature=-0.5"),
    (dict(temperature=True), "temperature=True"),
    (dict(top_p=math.nan), "top_p=nan"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(min_tokens=50, max_tokens=5), "min_tokens=50"),
    (dict(stop_token_ids=[-1, 3]), "stop_token_ids=[-1, 3]"),
    (dict(max_tokens=2.5), "max_tokens=2.5"),
])
def test_bad_sampling_params_are_refused_by_name(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name.replace("[", r"\[").replace("]", r"\]")):
        SamplingParams(**kwargs)


def test_numpy_numbers_are_accepted_as_sampling_params():
    p = SamplingParams(max_tokens=np.int64(5), temperature=np.float32(0.5), top_k=np.int32(3),
                       stop_token_ids=[np.int64(4)], seed=np.int64(1))
    assert p.max_tokens == 5 and type(p.max_tokens) is int and p.stop_token_ids == [4] and type(p.seed) is int


def test_tiny_temperatures_decode_greedily(llama):
    llm = LLM(llama, budget=None, page_size=4, num_pages=16)
    prompts = [[5, 6], [7, 8, 9]]
    tiny = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=1e-40, ignore_eos=True), use_tqdm=False)
    greedy = llm.generate(prompts, GREEDY, use_tqdm=False)  # 1e-40 raised "probability tensor contains ... nan"
    assert [o.token_ids for o in tiny] == [o.token_ids for o in greedy]
    assert_pool_clean(llm)


def test_sampler_falls_back_to_argmax_on_non_finite_logits():
    logits = torch.randn(3, 11)
    logits[1, 4] = math.nan
    logits[2, 7] = math.inf
    params = [SamplingParams(temperature=0.7, seed=1)] * 3
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    tokens = sample(logits, params, gens).tokens.tolist()  # raised: probability tensor contains nan
    assert tokens[1] == 4 and tokens[2] == 7 and 0 <= tokens[0] < 11


def test_a_nan_temperature_is_refused_and_the_others_keep_decoding(llama):
    llm = LLM(llama, budget=None, page_size=4, num_pages=64)
    good = llm.add_request([5, 6, 7], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    p = SamplingParams(max_tokens=5)
    p.temperature = math.nan  # changed after construction: add_request checks again
    with pytest.raises(ValueError, match="temperature=nan"):
        llm.add_request([8, 9], p)
    while llm.has_unfinished():
        llm.step()
    assert llm.output(good).finish_reason == "length" and len(llm.output(good).token_ids) == 5
    assert set(llm.requests) == {good}
    assert_pool_clean(llm)


# ------------------------------------------------------------------ requests
def test_request_input_checks(llama):
    with pytest.raises(ValueError, match="max_model_len=0"):
        LLM(llama, budget=None, page_size=4, num_pages=8, max_model_len=0)
    assert LLM(llama, budget=None, page_size=4, num_pages=8, max_model_len=64).max_model_len == 64
    llm = LLM(llama, budget=None, page_size=4, num_pages=32)
    with pytest.raises(TypeError, match="request_id=5"):
        llm.add_request([5, 6], request_id=5)
    with pytest.raises(ValueError, match="stop_token_ids=.*1000"):
        llm.add_request([5, 6], SamplingParams(stop_token_ids=[1000]))
    with pytest.raises(ValueError, match="0..95, got 96"):
        llm.add_request([5, 96])
    with pytest.raises(TypeError, match=r"prompt\[1\]=2.5"):
        llm.add_request([5, 2.5])
    with pytest.raises(TypeError, match=r"shape \(\)"):
        llm.add_request(torch.tensor(5))
    with pytest.raises(TypeError, match="prompts=None"):
        llm.generate(None, use_tqdm=False)
    assert llm.requests == {} and not llm.has_unfinished()

    rid = llm.add_request(list(np.array([5, 6, 7])), GREEDY)  # numpy ints
    assert llm.requests[rid].prompt_token_ids == [5, 6, 7]
    while llm.has_unfinished():
        llm.step()
    want = llm.output(rid).token_ids
    for prompt in (torch.tensor([5, 6, 7]), np.array([5, 6, 7]), (5, 6, 7), [np.int64(5), 6, 7]):
        outs = llm.generate(prompt, GREEDY, use_tqdm=False)  # one prompt of token ids
        assert len(outs) == 1 and outs[0].prompt_token_ids == [5, 6, 7] and outs[0].token_ids == want
    outs = llm.generate(torch.tensor([[5, 6, 7], [5, 6, 7]]), GREEDY, use_tqdm=False)  # a batch of two
    assert [o.token_ids for o in outs] == [want, want]
    assert_pool_clean(llm)


def test_max_model_len_beyond_the_trained_positions_needs_a_say_so(llama, monkeypatch):
    trained = llama.config.max_position_embeddings
    with pytest.raises(ValueError, match="max_position_embeddings"):
        LLM(llama, budget=None, page_size=4, num_pages=8, max_model_len=trained + 1)
    monkeypatch.setenv("ZIPAGE_ALLOW_LONG_MAX_MODEL_LEN", "1")
    assert LLM(llama, budget=None, page_size=4, num_pages=8, max_model_len=trained + 1).max_model_len == trained + 1


def test_rope_scaling_stretches_the_positions_a_model_takes():
    from types import SimpleNamespace

    from zipage.engine.llm import _rope_reach

    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert _rope_reach(SimpleNamespace(rope_scaling=yarn), 32768) == 131072
    assert _rope_reach(SimpleNamespace(rope_scaling={"type": "linear", "factor": 2.0}), 2048) == 4096
    assert _rope_reach(SimpleNamespace(rope_scaling={"rope_type": "llama3", "factor": 8.0}), 131072) == 131072
    assert _rope_reach(SimpleNamespace(rope_scaling=None), 2048) == 2048
    assert _rope_reach(SimpleNamespace(), None) is None
    per_layer = {"full_attention": {"rope_type": "linear", "factor": 8.0},
                 "sliding_attention": {"rope_type": "default"}}
    assert _rope_reach(SimpleNamespace(rope_parameters=per_layer), 2048) == 2048  # (the fewest of its layer types)
    per_layer["sliding_attention"] = {"rope_type": "linear", "factor": 2.0}
    assert _rope_reach(SimpleNamespace(rope_parameters=per_layer), 2048) == 4096


def test_a_switching_rope_is_found_in_a_config_with_one_per_layer_type():
    """A dynamic or LongRoPE RoPE picks its frequencies from a forward's largest position: found whether the
    config gives one RoPE or one per layer type (Gemma 3's form), the fewest positions of any."""
    from types import SimpleNamespace

    from zipage.engine.llm import _switching_rope

    longrope = {"rope_type": "longrope", "original_max_position_embeddings": 32, "short_factor": [1.0],
                "long_factor": [2.0]}
    assert _switching_rope(SimpleNamespace(rope_parameters=longrope), 128) == ("longrope", 32)
    per_layer = {"full_attention": longrope, "sliding_attention": {"rope_type": "default"}}
    assert _switching_rope(SimpleNamespace(rope_parameters=per_layer), 128) == ("longrope", 32)
    per_layer["sliding_attention"] = {"rope_type": "dynamic", "factor": 2.0}
    assert _switching_rope(SimpleNamespace(rope_parameters=per_layer), 16) == ("dynamic", 16)
    assert _switching_rope(SimpleNamespace(rope_parameters={"full_attention": {"rope_type": "default"}}), 16) is None


def test_the_engine_refuses_a_per_layer_type_longrope_past_its_switch():
    """Gemma 3 with LongRoPE on its full layers: a max_model_len past the switch would let one request's
    frequencies depend on the others' lengths in a packed forward, so it is refused as a flat LongRoPE is."""
    from conftest import tiny_sliding_model

    rope = {"full_attention": {"rope_type": "longrope", "short_factor": [1.0] * 8,
                               "original_max_position_embeddings": 32,
                               "long_factor": [1.0, 3, 9, 27, 81, 243, 729, 2187], "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    model = tiny_sliding_model("gemma3", max_position_embeddings=128, rope_parameters=rope)
    with pytest.raises(ValueError, match="longrope RoPE .* past 32 positions"):
        LLM(model, None, budget=None, page_size=4, num_pages=64, device="cpu")
    assert LLM(model, None, budget=None, page_size=4, num_pages=64, device="cpu", max_model_len=32).max_model_len == 32


def test_a_bad_prompt_in_generate_leaves_nothing_behind(llama):
    llm = LLM(llama, budget=None, page_size=4, num_pages=32)
    with pytest.raises(TypeError, match="prompt"):
        llm.generate([[5, 6], [7, 8], 3.5], GREEDY, use_tqdm=False)
    assert llm.requests == {} and not llm.has_unfinished()
    assert_pool_clean(llm)
