"""What a reasoning service asks of the engine: n samples sharing the prompt's pages, per-request KV
budgets (each admitted by its own worst case), penalties, log-probabilities and stop strings."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch
from conftest import tiny_model
from test_engine import assert_pool_clean, prompts_of, reference

from zipage import LLM, SamplingParams
from zipage.engine.sequence import RequestOutput


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def run(llm, prompts, params):
    """Step by hand; returns the outputs and the most requests seen running at once."""
    ids = [llm.add_request(p, q) for p, q in zip(prompts, params)]
    most = 0
    while llm.has_unfinished():
        llm.step()
        most = max(most, len(llm.scheduler.running))
    outs = [llm.output(i) for i in ids]
    for i in ids:
        llm.forget(i)
    return outs, most


def test_n_samples_share_the_prompt_pages_and_match_single_requests(model):
    llm = LLM(model, budget=None, page_size=4, num_pages=128)
    prompt = prompts_of((41,), seed=3)[0]
    params = SamplingParams(max_tokens=12, temperature=0.9, seed=7, n=4, ignore_eos=True)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3] and out.token_ids == out.outputs[0].token_ids
    assert llm.stats()["prefix_cache_hits"] == 3 * (40 // 4)  # samples 1..3 found the prompt's 10 full pages
    assert llm.blocks.pool.peak_used <= 11 + 4 * 3  # one prompt's pages, then 3 pages of outputs each
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    for c in out.outputs:  # sample i is the request alone with seed + i
        alone = LLM(model, budget=None, page_size=4, num_pages=128).generate(
            [prompt], SamplingParams(max_tokens=12, temperature=0.9, seed=7 + c.index, ignore_eos=True),
            use_tqdm=False)[0]
        assert c.token_ids == alone.token_ids and c.finish_reason == "length"
    assert_pool_clean(llm)


def test_per_request_budgets_compress_each_request_to_its_own_budget(model):
    llm = LLM(model, budget=32, page_size=4, buffer=4, num_pages=200)
    prompts = prompts_of((20, 9, 30, 14))
    budgets = [16, None, 24, "engine"]
    params = [SamplingParams(max_tokens=50, temperature=0, ignore_eos=True, **({} if b == "engine" else {"budget": b}))
              for b in budgets]
    outs, _ = run(llm, prompts, params)
    for prompt, b, out in zip(prompts, budgets, outs):
        b = 32 if b == "engine" else b
        kw = {} if b is None else dict(cache_implementation="zipage",
                                       cache_config={"budget": b, "page_size": 4, "buffer": 4})
        assert out.token_ids == reference(model, prompt, 50, **kw), b
    # evicted: each compression drops stored - budget tokens (prompt + 50 tokens, compressed at budget + buffer)
    assert llm.stats()["evicted_tokens"] > 0 and llm.stats()["compressions"] >= 3
    assert_pool_clean(llm)


def test_admission_sets_aside_each_request_s_worst_case(model):
    # budget 16 + buffer 4 = 5 pages; full KV with 8 + 40 tokens = 12 pages; engine budget 32 = 9 pages
    llm = LLM(model, budget=32, page_size=4, buffer=4, num_pages=40, max_num_seqs=64)
    prompts = prompts_of([8] * 12, seed=1)
    for budget, pages in ((16, 5), (None, 12), (32, 9)):
        outs, most = run(llm, prompts, [SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, budget=budget)]
                         * len(prompts))
        assert most == 40 // pages, budget
        assert all(len(o.token_ids) == 40 for o in outs)
    assert llm.stats()["preemptions"] == 0
    assert_pool_clean(llm)


def test_a_request_that_ends_before_its_budget_sets_aside_only_its_length(model):
    """Prompt + max_tokens below budget + buffer: the request is never compressed, so its worst case is its
    length (2 pages here), not the budget's 129 pages: all 12 run at once, and a budget larger than the pool
    is no reason to refuse a short request."""
    llm = LLM(model, budget=512, page_size=4, buffer=4, num_pages=40, max_num_seqs=64)
    prompts = prompts_of([4] * 12, seed=2)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    outs, most = run(llm, prompts, [params] * len(prompts))
    assert most == 12 and all(len(o.token_ids) == 4 for o in outs)
    for budget in (1000, None):
        out = llm.generate([prompts[0]], dataclasses.replace(params, budget=budget), use_tqdm=False)[0]
        assert out.token_ids == outs[0].token_ids
    with pytest.raises(ValueError, match="needs up to 129 pages"):  # a long request still cannot pass the pool
        llm.add_request(prompts[0], dataclasses.replace(params, max_tokens=600))
    assert llm.stats()["compressions"] == 0
    assert_pool_clean(llm)


def test_dtype_and_device_with_a_loaded_model_are_checked(model):
    """They load a model given by name; with a loaded one they are refused unless they name what it is."""
    for kw, match in ((dict(dtype=torch.float16), "dtype=torch.float16.*float32"), (dict(dtype="bogus"), "bogus"),
                      (dict(device="meta"), "device='meta'.*cpu"), (dict(device="nowhere"), "invalid")):
        with pytest.raises(ValueError, match=match):
            LLM(model, budget=None, page_size=4, num_pages=8, **kw)
    llm = LLM(model, budget=None, page_size=4, num_pages=8, dtype="float32", device="cpu")  # what it is: fine
    assert llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)[0].token_ids


def test_running_outputs_token_lists_copy_to_lists(model):
    llm = LLM(model, budget=None, page_size=4, num_pages=16)
    llm.add_request([5, 6, 7, 8], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    llm.step()
    out = llm.step()[0]
    assert not out.finished
    ids = out.outputs[0].token_ids.copy()
    n = len(ids)
    assert type(ids) is list and ids == out.outputs[0].token_ids and n >= 1
    ids.append(1)  # a copy: the engine's list is untouched
    assert len(out.outputs[0].token_ids) == n and out.prompt_token_ids.copy() == [5, 6, 7, 8]
    while llm.has_unfinished():
        llm.step()


def test_vllm_step_loop_names(model):
    """``abort_request`` (one id or a list; unknown and finished ids skipped) and ``has_unfinished_requests``."""
    llm = LLM(model, budget=None, page_size=4, num_pages=32)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    a, b, c = (llm.add_request(p, params) for p in prompts_of((6, 7, 8), seed=9))
    llm.step()
    llm.abort_request([a, "no such id"])
    llm.abort_request(b)
    assert llm.has_unfinished_requests()
    while llm.has_unfinished_requests():
        llm.step()
    assert [llm.output(r).outputs[0].finish_reason for r in (a, b, c)] == ["cancelled", "cancelled", "length"]
    llm.abort_request(c)  # finished: nothing to do
    assert llm.output(c).outputs[0].finish_reason == "length"
    assert_pool_clean(llm)


def test_budgets_are_checked(model):
    full = LLM(model, budget=None, page_size=4, num_pages=32)
    with pytest.raises(ValueError, match="budget=16.*built with budget=None"):
        full.add_request([5, 6, 7], SamplingParams(budget=16))
    full.add_request([5, 6, 7], SamplingParams(budget=None, max_tokens=3))  # full KV is what it does
    llm = LLM(model, budget=32, page_size=4, window=8, num_pages=64)
    with pytest.raises(ValueError, match="budget=4 .*window"):
        llm.add_request([5, 6, 7], SamplingParams(budget=4))
    with pytest.raises(ValueError, match="budget=0"):
        SamplingParams(budget=0)
    with pytest.raises(ValueError, match="needs up to"):  # full KV beyond the pool
        llm.add_request([5, 6, 7], SamplingParams(budget=None, max_tokens=400))


def test_repetition_penalty_matches_transformers(model):
    prompt = prompts_of((15,), seed=4)[0]
    llm = LLM(model, budget=None, page_size=4, num_pages=64)
    out = llm.generate([prompt], SamplingParams(max_tokens=30, temperature=0, repetition_penalty=1.8,
                                                ignore_eos=True), use_tqdm=False)[0]
    assert out.token_ids == reference(model, prompt, 30, repetition_penalty=1.8)
    plain = llm.generate([prompt], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    assert plain.token_ids != out.token_ids


def test_logit_bias_matches_transformers_sequence_bias_beside_an_unbiased_request(model):
    """A request's logit_bias moves its tokens as transformers' ``sequence_bias`` of single tokens does, and only
    its own: the request beside it in the same steps gets its plain tokens."""
    a, b = prompts_of((15, 11), seed=8)
    plain = reference(model, a, 20)
    bias = {plain[0]: -100.0, plain[3]: 3.0, 7: 1.5}
    llm = LLM(model, budget=None, page_size=4, num_pages=64)
    outs, _ = run(llm, [a, b], [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logit_bias=bias),
                               SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)])
    want = reference(model, a, 20, sequence_bias={(t,): v for t, v in bias.items()})
    assert outs[0].outputs[0].token_ids == want != plain
    assert plain[0] not in want
    assert outs[1].outputs[0].token_ids == reference(model, b, 20)
    vocab = model.config.vocab_size
    with pytest.raises(ValueError, match=f"logit_bias is invalid: token id {vocab} is outside the vocabulary"):
        llm.add_request(a, SamplingParams(logit_bias={vocab: 1.0}))
    assert_pool_clean(llm)


def test_allowed_token_ids_match_transformers_suppressing_the_others(model):
    """allowed_token_ids (vLLM's) leaves a request only those tokens, before its logit_bias: transformers'
    ``suppress_tokens`` of every other token, with the bias as ``sequence_bias``, gives the same tokens."""
    a, b = prompts_of((13, 9), seed=9)
    vocab = model.config.vocab_size
    allowed, bias = [5, 17, 30, 41, 63], {17: -100.0, 30: 2.0}
    llm = LLM(model, budget=None, page_size=4, num_pages=64)
    outs, _ = run(llm, [a, b], [SamplingParams(max_tokens=16, temperature=0, ignore_eos=True,
                                               allowed_token_ids=allowed, logit_bias=bias),
                               SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)])
    want = reference(model, a, 16, suppress_tokens=[t for t in range(vocab) if t not in allowed],
                     sequence_bias={(t,): v for t, v in bias.items()})
    assert outs[0].outputs[0].token_ids == want and set(want) <= set(allowed) - {17}
    assert outs[1].outputs[0].token_ids == reference(model, b, 16)
    with pytest.raises(ValueError, match=f"allowed_token_ids is invalid: token id {vocab} is outside"):
        llm.add_request(a, SamplingParams(allowed_token_ids=[1, vocab]))
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    # every allowed token ends the output and min_tokens forbids that: nothing could be sampled (token 0 came out)
    for params in (SamplingParams(allowed_token_ids=[eos], min_tokens=2),
                   SamplingParams(allowed_token_ids=[eos, 7, 7], stop_token_ids=[7], min_tokens=1)):
        with pytest.raises(ValueError, match="every allowed token ends the output"):
            llm.add_request(a, params)
    out = llm.generate([a], SamplingParams(allowed_token_ids=[eos], min_tokens=2, ignore_eos=True, max_tokens=3,
                                           temperature=0), use_tqdm=False)[0]  # (EOS does not end it: allowed)
    assert out.outputs[0].token_ids == [eos] * 3
    assert SamplingParams(allowed_token_ids=[5, 5, 3, 5]).allowed_token_ids == [5, 3]
    assert_pool_clean(llm)


def test_presence_and_frequency_penalties_count_the_output_only(model):
    prompt = prompts_of((10,), seed=5)[0]
    llm = LLM(model, budget=None, page_size=4, num_pages=64)
    out = llm.generate([prompt], SamplingParams(max_tokens=25, temperature=0, presence_penalty=2.0,
                                                frequency_penalty=2.0, ignore_eos=True), use_tqdm=False)[0]
    # the same penalty by hand, step by step, on the model's logits
    ids = list(prompt)
    for _ in range(25):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        counts = torch.bincount(torch.tensor(ids[len(prompt):], dtype=torch.long), minlength=logits.shape[0]).float()
        ids.append(int((logits - 2.0 * counts - 2.0 * (counts > 0).float()).argmax()))
    assert out.token_ids == ids[len(prompt):]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_logprobs_are_the_model_s(model, async_scheduling):
    prompt = prompts_of((12,), seed=6)[0]
    llm = LLM(model, budget=None, page_size=4, num_pages=64, async_scheduling=async_scheduling)
    out = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0]
    hf = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None,
                        output_logits=True, return_dict_in_generate=True)
    assert len(out.logprobs) == 8
    for entry, token, logits in zip(out.logprobs, out.token_ids, hf.logits):
        lp = torch.log_softmax(logits[0].float(), dim=-1)
        assert entry.token_id == token and entry.logprob == pytest.approx(lp[token].item(), abs=1e-4)
        values, ids = lp.topk(3)
        assert [t for t, _ in entry.top] == ids.tolist()
        assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-4)
    nothing = llm.generate([prompt], SamplingParams(max_tokens=3), use_tqdm=False)[0]
    assert nothing.logprobs is None


class LetterTokenizer:
    """Token id t decodes to one letter."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + t % 26) for t in ids)


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_kept_in_the_text_on_request(model, include):
    tok = LetterTokenizer()
    llm = LLM(model, tok, budget=None, page_size=4, num_pages=64)
    prompt = prompts_of((9,), seed=2)[0]
    whole = tok.decode(llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
                                    use_tqdm=False)[0].token_ids)
    stop = whole[20:22]
    at = whole.find(stop)
    out = llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=stop,
                                                include_stop_str_in_output=include), use_tqdm=False)[0]
    assert out.finish_reason == "stop"
    assert out.text == (whole[: at + 2] if include else whole[:at])


