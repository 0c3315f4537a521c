"""The batched sampler against a plain per-row reference, and its draws against the distribution."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from zipage import SamplingParams
from zipage.engine.sampler import LogitEdits, Penalties, sample


def reference_row(logits, p: SamplingParams, gen, suppress=(), prompt=(), output=()):
    """One row, spelled out: masks, penalties, greedy or temperature / min_p / top_k / top_p, then
    the inverse of the cumulative distribution at a uniform number from the row's own generator."""
    x = logits.float().clone()
    V = x.shape[0]
    if p.allowed_token_ids:
        x[[t for t in range(V) if t not in p.allowed_token_ids]] = -math.inf
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    for t in suppress:
        x[t] = -math.inf
    counts = Counter(output)
    seen = set(prompt) | set(output)
    for t in range(V):
        if t in seen:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
        x[t] -= p.frequency_penalty * counts[t] + p.presence_penalty * (counts[t] > 0)
    if p.greedy:
        return int(x.argmax())
    x = x / p.temperature
    if p.min_p > 0:
        probs = torch.softmax(x, dim=0)
        x[probs < p.min_p * probs.max()] = -math.inf
    if 0 < p.top_k < V:
        kth = torch.topk(x, p.top_k).values[-1]
        x[x < kth] = -math.inf
    if p.top_p < 1:
        ordered, order = torch.sort(x, descending=True)
        probs = torch.softmax(ordered, dim=0)
        x[order[probs.cumsum(0) - probs > p.top_p]] = -math.inf
    probs = torch.softmax(x, dim=0)
    r = torch.empty(1, device=gen.device if gen is not None else x.device).uniform_(generator=gen).to(x.device)
    cdf = probs.cumsum(0)
    u = (1.0 - r) * cdf[-1]
    return next(i for i in range(V) if cdf[i] >= u)


PARAMS = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0.7, seed=1),
    SamplingParams(temperature=1.3, top_k=5, seed=2),
    SamplingParams(temperature=0.9, top_p=0.8, seed=3),
    SamplingParams(temperature=1.0, min_p=0.1, seed=4),
    SamplingParams(temperature=0.8, top_k=12, top_p=0.9, min_p=0.05, seed=5),
    SamplingParams(temperature=0, repetition_penalty=1.5, presence_penalty=0.4, frequency_penalty=0.3),
    SamplingParams(temperature=1.1, repetition_penalty=0.8, frequency_penalty=-0.5, top_p=0.95, seed=6),
    SamplingParams(temperature=0.6, presence_penalty=1.5, seed=7),
    SamplingParams(temperature=0, logit_bias={4: 9.5, 11: -100, 3: 100}),  # (3: also suppressed on some rows)
    SamplingParams(temperature=0.9, top_p=0.9, seed=8, logit_bias={0: 2.5, 49: -3}, repetition_penalty=1.3),
    SamplingParams(temperature=0, allowed_token_ids=[2, 9, 31, 44]),
    SamplingParams(temperature=1.2, seed=9, allowed_token_ids=[3, 5, 6, 40, 41], logit_bias={5: 2.0, 7: 100}),
]

# every sampled row has a top_k: the sampler ranks only the best max(top_k) tokens
ALL_TOP_K = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0.9, top_k=4, seed=1),
    SamplingParams(temperature=1.2, top_k=20, top_p=0.7, seed=2),
    SamplingParams(temperature=0.7, top_k=9, min_p=0.1, repetition_penalty=1.2, seed=3),
    SamplingParams(temperature=1.0, top_k=3, seed=4, logit_bias={7: 4.0}),
]


