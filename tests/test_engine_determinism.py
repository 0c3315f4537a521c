"""A request's tokens do not depend on what runs alongside it.

The engine compresses a sequence exactly where ``generate(cache_implementation="zipage")`` does,
whatever the prefill chunking, a preemption (recompute) or the prefix cache did to it:
- the first compression comes once the whole prompt is stored (never before its last prompt
  token went through the model, even when a chunk stops one token short of the prompt's end);
- a recomputed sequence is compressed at the same stored length as before its preemption;
- with prefix caching, the window queries the scorer reads are the request's own (the tokens
  they belong to are recomputed, not taken from the cache).
Exact tails (``exact_tail``) are the exception, by design: a chunk reads all of its own tokens exactly, so
where chunks begin (the chunking, a recompute, the prefix cache) changes which tokens a prompt's queries read
rounded (``test_exact_tail_engine.py``).
"""

from __future__ import annotations

import random

import pytest
import torch
from test_engine import assert_pool_clean

from zipage import LLM, SamplingParams

CFG = {"budget": 16, "page_size": 4, "buffer": 4, "window": 2}  # capacity 20


def rand_prompt(seed: int, n: int) -> list[int]:
    rnd = random.Random(seed)
    return [rnd.randrange(3, 96) for _ in range(n)]


def reference(model, prompt, max_tokens, cfg):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0,
                         eos_token_id=None, cache_implementation="zipage", cache_config=cfg)
    return out[0, len(prompt):].tolist()


def record_compressions(llm) -> list[tuple[str, int, int]]:
    """(request id, stored length, outputs on the host + pending) at every compression of ``llm``."""
    points = []
    original = llm.runner.compress

    def compress(seqs, dst, first):
        points.extend((s.request_id, s.stored, len(s.output_ids) + s.pending) for s in seqs)
        return original(seqs, dst, first)

    llm.runner.compress = compress
    return points


# ------------------------------------------------------------------------------ 1. chunk boundary
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_first_compression_does_not_move_with_the_prefill_chunk(llama, seed):
    """33-token prompt, capacity 20: generate() compresses once all 33 are stored. A chunk of 32
    (the 33rd token then goes through as a "decode") must not compress at 32."""
    prompt = rand_prompt(seed, 33)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    want = reference(llama, prompt, 8, CFG)
    for chunk in (64, 32, 31, 8):
        llm = LLM(llama, num_pages=64, max_num_batched_tokens=chunk, **CFG)
        points = record_compressions(llm)
        out = llm.generate([prompt], params, use_tqdm=False)[0].token_ids
        assert points[0][1] == 33, (chunk, points)
        assert out == want, chunk
        assert_pool_clean(llm)