class SpecialLetterTokenizer(LetterTokenizer):
    """Ids divisible by 5 are special tokens: ``<k>`` in the text unless skipped."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join("" if skip_special_tokens else f"<{t}>" if t % 5 == 0 else chr(ord("a") + t % 26)
                       for t in ids if not (skip_special_tokens and t % 5 == 0))


def _free_text(llm, tok, prompt, n=40):
    out = llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    return tok.decode(out.token_ids)


def test_stop_strings_count_only_past_min_tokens(model):
    """A stop string the first ``min_tokens`` tokens' text holds neither stops the output nor cuts its text
    (vLLM's meaning); one that ends later does, and the text is the tokens' text up to it."""
    tok = LetterTokenizer()
    llm = LLM(model, tok, budget=None, page_size=4, num_pages=64)
    prompt = prompts_of((9,), seed=2)[0]
    whole = _free_text(llm, tok, prompt)
    early = next(i for i in range(4) if whole.find(whole[i], 8) > 0)  # a letter early that comes again past 8
    stop, again = whole[early], whole.find(whole[early], 8)
    params = dict(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop, "zzzzz"], min_tokens=early + 2)
    out = llm.generate([prompt], SamplingParams(**params), use_tqdm=False)[0]
    first_after = whole.find(stop, early + 2)  # one character a token: the (min_tokens + 1)-th is the first to stop
    assert out.finish_reason == "stop" and first_after <= again
    assert out.text == whole[:first_after] == tok.decode(out.token_ids[:first_after])
    # a stop string only the first min_tokens tokens hold: the output runs to its length
    only_early = next((c for c in whole[:3] if c not in whole[3:]), None)
    if only_early is not None:
        params.update(stop=[only_early, "zzzzz"], min_tokens=4)
        out = llm.generate([prompt], SamplingParams(**params), use_tqdm=False)[0]
        assert out.finish_reason == "length" and out.text == whole
    assert_pool_clean(llm)


def test_skip_special_tokens_decides_the_text(model):
    tok = SpecialLetterTokenizer()
    llm = LLM(model, tok, budget=None, page_size=4, num_pages=64)
    prompt = prompts_of((9,), seed=2)[0]
    ids = llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
                       use_tqdm=False)[0].token_ids
    assert any(t % 5 == 0 for t in ids), "the test needs a special token in the output"
    for skip in (True, False):
        out = llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=["zzzzz"],
                                                    skip_special_tokens=skip), use_tqdm=False)[0]
        assert out.token_ids == ids and out.text == tok.decode(ids, skip_special_tokens=skip)
    with pytest.raises(TypeError, match="skip_special_tokens"):
        SamplingParams(skip_special_tokens="no")


def test_a_cancelled_request_has_the_text_of_its_tokens(model):
    tok = LetterTokenizer()
    llm = LLM(model, tok, budget=None, page_size=4, num_pages=32, async_scheduling=False)
    for stop in ([], ["zzzz"]):
        rid = llm.add_request([5, 6, 7], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=stop))
        for _ in range(6):
            llm.step()
        llm.cancel(rid)
        out = llm.output(rid)
        assert out.finish_reason == "cancelled" and len(out.token_ids) >= 3
        assert out.text == tok.decode(out.token_ids)
    assert_pool_clean(llm)


def test_seeds_a_generator_cannot_take_are_refused():
    with pytest.raises(ValueError, match="SamplingParams.seed"):
        SamplingParams(seed=2**64)
    with pytest.raises(ValueError, match="SamplingParams.seed"):
        SamplingParams(seed=2**64 - 1, n=2)  # the second sample's seed + 1
    with pytest.raises(ValueError, match="SamplingParams.seed"):
        SamplingParams(seed=-(2**63) - 1)
    SamplingParams(seed=2**64 - 2, n=2)
    SamplingParams(seed=-(2**63))


def test_full_kv_page_size_is_checked(model):
    for bad in (0, -4, 3, True):
        with pytest.raises(ValueError, match="page_size"):
            LLM(model, budget=None, page_size=bad, num_pages=8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_per_request_budgets_samples_and_logprobs_on_cuda():
    """CUDA graphs, asynchronous scheduling and compression: each request's own budget, n samples
    and log-probabilities as on the CPU."""
    model = tiny_model("qwen3", scale=1.0).cuda()
    llm = LLM(model, budget=32, page_size=4, buffer=4, num_pages=256, async_compression=True)
    prompts = prompts_of((20, 9, 30), seed=11)
    budgets = [16, None, 24]
    params = [SamplingParams(max_tokens=60, temperature=0, ignore_eos=True, budget=b, logprobs=2) for b in budgets]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, b, out in zip(prompts, budgets, outs):
        kw = {} if b is None else dict(cache_implementation="zipage",
                                       cache_config={"budget": b, "page_size": 4, "buffer": 4})
        assert out.token_ids == reference(model, prompt, 60, **kw), b
        assert [e.token_id for e in out.logprobs] == out.token_ids
    assert llm.runner.graphs and llm.stats()["compressions"] > 0
    n = llm.generate([prompts[2]], SamplingParams(max_tokens=20, temperature=0.8, seed=4, n=3, ignore_eos=True),
                     use_tqdm=False)[0]
    for c in n.outputs:
        alone = llm.generate([prompts[2]], SamplingParams(max_tokens=20, temperature=0.8, seed=4 + c.index,
                                                          ignore_eos=True), use_tqdm=False)[0]
        assert c.token_ids == alone.token_ids
    assert_pool_clean(llm)


def test_generate_returns_when_its_request_is_cancelled_from_another_thread():
    """A request of generate() cancelled by another thread (which gives no output of its own) ends the call at
    once, not when the engine's other requests are done."""
    import threading
    import time

    llm = LLM(tiny_model("llama"), budget=None, page_size=4, num_pages=256, max_model_len=2048)
    other = llm.add_request([5, 6, 7], SamplingParams(max_tokens=600, temperature=0, ignore_eos=True))

    def cancel_the_call_s_request():
        while not any(r != other for r in list(llm.requests)):
            time.sleep(0.001)
        rid = next(r for r in list(llm.requests) if r != other)
        while len(llm.requests[rid].output_ids) < 3:
            time.sleep(0.001)
        llm.cancel(rid)

    t = threading.Thread(target=cancel_the_call_s_request)
    t.start()
    out = llm.generate([[8, 9, 10]], SamplingParams(max_tokens=400, temperature=0, ignore_eos=True), use_tqdm=False)
    t.join(30)
    assert out[0].finish_reason == "cancelled" and 3 <= len(out[0].outputs[0].token_ids) < 400
    assert not llm.requests[other].finished and len(llm.requests[other].output_ids) < 100


def _longrope_phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=256, original_max_position_embeddings=32,
                     rope_scaling={"type": "longrope", "short_factor": [1.0] * 8,
                                   "long_factor": [1.0, 3, 9, 27, 81, 243, 729, 2187]},
                     pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "sdpa"
    return Phi3ForCausalLM(cfg).eval()


@pytest.mark.parametrize("family", ["dynamic", "longrope"])
def test_a_rope_that_switches_with_the_longest_position_is_refused_past_it(family):
    """Dynamic NTK and LongRoPE take their frequencies from the largest position of a forward, which in the
    engine holds every running request: past that point a request's tokens would depend on the others'. Up to
    it, the engine's tokens are transformers' own, alone or beside a longer request."""
    if family == "dynamic":
        model = tiny_model("llama", max_position_embeddings=32, rope_scaling={"rope_type": "dynamic", "factor": 4.0})
        limit = 32
    else:
        model, limit = _longrope_phi3(), 32
    with pytest.raises(ValueError, match=f"{family} RoPE.*max_model_len <= {limit}"):
        LLM(model, budget=None, page_size=4, num_pages=64, max_model_len=limit + 1)
    llm = LLM(model, budget=None, page_size=4, num_pages=64, max_model_len=limit)
    g = torch.Generator().manual_seed(1)
    short, longer = (torch.randint(3, 96, (n,), generator=g).tolist() for n in (6, 20))
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    both = llm.generate([short, longer], params, use_tqdm=False)
    for prompt, out in zip((short, longer), both):
        want = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0,
                              eos_token_id=None)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == want