@pytest.mark.parametrize("PARAMS", [PARAMS, ALL_TOP_K], ids=["mixed", "all-top-k"])
def test_batched_sampler_matches_the_per_row_reference(PARAMS):
    V = 50
    torch.manual_seed(0)
    prompts = [torch.randint(0, V, (7,)).tolist() for _ in PARAMS]
    outputs = [torch.randint(0, V, (i % 4 * 3,)).tolist() for i in range(len(PARAMS))]
    suppress = [[3, 7] if i % 3 == 0 else None for i in range(len(PARAMS))]
    penalized = [i for i, p in enumerate(PARAMS) if p.penalized]
    in_prompt = torch.zeros(len(penalized), V, dtype=torch.bool)
    counts = torch.zeros(len(penalized), V)
    for j, i in enumerate(penalized):
        in_prompt[j, prompts[i]] = True
        for t in outputs[i]:
            counts[j, t] += 1
    for step in range(20):
        logits = torch.randn(len(PARAMS), V) * 3
        gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in PARAMS]
        ref_gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in PARAMS]
        for g, r in zip(gens, ref_gens):  # several steps in: the generators have moved on
            for _ in range(step % 3):
                if g is not None:
                    torch.empty(1).uniform_(generator=g)
                    torch.empty(1).uniform_(generator=r)
        got = sample(logits, PARAMS, gens, suppress, Penalties(penalized, in_prompt, counts)).tokens.tolist()
        want = [reference_row(logits[i], p, ref_gens[i], suppress[i] or (),
                              prompts[i] if p.penalized else (), outputs[i] if p.penalized else ())
                for i, p in enumerate(PARAMS)]
        assert got == want, step
        assert all(t not in (suppress[i] or ()) for i, t in enumerate(got))


def test_seeded_rows_do_not_depend_on_the_batch():
    V = 40
    logits = torch.randn(6, V)
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=11)
    alone = sample(logits[2:3], [p], [torch.Generator().manual_seed(11)]).tokens.item()
    mixed = [SamplingParams(temperature=0.5)] * 6
    mixed[2] = p
    gens = [None] * 6
    gens[2] = torch.Generator().manual_seed(11)
    assert sample(logits, mixed, gens).tokens[2].item() == alone


@pytest.mark.parametrize("knobs", [dict(), dict(top_k=3), dict(top_p=0.7), dict(min_p=0.3)])
def test_draws_follow_the_filtered_distribution(knobs):
    torch.manual_seed(1)
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    keep = probs.clone()
    if "top_k" in knobs:
        keep[knobs["top_k"]:] = 0
    if "top_p" in knobs:
        keep[(probs.cumsum(0) - probs) > knobs["top_p"]] = 0
    if "min_p" in knobs:
        keep[probs < knobs["min_p"] * probs.max()] = 0
    keep /= keep.sum()
    n = 40_000
    params = [SamplingParams(temperature=1.0, **knobs)] * n
    tokens = sample(probs.log().expand(n, -1), params, [None] * n).tokens
    freq = torch.bincount(tokens, minlength=6).float() / n
    assert (freq[keep == 0] == 0).all()
    assert torch.allclose(freq, keep, atol=0.012), (freq, keep)


def test_logprobs_are_the_raw_distribution():
    logits = torch.randn(3, 20)
    params = [SamplingParams(temperature=0, logprobs=4, repetition_penalty=2.0),
              SamplingParams(temperature=0.5, seed=1), SamplingParams(temperature=0, logprobs=0)]
    out = sample(logits, params, [None, torch.Generator().manual_seed(1), None],
                 penalties=Penalties([0], torch.ones(1, 20, dtype=torch.bool), torch.zeros(1, 20)))
    lp = torch.log_softmax(logits, dim=-1)
    assert torch.allclose(out.logprobs, lp.gather(1, out.tokens[:, None])[:, 0])
    values, ids = lp.topk(4, dim=-1)
    assert torch.equal(out.top_ids, ids) and torch.allclose(out.top_logprobs, values)