def test_tokens_do_not_depend_on_a_neighbour_taking_pages(llama):
    """With 13 pages a 20-token neighbour leaves room for only 32 of the 33 prompt tokens at first."""
    rnd = random.Random(42)
    x = [rnd.randrange(3, 96) for _ in range(33)]
    y = [rnd.randrange(3, 96) for _ in range(20)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = LLM(llama, num_pages=13, enable_prefix_caching=False, **CFG)
    got_alone = alone.generate([x], params, use_tqdm=False)[0].token_ids
    together = LLM(llama, num_pages=13, enable_prefix_caching=False, **CFG)
    points = record_compressions(together)
    got_together = together.generate([y, x], [params, params], use_tqdm=False)[1].token_ids
    assert [stored for rid, stored, _ in points if rid == "1"][0] == 33, points
    assert got_together == got_alone == reference(llama, x, 12, CFG)
    assert_pool_clean(together)


def test_tokens_do_not_depend_on_neighbours_through_tied_scores():
    """knorm scores a repeated token's keys equal to the last bit: which of the tied tokens a compression keeps
    must not move with the requests decoding beside it (it did while the selection was topk's)."""
    from conftest import tiny_model

    model = tiny_model("mistral")
    p = [22, 29, 54, 83, 73, 3, 54, 68, 88, 90, 78, 93, 65, 62, 68, 75, 3, 51, 85, 33, 28, 34, 76]
    cfg = dict(budget=6, page_size=8, buffer=6, window=3, scorer="knorm")
    params = SamplingParams(max_tokens=23, temperature=0, ignore_eos=True)
    want = reference(model, p, 23, cfg)
    for batch in ([p], [p, [5], [5]]):
        llm = LLM(model, num_pages=64, max_num_seqs=3, enable_prefix_caching=False, **cfg)
        assert llm.generate(batch, params, use_tqdm=False)[0].token_ids == want, len(batch)
        assert llm.stats()["compressions"] > 0
        assert_pool_clean(llm)


# ------------------------------------------------------------------------------ 2. preemption
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_preempting_a_sequence_due_for_compression_keeps_its_tokens(llama, async_scheduling):
    """Preempted after its first token, right when its first compression (at 25) is due: the
    recompute must stop at 25, compress there, then go on, not prefill 26 tokens and compress at 26."""
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    for seed in (0, 1):
        prompt = rand_prompt(seed, 25)
        runs = []
        for preempt in (False, True):
            llm = LLM(llama, num_pages=64, async_scheduling=async_scheduling, enable_prefix_caching=False, **CFG)
            points = record_compressions(llm)
            rid = llm.add_request(prompt, params)
            llm.step()  # the prompt, its first token sampled
            if preempt:
                llm.scheduler.preempt(llm.requests[rid])
            while llm.has_unfinished():
                llm.step()
            runs.append((llm.output(rid).token_ids, [stored for _, stored, _ in points]))
            assert_pool_clean(llm)
        (plain, plain_points), (redone, redone_points) = runs
        assert redone_points == plain_points and plain_points[0] == 25
        assert redone == plain == reference(llama, prompt, 12, CFG)


def test_scheduler_preemptions_keep_tokens(llama):
    """A tight pool where the scheduler itself preempts sequences (admission sets aside each request's
    worst case, so here for the fresh pages of first compressions of shared prefixes), with chunked
    prefill, async compression and prefix caching: same tokens as a roomy engine that never preempts."""
    rnd = random.Random(12)
    budget = rnd.choice([None, 16])
    assert budget == 16
    shared = [rnd.randrange(3, 96) for _ in range(rnd.choice([0, 8, 13]))]
    prompts = [shared + [rnd.randrange(3, 96) for _ in range(rnd.randint(1, 20))] for _ in range(rnd.randint(2, 5))]
    params = [SamplingParams(max_tokens=rnd.randint(1, 30), temperature=0, ignore_eos=True) for _ in prompts]
    roomy = LLM(llama, num_pages=200, async_scheduling=False, enable_prefix_caching=False, **CFG)
    want = [o.token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    assert roomy.stats()["preemptions"] == 0
    for async_compression in (True, False):
        tight = LLM(llama, num_pages=15, enable_prefix_caching=True, max_num_seqs=4, max_num_batched_tokens=4,
                    async_compression=async_compression, async_scheduling=False, **CFG)
        got = [o.token_ids for o in tight.generate(prompts, params, use_tqdm=False)]
        assert tight.stats()["preemptions"] > 0
        assert got == want
        assert_pool_clean(tight)


# ------------------------------------------------------------------------------ 3. prefix caching
@pytest.mark.parametrize("scorer", ["zipage", "snapkv"])
def test_prefix_cache_hit_scores_with_its_own_window_queries(llama, scorer):
    """The same prompt again after another request used the only query slot: with the prefix cache
    it must give what it gives without (and what generate() gives)."""
    cfg = {**CFG, "window": 8, "scorer": scorer}
    prompt = rand_prompt(0, 33)  # 8 full pages + 1 token
    other = rand_prompt(1, 40)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    results = {}
    for caching in (False, True):
        llm = LLM(llama, num_pages=64, max_num_seqs=1, enable_prefix_caching=caching, **cfg)
        first = llm.generate([prompt], params, use_tqdm=False)[0].token_ids
        llm.generate([other], params, use_tqdm=False)
        again = llm.generate([prompt], params, use_tqdm=False)[0].token_ids
        assert first == again
        results[caching] = again
        if caching:
            assert llm.stats()["prefix_cache_hits"] > 0  # the prefix is still shared (all but the window)
        assert_pool_clean(llm)
    assert results[True] == results[False] == reference(llama, prompt, 12, cfg)


def test_prefix_reuse_leaves_the_window_to_compute(llama):
    """Scheduler level: a cached prompt is reused up to ``window`` tokens before its end (rounded
    down to a page), so every query the scorer reads comes from this request."""
    cfg = {**CFG, "window": 6}
    llm = LLM(llama, num_pages=64, max_num_seqs=1, **cfg)
    prompt = rand_prompt(3, 33)
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    llm.generate([prompt], params, use_tqdm=False)
    rid = llm.add_request(prompt, params)
    seq = llm.requests[rid]
    plan = llm.scheduler.schedule()
    (chunk_seq, n), = plan.prefill
    assert chunk_seq is seq and seq.num_computed == 24 and n == 9  # 33 - 6 = 27 -> 6 full pages reused
    assert len(prompt) - seq.num_computed >= cfg["window"]
    # without a scorer reading queries the prefix is reused up to the last token's page
    llm2 = LLM(llama, num_pages=64, max_num_seqs=1, **{**cfg, "scorer": "streaming"})
    llm2.generate([prompt], params, use_tqdm=False)
    llm2.add_request(prompt, params)
    llm2.scheduler.schedule()
    assert llm2.scheduler.running[0].num_computed == 32