def test_a_request_keeps_its_own_sampling_params():
    """A caller that changes (or reuses) its SamplingParams after add_request changes no request in flight."""
    llm = LLM(tiny_model("llama"), budget=None, page_size=4, num_pages=64)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop_token_ids=[])
    rid = llm.add_request([5, 6, 7], params)
    params.max_tokens = 3
    params.stop_token_ids.append(int(llm.generate([[5, 6, 7]], SamplingParams(max_tokens=1, temperature=0),
                                                  use_tqdm=False)[0].outputs[0].token_ids[0]))
    while llm.has_unfinished():
        llm.step()
    assert len(llm.output(rid).outputs[0].token_ids) == 20


def test_chat_with_token_ids_is_refused():
    llm = LLM(tiny_model("llama"), budget=None, page_size=4, num_pages=64)
    with pytest.raises(ValueError, match="chat=True"):
        llm.add_request([5, 6, 7], SamplingParams(max_tokens=2), chat=True)
    assert not llm.requests


@pytest.mark.parametrize("by", ["stop_token_ids", "eos"])
def test_the_token_that_stops_a_request_is_left_out_of_its_text(model, by):
    """vLLM's meaning: a request ended by a token (one of ``stop_token_ids``, or EOS) has that token's id in
    ``token_ids`` but not its text in ``text``, unless ``include_stop_str_in_output``."""
    tok = SpecialLetterTokenizer()
    llm = LLM(model, tok, budget=None, page_size=4, num_pages=64)
    prompt = prompts_of((9,), seed=2)[0]
    free = llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
                        use_tqdm=False)[0].token_ids
    end = free[5]
    at = free.index(end)
    original = model.generation_config.eos_token_id
    try:
        if by == "eos":
            model.generation_config.eos_token_id = end
            llm = LLM(model, tok, budget=None, page_size=4, num_pages=64)
        for include in (False, True):
            params = SamplingParams(max_tokens=40, temperature=0, skip_special_tokens=False,
                                    include_stop_str_in_output=include,
                                    stop_token_ids=[end] if by == "stop_token_ids" else [])
            out = llm.generate([prompt], params, use_tqdm=False)[0]
            assert out.finish_reason == "stop" and out.token_ids == free[: at + 1]
            kept = free[: at + 1] if include else free[:at]
            assert out.text == out.outputs[0].text == tok.decode(kept, skip_special_tokens=False)
    finally:
        model.generation_config.eos_token_id = original
    assert_pool_clean(llm)