def test_greedy_rows_are_the_exact_argmax_and_non_finite_rows_fall_back():
    logits = torch.randn(4, 30)
    logits[1, 4] = math.nan
    logits[2, 9] = math.inf
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7), SamplingParams(temperature=0.7, seed=1),
              SamplingParams(temperature=0)]
    tokens = sample(logits, params, [None, None, torch.Generator().manual_seed(1), None]).tokens.tolist()
    assert tokens[0] == int(logits[0].argmax()) and tokens[3] == int(logits[3].argmax())
    assert tokens[1] == 4 and tokens[2] == 9


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_an_all_greedy_batch_takes_the_argmax_of_its_logits_as_they_are(dtype):
    """No float32 copy of the logits when every row is greedy: the same tokens as the upcast's argmax (exact), ties
    and non-finite rows included; a suppressed id or log-probabilities still go the full way."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(5, 64, generator=g) * 4).to(dtype)
    logits[0, 7] = logits[0, 40] = logits[0].max() + 1  # a tie: the first index, both ways
    logits[1, 5] = math.nan
    logits[2, 11] = -math.inf
    params = [SamplingParams(temperature=0)] * 5
    got = sample(logits, params, [None] * 5)
    assert got.tokens.dtype == torch.int64 and got.logprobs is None
    assert got.tokens.tolist() == logits.float().argmax(-1).tolist() and got.tokens[0] == 7 and got.tokens[1] == 5
    want = int(logits[3].float().topk(2).indices[1])  # the best id suppressed: the runner-up
    suppressed = sample(logits, params, [None] * 5, [None, None, None, [int(logits[3].float().argmax())], None])
    assert suppressed.tokens[3] == want
    with_lp = sample(logits, [SamplingParams(temperature=0, logprobs=0)] * 5, [None] * 5)
    assert with_lp.tokens.tolist() == got.tokens.tolist() and with_lp.logprobs is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batched_sampler_matches_the_per_row_reference_on_cuda():
    V = 1000
    torch.manual_seed(0)
    logits = torch.randn(len(PARAMS), V, device="cuda") * 3
    prompts = [torch.randint(0, V, (7,)).tolist() for _ in PARAMS]
    penalized = [i for i, p in enumerate(PARAMS) if p.penalized]
    in_prompt = torch.zeros(len(penalized), V, dtype=torch.bool, device="cuda")
    for j, i in enumerate(penalized):
        in_prompt[j, prompts[i]] = True
    counts = torch.zeros(len(penalized), V, device="cuda")

    def gens():
        return [torch.Generator(device="cuda").manual_seed(p.seed) if p.seed is not None else None for p in PARAMS]

    got = sample(logits, PARAMS, gens(), None, Penalties(penalized, in_prompt, counts)).tokens.tolist()
    ref_gens = gens()
    for i, p in enumerate(PARAMS):
        if p.seed is None and not p.greedy:
            continue  # (unseeded rows draw from the global generator)
        want = reference_row(logits[i], p, ref_gens[i], (), prompts[i] if p.penalized else ())
        assert got[i] == want, (i, p)


def test_logit_bias_forces_bans_and_shifts_tokens():
    """A bias of 100 makes a token all but certain, -100 all but impossible; a greedy row's bias moves its
    argmax to the best biased logit; log-probabilities stay the model's own."""
    torch.manual_seed(1)
    logits = torch.randn(3, 40)
    best = int(logits[1].argmax())
    params = [SamplingParams(temperature=1.0, seed=0, logit_bias={17: 100}),
              SamplingParams(temperature=0, logit_bias={best: -100}, logprobs=1),
              SamplingParams(temperature=0, logit_bias={5: float(logits[2].max() - logits[2, 5]) + 0.5})]
    for step in range(20):
        gens = [torch.Generator().manual_seed(step), None, None]
        got = sample(logits, params, gens)
        assert got.tokens.tolist()[0] == 17
        assert got.tokens.tolist()[1] == int(logits[1].topk(2).indices[1])
        assert got.tokens.tolist()[2] == 5
    assert got.logprobs[1] == pytest.approx(float(torch.log_softmax(logits[1], -1)[got.tokens[1]]))
    made = [LogitEdits.of(p, logits.device) for p in params]  # (the engine's: made once per request)
    for step in range(5):
        gens, again = torch.Generator().manual_seed(step), torch.Generator().manual_seed(step)
        assert torch.equal(sample(logits, params, [gens, None, None], edits=made).tokens,
                           sample(logits, params, [again, None, None]).tokens)


@pytest.mark.parametrize("ids,error", [([], ValueError), ([-1], ValueError), ("12", TypeError), ([1.5], TypeError),
                                       ([True], TypeError)])
def test_bad_allowed_token_ids_are_refused_by_name(ids, error):
    with pytest.raises(error, match="SamplingParams.allowed_token_ids"):
        SamplingParams(allowed_token_ids=ids)


@pytest.mark.parametrize("bias,error", [({"3": 1.0}, TypeError), ({3: "x"}, TypeError), ([3], TypeError),
                                        ({-1: 1.0}, ValueError), ({3: 100.5}, ValueError),
                                        ({3: float("nan")}, ValueError), ({True: 1.0}, TypeError)])
def test_bad_logit_bias_is_refused_by_name(bias, error):
    with pytest.raises(error, match="SamplingParams.logit_bias"):
        SamplingParams(logit_bias=bias)