def test_a_running_request_s_outputs_carry_its_text_so_far(model):
    """``step()``'s outputs of a running request hold the text of its tokens so far (vLLM's), decoded only when
    read, and, with stop strings set, less the characters where a stop string may still start."""
    tok = LetterTokenizer()
    decoded = []
    tok.decode = (lambda f: lambda ids, skip_special_tokens=True: (decoded.append(len(ids)), f(ids))[1])(tok.decode)
    llm = LLM(model, tok, budget=None, page_size=4, num_pages=64, async_scheduling=False)
    prompt = prompts_of((9,), seed=2)[0]
    for stop in ([], ["zzz", "yyyy"]):
        rid = llm.add_request(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, stop=stop))
        seen = []
        while llm.has_unfinished():
            decoded.clear()
            outs = [o for o in llm.step() if o.request_id == rid]
            if not stop:  # nothing decoded for a running output until its text is read
                assert not decoded or outs and outs[0].finished
            seen += outs
        assert len(seen) == 8 and seen[-1].finished
        hold = 3 if stop else 0
        for o in seen[:-1]:
            ids = list(o.token_ids)
            whole = tok.decode(ids)  # (one letter a token: the first outputs are shorter than the hold)
            want = whole[: len(whole) - hold] if len(whole) > hold else ""
            assert o.text == o.outputs[0].text == want and not o.finished
            again = pickle.loads(pickle.dumps(o))  # (as a plain RequestOutput, its text decoded)
            assert type(again) is RequestOutput and again.text == want and again.outputs[0].text == want
            assert dataclasses.replace(o, finished=False).text == want
        assert seen[-1].text == tok.decode(seen[-1].token_ids)
        llm.forget(rid)
    assert_pool_clean(llm)


def test_prompt_dicts_as_vllm_takes_them(model):
    llm = LLM(model, budget=None, page_size=4, num_pages=64)
    prompt = prompts_of((9,), seed=2)[0]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    want = llm.generate([prompt], params, use_tqdm=False)[0].token_ids
    assert llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].token_ids == want
    outs = llm.generate([{"prompt_token_ids": prompt}, prompt], sampling_params=params, use_tqdm=False)
    assert [o.token_ids for o in outs] == [want, want]
    for bad, words in (({"role": "user", "content": "hi"}, "chat=True"), ({"prompt_token_ids": "abc"}, "token ids"),
                       ({"prompt": prompt}, "'prompt' is a string"), ({}, "exactly one of"),
                       ({"prompt": "a", "prompt_token_ids": prompt}, "exactly one of")):
        with pytest.raises(TypeError, match=words):
            llm.generate(bad, params, use_tqdm=False)
    with pytest.raises(TypeError, match="both params and sampling_params"):
        llm.generate([prompt], params, sampling_params=params, use_tqdm=False)
    assert_pool_clean(llm)


def test_max_tokens_none_runs_to_what_the_request_may_take(model):
    llm = LLM(model, budget=None, page_size=4, num_pages=16, max_model_len=40)
    prompt = prompts_of((9,), seed=2)[0]
    out = llm.generate([prompt], SamplingParams(max_tokens=None, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.token_ids) == 40 - 9 and out.finish_reason == "length"
    with pytest.raises(ValueError, match="min_tokens"):
        llm.generate([prompt], SamplingParams(max_tokens=None, min_tokens=50), use_tqdm=False)
    assert SamplingParams(stop=None, stop_token_ids=None).stop == []
    sp = SamplingParams()
    sp.stop = "y"  # (set after construction, as vLLM users do)
    sp.validate()
    assert sp.stop == ["y"]
    assert_pool_clean(llm)


@pytest.mark.parametrize("name", ["enable_prefix_caching", "async_scheduling", "async_compression", "enforce_eager",
                                  "fuse_ops"])
def test_llm_flags_are_bools(model, name):
    with pytest.raises(TypeError, match=f"LLM\\({name}='false'\\) is invalid"):
        LLM(model, budget=None, page_size=4, num_pages=8, **{name: "false"})


@pytest.mark.parametrize("share", [0, 1.5, "x", True, float("nan")])
def test_gpu_memory_utilization_is_a_share(model, share):
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        LLM(model, budget=None, page_size=4, num_pages=8, gpu_memory_utilization=share)


def metaspace_tokenizer(vocab_size):
    """A SentencePiece-like tokenizer (Llama 2, Mistral, Gemma): every token a ``▁word``, whose ``▁`` decodes to a
    space except at the very start of what is decoded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"\u2581w{i}": i for i in range(vocab_size)}, unk_token="\u2581w0"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_output_text_keeps_the_space_its_first_sentencepiece_token_starts_with(model):
    """An output's text is what its tokens add after the prompt (vLLM's): `` w7 w3``, not ``w7 w3`` as its tokens
    decoded alone give, in the final text, with stop strings, and in a running request's outputs."""
    tok = metaspace_tokenizer(model.config.vocab_size)
    llm = LLM(model, tok, budget=None, page_size=4, num_pages=64, async_scheduling=False)
    prompt = prompts_of((9,), seed=2)[0]
    params = dict(max_tokens=12, temperature=0, ignore_eos=True)
    out = llm.generate([prompt], SamplingParams(**params), use_tqdm=False)[0]
    pieces = tok.convert_ids_to_tokens(out.token_ids)
    want = "".join(p.replace("\u2581", " ") for p in pieces)  # (every piece a word after a space)
    assert want.startswith(" w") and out.text == want
    stop = want[: want.index(" ", 1) + 3]  # the first word and the start of the second, across tokens
    stopped = llm.generate([prompt], SamplingParams(stop=["zzz", stop], include_stop_str_in_output=True, **params),
                           use_tqdm=False)[0]
    assert stopped.finish_reason == "stop" and stopped.text == stop
    rid = llm.add_request(prompt, SamplingParams(**params))
    texts = [o.text for o in llm.step() if o.request_id == rid]
    texts += [o.text for o in llm.step() if o.request_id == rid]
    assert texts == [want[: len(" " + pieces[0][1:])], want[: len(" " + pieces[0][1:] + " " + pieces[1][1:])]]
    llm.cancel(rid)
    assert llm.output(rid).text == "".join(p.replace("\u2581", " ") for p in pieces[: len(llm.output(rid).token_ids)])
    llm.forget(rid)
    assert_pool_clean(llm)


def test_a_running_text_never_ends_inside_a_character():
    """A running output's text holds back a character whose bytes have not all come (byte-level tokens of an
    emoji), so each step's text is a prefix of the next one's."""
    from zipage.engine.outputs import OutputProcessor
    from zipage.engine.sequence import Sequence
    from zipage.serve.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    ids = tok("a \U0001f37d b")["input_ids"]  # a, space, 4 bytes of an emoji, space, b
    seq = Sequence(request_id="0", prompt_token_ids=tok("Q:")["input_ids"], params=SamplingParams())
    texts = [OutputProcessor(tok, set(), 64).partial_text(seq, ids[:n]) for n in range(1, len(ids) + 1)]
    assert texts == ["a", "a ", "a ", "a ", "a ", "a \U0001f37d", "a \U0001f37d ", "a \U0001f37d b"]


def test_a_stop_string_its_stopping_token_completes_does_not_cut_the_text(model):
    """vLLM leaves the stopping token's text out before it looks for stop strings: a stop string that only that
    token's text completes does not cut the text before it."""
    tok = LetterTokenizer()
    llm = LLM(model, tok, budget=None, page_size=4, num_pages=64)
    prompt = prompts_of((9,), seed=2)[0]
    free = llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
                        use_tqdm=False)[0].token_ids
    whole = tok.decode(free)
    at = next(i for i in range(2, len(free)) if free[i] not in free[:i])  # a token first seen at i
    stop = whole[at - 1 : at + 1]  # ends in that token's letter
    if whole.find(stop) != at - 1:
        pytest.skip("the stop string comes earlier in this output")
    out = llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop],
                                                stop_token_ids=[free[at]]), use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.token_ids == free[: at + 1] and out.text == whole[:at]
    assert_pool_clean(llm)


def test_two_engines_on_one_model_in_two_threads_take_turns_and_leave_the_model_as_it_was(model):
    """The engine's attention name is set on the shared config for the length of a forward: two engines on one
    model stepping from two threads used to save and restore each other's name (the model then kept the engine's
    for good, or a step's layers went unserved). Each gets the tokens it gets alone; the model's name comes back."""
    import sys
    import threading

    prompts = prompts_of([5 + (i * 7) % 40 for i in range(6)], seed=1)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    alone = [o.token_ids for o in LLM(model, budget=None, page_size=4, num_pages=256).generate(prompts, params,
                                                                                               use_tqdm=False)]
    engines = [LLM(model, budget=None, page_size=4, num_pages=256) for _ in range(2)]
    got, errors = {}, []

    def run(i):
        try:
            for _ in range(2):
                got[i] = [o.token_ids for o in engines[i].generate(prompts, params, use_tqdm=False)]
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(repr(e))

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # (threads switch often: the interleavings that broke it)
    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    finally:
        sys.setswitchinterval(switch)
    assert errors == [] and got == {0: alone, 1: alone}
    assert model.config._attn_implementation == "sdpa"
    assert model(torch.tensor([[5, 6, 7]])).logits.shape[1] == 3  # the model's own forward works


def test_a_zipage_generate_while_an_engine_on_its_config_steps_is_refused_and_leaves_nothing_behind(monkeypatch):
    """A zipage generate() in one thread on a model that shares its config object with a model an engine is
    stepping in another (the engine's attention name on the config, mid-forward): the generate() is refused,
    saying why, before arming anything. Had it armed its capture on the engine's name and the engine's forward
    then ended (here forced: the generate() waits right after arming), the engine would put the model's name back
    under it and the capture's release would then set the engine's name for good. The engine's step ends as it
    would alone, and the config has the model's own name back, so both models' own forwards and a later zipage
    generate() work."""
    import threading

    from transformers import Qwen3ForCausalLM

    import zipage.capture as capture

    a = tiny_model("qwen3")
    b = Qwen3ForCausalLM(a.config).eval()  # (another model, the same config object)
    assert b.config is a.config
    prompt = [5, 6, 7, 8, 9]
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    alone = LLM(a, budget=None, page_size=4, num_pages=64).generate([prompt], params, use_tqdm=False)[0].token_ids
    llm = LLM(a, budget=None, page_size=4, num_pages=64)
    in_forward, tried, engine_done = threading.Event(), threading.Event(), threading.Event()
    stepping = []

    def pause(module, args):  # (the engine's first forward waits, mid-forward, for the generate() to arm)
        if threading.current_thread() in stepping and not in_forward.is_set():
            in_forward.set()
            assert tried.wait(30)

    real_arm = capture.arm

    def arm(*args):
        if threading.current_thread() in stepping or tried.is_set():
            return real_arm(*args)
        try:
            real_arm(*args)
        finally:
            tried.set()
        assert engine_done.wait(30)  # (armed: its attention looked up only after the engine's step ended)

    monkeypatch.setattr(capture, "arm", arm)
    hook = a.model.layers[0].register_forward_pre_hook(pause)
    got, errors = [], []

    def engine():
        stepping.append(threading.current_thread())
        try:
            got.append(llm.generate([prompt], params, use_tqdm=False)[0].token_ids)
        finally:
            engine_done.set()

    def other():
        assert in_forward.wait(30)
        try:
            b.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=3, do_sample=False, cache_implementation="zipage")
        except RuntimeError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=engine), threading.Thread(target=other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    hook.remove()
    assert len(errors) == 1 and "ZipageCache forward was run while a zipage engine" in errors[0], errors
    assert got == [alone]
    assert a.config._attn_implementation == "sdpa" and id(a.config) not in capture._armed
    ids = torch.tensor([[5, 6, 7, 8]])
    for m in (a, b):
        assert m(ids).logits.shape[1] == 4
    out = b.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="zipage")
    assert torch.equal(out, b.generate(ids, max_new_tokens=3, do_sample=False))


def test_a_capture_armed_just_before_an_engine_forward_leaves_the_engine_s_name_alone(monkeypatch):
    """A zipage generate() armed (its wrapper already looked up) just before an engine's forward on a model
    sharing its config begins, its capture released once that forward is under way: the release leaves the
    engine's name alone (it had put the model's name back mid-forward, so the engine's later layers ran plain
    attention and its step failed): the engine gets the tokens it gets alone, the generate() its own or, where
    its next layer armed during the engine's forward, the refusal; the model's name is back after."""
    import threading

    from transformers import Qwen3ForCausalLM

    import zipage.capture as capture

    a = tiny_model("qwen3")
    b = Qwen3ForCausalLM(a.config).eval()
    prompt = [5, 6, 7, 8, 9]
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    alone = LLM(a, budget=None, page_size=4, num_pages=64).generate([prompt], params, use_tqdm=False)[0].token_ids
    ids = torch.tensor([[5, 6, 7, 8]])
    plain = b.generate(ids, max_new_tokens=3, do_sample=False)
    llm = LLM(a, budget=None, page_size=4, num_pages=64)
    releasing, in_forward, released = threading.Event(), threading.Event(), threading.Event()
    real_release = capture._release

    def release(config, original):  # (the first release waits until the engine's forward is under way)
        if releasing.is_set():
            return real_release(config, original)
        releasing.set()
        assert in_forward.wait(30)
        real_release(config, original)
        released.set()

    monkeypatch.setattr(capture, "_release", release)

    def pause(module, args):
        if threading.current_thread().name == "engine" and not in_forward.is_set():
            in_forward.set()
            assert released.wait(30)

    hook = a.model.layers[0].register_forward_pre_hook(pause)
    got = {}

    def engine():
        assert releasing.wait(30)
        got["engine"] = llm.generate([prompt], params, use_tqdm=False)[0].token_ids

    def other():
        try:
            got["generate"] = b.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="zipage")
        except RuntimeError as e:  # (its next layer armed while the engine's forward ran: refused, saying so)
            got["generate"] = str(e)

    threads = [threading.Thread(target=engine, name="engine"), threading.Thread(target=other, name="generate")]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
            assert not t.is_alive()
    finally:
        hook.remove()
    assert got["engine"] == alone
    g = got["generate"]
    assert torch.equal(g, plain) if isinstance(g, torch.Tensor) else "zipage engine on the same model" in g
    assert a.config._attn_implementation == "sdpa" and id(a.config) not in capture._armed
    assert torch.equal(b.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="zipage"), plain)


def test_a_stream_left_early_cancels_its_request_and_a_closed_engine_refuses(model):
    llm = LLM(model, budget=None, page_size=4, num_pages=64)
    rid = llm.add_request([5, 6, 7, 8], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    for i, _ in enumerate(llm.stream(rid)):
        if i == 2:
            break  # the consumer leaves (a client gone)
    assert llm.output(rid).outputs[0].finish_reason == "cancelled" and not llm.has_unfinished()
    assert_pool_clean(llm)
    llm.close()
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(RuntimeError, match="closed"):
        llm.step()
    with LLM(model, budget=None, page_size=4, num_pages=64) as other:
        assert other.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)[0].token_ids
    with pytest.raises(RuntimeError, match="closed"):
        other.add_request([5, 6, 7])


def test_a_request_without_params_takes_the_model_s_generation_config(model):
    """vLLM's offline default: SamplingParams from the model's generation_config (get_default_sampling_params)."""
    from transformers import GenerationConfig

    llm = LLM(model, budget=None, page_size=4, num_pages=64)
    saved = model.generation_config
    model.generation_config = GenerationConfig(do_sample=True, temperature=0.6, top_k=1)
    try:
        p = llm.get_default_sampling_params()
        assert (p.temperature, p.top_k, p.top_p) == (0.6, 1, 1.0)
        prompt = prompts_of((9,), seed=2)[0]
        outs = [llm.generate([prompt], use_tqdm=False)[0].token_ids for _ in range(3)]  # top_k=1: greedy
        greedy = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0), use_tqdm=False)[0].token_ids
        assert outs[0] == outs[1] == outs[2] == greedy[:len(outs[0])]
    finally:
        model.generation_config = saved
    assert llm.get_default_sampling_params() == SamplingParams()


def test_finished_requests_never_taken_are_bounded(model, monkeypatch):
    """stream() consumers and aborted requests never forget theirs: requests held only the newest KEEP_FINISHED
    finished ones (every request ever run stayed before); running ones are never dropped."""
    import zipage.engine.llm as llm_mod

    monkeypatch.setattr(llm_mod, "KEEP_FINISHED", 3)
    llm = LLM(model, budget=None, page_size=4, num_pages=64)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    running = llm.add_request(prompts_of((6,), seed=9)[0], SamplingParams(max_tokens=60, ignore_eos=True))
    ids = []
    for i, prompt in enumerate(prompts_of([5] * 12, seed=3)):
        ids.append(llm.add_request(prompt, params))
        if i % 3 == 2:
            llm.abort_request(ids[-1])
        else:
            for _ in llm.stream(ids[-1]):
                pass
        assert len(llm.requests) <= 2 * 3 + 2
    assert running in llm.requests  # (still running: kept)
    assert llm.output(ids[-1]).finished and ids[0] not in llm.requests
    llm.abort_request(running)


def test_agenerate_from_many_event_loops_keeps_no_closed_loop(model):
    """A lock that waited holds its event loop, so the weak-keyed table kept every loop ever used."""
    import asyncio

    llm = LLM(model, budget=None, page_size=4, num_pages=64)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    prompts = prompts_of((5, 6), seed=4)

    async def both():
        return await asyncio.gather(*(llm.agenerate(p, params) for p in prompts))

    for _ in range(4):
        asyncio.run(both())
    assert len(llm._async_locks) <= 1


def test_scorers_of_per_request_budgets_are_bounded(model):
    llm = LLM(model, budget=32, page_size=4, buffer=4, num_pages=64)
    first = llm.runner.scorer_for(40)
    assert llm.runner.scorer_for(40) is first
    for b in range(41, 141):
        llm.runner.scorer_for(b)
    assert len(llm.runner._scorers) <= 64 and llm.runner.scorer_for(140).config.budget == 140


@pytest.mark.parametrize("when", ["between steps", "compressing alone", "compressing beside another"])
def test_cancel_is_reported_only_when_it_lands_later(model, when):
    """A cancelled request finishes inside ``cancel()`` and no step reports it: between steps, and while its
    asynchronous compression is in flight alone (``cancel()`` lands it: an ``agenerate`` cancelled then left
    the engine holding its pages until some other call stepped). One whose compression is in flight beside a
    running request's finishes when the step collects them, which reports it once, finish_reason "cancelled"
    (the server forgets such a request on that report)."""
    llm = LLM(model, page_size=4, num_pages=30, budget=16, buffer=4, window=4, async_compression=True,
              enforce_eager=True)
    p = prompts_of([10, 12], seed=4)
    if when == "compressing beside another":
        p[1] = p[1][:10]  # the same length: compressed in the same group
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    rid = llm.add_request(p[0], params)
    other = llm.add_request(p[1], params)
    seq = llm.requests[rid]
    while not (seq.compressing if when != "between steps" else len(seq.output_ids) > 3):
        llm.step()
    assert llm.requests[other].compressing == (when == "compressing beside another")
    llm.cancel(rid)
    later = when == "compressing beside another"
    assert seq.finished != later
    if not later:
        assert llm.stats()["free_pages"] == 30 - len(llm.requests[other].pages)
    reported = []
    while llm.has_unfinished():
        reported += [o.outputs[0].finish_reason for o in llm.step() if o.request_id == rid]
    assert reported == (["cancelled"] if later else [])
    assert llm.output(rid).outputs[0].finish_reason == "cancelled"
    assert_pool_clean(llm)


@pytest.mark.parametrize("how", ["stop", "stream"])
def test_an_idle_engine_holds_no_token_flight(model, how):
    """With asynchronous scheduling a request stopped by a token has run one more step, whose tokens nobody
    reads; once every request of that flight has finished (a stop, a stream left early) the engine drops it
    rather than keeping the last batch's tensors and requests until a next step."""
    llm = LLM(model, budget=None, page_size=4, num_pages=40, async_scheduling=True)
    p = prompts_of([10], seed=3)[0]
    if how == "stop":
        first = llm.generate([p], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
        stop = first[0].outputs[0].token_ids[4]
        out = llm.generate([p], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[stop]), use_tqdm=False)
        assert out[0].outputs[0].finish_reason == "stop"
    else:
        rid = llm.add_request(p, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
        for i, _ in enumerate(llm.stream(rid)):
            if i == 3:
                break
    assert not llm.has_unfinished() and llm.core.inflight is None
    assert_pool_clean(llm)


@pytest.mark.parametrize("async_scheduling, fails", [(False, False), (True, False), (False, True)])
def test_a_cancel_made_inside_the_stepping_thread_waits_for_the_step(model, async_scheduling, fails):
    """A ``stream()`` generator or ``agenerate`` coroutine collected by the garbage collector during a step cancels
    its request from inside that step's thread (the engine's lock is re-entrant): the cancel waits for the step's
    end, as another thread's does (it freed the pages of a request the step had scheduled: IndexError), and lands
    when the step raises too (the other request goes on with the next step, as after any failed step)."""
    llm = LLM(model, budget=None, page_size=4, num_pages=64, async_scheduling=async_scheduling)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    a = llm.add_request([5, 6, 7, 8], params)
    b = llm.add_request([9, 10, 11], params)
    real, fired = llm.runner.forward, []

    def forward(*args, **kwargs):
        if not fired:
            fired.append(1)
            llm.cancel(b)  # (what the collector's run of the abandoned consumer's clean-up does)
            assert not llm.requests[b].finished
            if fails:
                raise RuntimeError("the step fails")
        return real(*args, **kwargs)

    llm.runner.forward = forward
    if fails:
        with pytest.raises(RuntimeError, match="the step fails"):
            llm.step()
        assert llm.requests[b].finish_reason == "cancelled" and not llm.core.to_cancel and not llm.requests[b].pages
    while llm.has_unfinished():
        llm.step()
    assert fired and llm.requests[b].finish_reason == "cancelled"
    ref = LLM(model, budget=None, page_size=4, num_pages=64).generate([[5, 6, 7, 8]], params, use_tqdm=False)
    assert llm.output(a).outputs[0].token_ids == ref[0].outputs[0].token_ids
    assert_pool_clean(llm)


def test_a_release_hook_that_raises_still_finishes_the_request(model):
    """A slot's release tells the other tensor-parallel ranks; when that raises (a rank gone), the request is
    finished all the same: its slot and pages back, its status FINISHED (it was left half-finished)."""
    llm = LLM(model, page_size=4, num_pages=64, budget=16, buffer=4, window=4, enforce_eager=True)
    rid = llm.add_request(list(range(3, 40)), SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                             budget=12))
    seq = llm.requests[rid]
    while not seq.compressions:
        llm.step()

    def gone(slot):
        raise RuntimeError("rank 1 exited")

    llm.scheduler.on_release = gone
    slots = len(llm.scheduler.free_slots)
    with pytest.raises(RuntimeError, match="rank 1 exited"):
        llm.abort_request(rid)
    assert seq.finished and seq.finish_reason == "cancelled" and seq.slot == -1 and not seq.pages
    assert len(llm.scheduler.free_slots) == slots + 1 and not llm.has_unfinished()
    assert_pool_clean(llm)


def test_prefix_cache_hits_count_pages_a_request_was_served_once(model):
    """A request whose cached prefix is matched while the pool is full waits (its matched pages go back): the
    pages count as hits once, when it is admitted, not once for every step it waited."""
    prompt = list(range(3, 23))  # 5 pages of 4 tokens, 4 of them reusable (the last token is computed again)
    llm = LLM(model, budget=None, page_size=4, num_pages=8, async_scheduling=False)
    greedy = dict(temperature=0, ignore_eos=True)
    llm.add_request(prompt, SamplingParams(max_tokens=12, **greedy), request_id="a")
    while llm.blocks.num_free > 0:
        llm.step()
    llm.add_request(prompt, SamplingParams(max_tokens=4, **greedy), request_id="b")
    waited = 0
    while llm.scheduler.waiting:
        llm.step()
        waited += 1
    assert waited > 1 and llm.stats()["prefix_cache_hits"] == 4
    while llm.has_unfinished():
        llm.step()
    assert llm.stats()["prefix_cache_hits"] == 4
    assert_pool_clean(llm)


def test_add_requests_queues_all_or_none():
    """``LLM.add_requests``: every prompt checked before any is queued (a bad one names its index and leaves the
    engine as it was); ids given once each; the outputs as ``add_request`` one by one gives them."""
    model = tiny_model("llama")
    greedy = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    llm = LLM(model, budget=None, page_size=8, num_pages=64)
    with pytest.raises(ValueError, match=r"^prompt 1: .*token ids"):
        llm.add_requests([[5, 6, 7], [5, 10 ** 9], [8, 9]], greedy)
    assert not llm.requests and not llm.has_unfinished()
    with pytest.raises(ValueError, match=r"request ids given more than once: \['a'\]"):
        llm.add_requests([[5], [6], [7]], greedy, request_ids=["a", None, "a"])
    with pytest.raises(ValueError, match="3 prompts, 2 SamplingParams and 3 request ids"):
        llm.add_requests([[5], [6], [7]], [greedy, greedy])
    with pytest.raises(ValueError) as one:  # (one prompt: the message as add_request's, no index)
        llm.add_requests([[10 ** 9]], greedy)
    assert str(one.value).startswith("prompt token ids must lie in")
    assert not llm.requests
    rids = llm.add_requests([[5, 6, 7], [8, 9], [10]], [greedy, None, greedy], request_ids=[None, "b", None])
    assert rids[1] == "b" and len(set(rids)) == 3 and list(llm.requests) == rids
    fresh = LLM(model, budget=None, page_size=8, num_pages=64)  # (an automatic id never takes a later given one)
    assert fresh.add_requests([[5], [6], [7]], greedy, request_ids=[None, "0", "1"])[1:] == ["0", "1"]
    assert len(fresh.requests) == 3
    got = {}
    while llm.has_unfinished():
        for out in llm.step():
            if out.finished:
                got[out.request_id] = list(out.outputs[0].token_ids)
    one = LLM(model, budget=None, page_size=8, num_pages=64)
    for prompt, rid in zip([[5, 6, 7], [10]], [rids[0], rids[2]]):
        assert one.generate([prompt], greedy, use_tqdm=False)[0].outputs[0].token_ids == got[rid]
