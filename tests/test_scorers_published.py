"""KeyDiff, R-KV and Expected Attention against dense loop references of their papers' formulas,
their knobs' checks, and each one end to end through generate() and the engine.

The references use Python loops and Python floats (double precision) from the formulas in the
scorers' docstrings; only the window attention and pooling come from ``loop_reference`` (which is
itself independent of the library)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import tiny_model
from loop_reference import dot, ref_pool, ref_window_scores, softmax

import zipage
from zipage import LLM, SamplingParams, ScoreInputs, ZipageConfig, get_scorer

NEW = ["keydiff", "rkv", "expected_attention"]


def inputs(seed, B=3, Hq=4, Hkv=2, S=14, D=6, w=4, padding=True):
    torch.manual_seed(seed)
    rng = random.Random(seed)
    keys = torch.randn(B, Hkv, S, D)
    for b in range(B):  # near-duplicates, several per token, so R-KV's retain rule has work to do
        for h in range(Hkv):
            for t in range(1, S):
                if rng.random() < 0.5:
                    keys[b, h, t] = keys[b, h, rng.randint(0, t - 1)] + 0.3 * torch.randn(D)
    keys = keys * (torch.rand(B, Hkv, S, 1) + 0.5) + 0.3  # a common offset: the mean key is not ~0
    key_mask = torch.ones(B, S, dtype=torch.bool)
    if padding:
        for b in range(1, B):
            key_mask[b, : rng.randint(1, 3)] = False
    return ScoreInputs(keys=keys, values=torch.randn(B, Hkv, S, D), queries=torch.randn(B, Hq, w, D) + 0.5,
                       key_mask=key_mask, query_mask=key_mask[:, S - w:], scaling=D**-0.5, page_size=4)


def unit(v):
    n = math.sqrt(math.fsum(x * x for x in v))
    return [x / n for x in v]


def ref_keydiff(x):
    B, H, S, _ = x.keys.shape
    out = torch.zeros(B, H, S, dtype=torch.float64)
    for b in range(B):
        valid = [j for j in range(S) if x.key_mask[b, j]]
        for h in range(H):
            u = {j: unit(x.keys[b, h, j].double().tolist()) for j in range(S)}
            anchor = unit([math.fsum(u[j][d] for j in valid) / len(valid) for d in range(len(u[0]))])
            for j in range(S):
                out[b, h, j] = -dot(u[j], anchor)
    return out


def ref_rkv_redundancy(x, threshold, retain):
    B, H, S, _ = x.keys.shape
    out = torch.zeros(B, H, S, dtype=torch.float64)
    several = 0
    for b in range(B):
        valid = [j for j in range(S) if x.key_mask[b, j]]
        for h in range(H):
            u = {j: unit(x.keys[b, h, j].double().tolist()) for j in valid}
            r = {}
            for i in valid:
                sims = {j: dot(u[i], u[j]) for j in valid if j != i}
                near = sorted((j for j in sims if sims[j] > threshold), reverse=True)
                several += len(near) > retain
                kept = set(near[:retain])  # the `retain` most recent near-duplicates do not count
                r[i] = math.fsum(s for j, s in sims.items() if j not in kept) / len(valid)
            p = softmax(r)
            for i in valid:
                out[b, h, i] = p[i]
    return out, several


def ref_expected_attention(x, covariance, value_norm, epsilon, group_reduce):
    B, Hq, w, D = x.queries.shape
    Hkv, S = x.keys.shape[1], x.keys.shape[2]
    G = Hq // Hkv
    out = torch.zeros(B, Hkv, S, dtype=torch.float64)
    for b in range(B):
        valid = [j for j in range(S) if x.key_mask[b, j]]
        qs = [i for i in range(w) if x.query_mask[b, i]]
        for h in range(Hkv):
            per_head = []
            for g in range(G):
                Q = [x.queries[b, h * G + g, i].double().tolist() for i in qs]
                mu = [math.fsum(q[d] for q in Q) / len(Q) for d in range(D)]
                cov = [[math.fsum((q[d] - mu[d]) * (q[e] - mu[e]) for q in Q) / len(Q) for e in range(D)] for d in range(D)]
                logit = {}
                for j in valid:
                    k = x.keys[b, h, j].double().tolist()
                    logit[j] = x.scaling * dot(mu, k)
                    if covariance:
                        logit[j] += 0.5 * x.scaling**2 * math.fsum(k[d] * cov[d][e] * k[e] for d in range(D) for e in range(D))
                p = softmax(logit)
                row = []
                for j in range(S):
                    a = p.get(j, 0.0) + epsilon
                    if value_norm:
                        a *= math.sqrt(math.fsum(v * v for v in x.values[b, h, j].double().tolist()))
                    row.append(a)
                per_head.append(row)
            for j in range(S):
                col = [r[j] for r in per_head]
                out[b, h, j] = max(col) if group_reduce == "max" else math.fsum(col) / G
    return out


def scores_of(name, x, **fields):
    scores, state = get_scorer(name, ZipageConfig(budget=64, page_size=4, **fields))(x)
    assert state is None and scores.shape == x.keys.shape[:3]
    return scores.double()


@pytest.mark.parametrize("seed, padding", [(0, True), (1, False)])
def test_keydiff_matches_dense_reference(seed, padding):
    x = inputs(seed, padding=padding)
    real = x.key_mask[:, None, :].expand(x.keys.shape[:3])
    torch.testing.assert_close(scores_of("keydiff", x)[real], ref_keydiff(x)[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("retain, threshold, lam, pooling", [(1, 0.5, 0.1, "max"), (2, 0.3, 0.4, "none"), (0, 0.5, 0.1, "avg")])
def test_rkv_matches_dense_reference(retain, threshold, lam, pooling):
    x = inputs(2)
    extra = {"rkv_retain": retain, "rkv_threshold": threshold, "rkv_lambda": lam}
    got = scores_of("rkv", x, pooling=pooling, pooling_kernel=3, extra=extra)
    imp = ref_window_scores(x.queries, x.keys, x.key_mask, x.query_mask, x.scaling, "mean", "mean")
    if pooling != "none":
        imp = ref_pool(imp, 3, pooling)
    red, several = ref_rkv_redundancy(x, threshold, retain)
    assert several > 5  # tokens with more near-duplicates than `retain`: the rule is exercised
    real = x.key_mask[:, None, :].expand(x.keys.shape[:3])
    torch.testing.assert_close(got[real], (lam * imp - (1 - lam) * red)[real], atol=1e-6, rtol=0)


@pytest.mark.parametrize("covariance, value_norm, epsilon, group_reduce",
                         [(True, True, 0.0, "mean"), (False, True, 0.0, "max"), (True, False, 0.05, "mean")])
def test_expected_attention_matches_dense_reference(covariance, value_norm, epsilon, group_reduce):
    x = inputs(3)
    extra = {"ea_covariance": covariance, "ea_value_norm": value_norm, "ea_epsilon": epsilon}
    got = scores_of("expected_attention", x, group_reduce=group_reduce, extra=extra)
    want = ref_expected_attention(x, covariance, value_norm, epsilon, group_reduce)
    real = x.key_mask[:, None, :].expand(x.keys.shape[:3])
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    assert get_scorer("expected_attention", ZipageConfig(extra=extra)).needs_values == value_norm


def test_rkv_retain_forgives_a_pair_but_not_a_triple():
    """Orthonormal keys, one repeated twice (tokens 1, 4) and one three times (2, 5, 7): with
    ``retain=1`` a pair looks as little redundant as a distinct key, a triple does not."""
    torch.manual_seed(0)
    keys = torch.linalg.qr(torch.randn(8, 8))[0].T.clone()[None, None]  # 8 orthonormal keys
    keys[0, 0, 4] = keys[0, 0, 1]
    keys[0, 0, 5] = keys[0, 0, 7] = keys[0, 0, 2]
    x = ScoreInputs(keys=keys, values=None, queries=torch.zeros(1, 1, 2, 8), key_mask=torch.ones(1, 8, dtype=torch.bool),
                    query_mask=torch.ones(1, 2, dtype=torch.bool), scaling=1.0, page_size=4)
    s = -scores_of("rkv", x, window=2, pooling="none", extra={"rkv_lambda": 0.0})[0, 0]  # = the redundancy
    torch.testing.assert_close(s[[1, 4]], s[[0, 0]], atol=1e-7, rtol=0)
    assert (s[[2, 5, 7]] > s[0] * 1.05).all()
    s0 = -scores_of("rkv", x, window=2, pooling="none", extra={"rkv_lambda": 0.0, "rkv_retain": 0})[0, 0]
    assert s0[1] > s0[0] * 1.05  # without the rule the pair is penalised too


@pytest.mark.parametrize("extra, error", [
    ({"rkv_lambda": 1.5}, ValueError), ({"rkv_retain": -1}, ValueError), ({"rkv_retain": 1.5}, TypeError),
    ({"ea_covariance": "yes"}, TypeError), ({"ea_epsilon": -0.1}, ValueError),
])
def test_bad_knobs_are_refused_when_the_scorer_is_built(extra, error):
    key = next(iter(extra))
    name = "rkv" if key.startswith("rkv") else "expected_attention"
    with pytest.raises(error, match=key):
        get_scorer(name, ZipageConfig(extra=extra))
    model = tiny_model("llama")
    with pytest.raises(error, match=key):
        zipage.ZipageCache(config=model.config, budget=16, page_size=4, scorer=name, extra=extra)


def test_settings_a_scorer_does_not_read_are_refused():
    """A misspelled knob (``rkv_lamda``) or one of another scorer's left the default in force unseen."""
    for name, extra in (("rkv", {"rkv_lamda": 0.9}), ("zipage", {"rkv_lambda": 0.5}),
                        ("expected_attention", {"ea_covariance": True, "rkv_retain": 1})):
        bad = next(k for k in extra if k not in get_scorer(name, ZipageConfig()).knobs)
        with pytest.raises(ValueError, match=f"does not read \\['{bad}'\\]"):
            get_scorer(name, ZipageConfig(extra=extra))
    with pytest.raises(ValueError, match="rkv_lamda"):
        zipage.ZipageCache(config=tiny_model("llama").config, budget=16, page_size=4, scorer="rkv",
                           extra={"rkv_lamda": 0.9})
    assert get_scorer("rkv", ZipageConfig(extra={"rkv_lambda": 0.9})).lam == 0.9


@pytest.mark.parametrize("scorer", NEW)
def test_engine_matches_generate(scorer):
    """The engine (all layers of a batch of requests scored at once) and generate() keep the same tokens."""
    model = tiny_model("qwen3")
    cfg = {"budget": 16, "page_size": 4, "buffer": 4, "scorer": scorer}
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (12, 30, 7)]
    llm = LLM(model, num_pages=128, **cfg)
    outs = llm.generate(prompts, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, pad_token_id=0,
                             eos_token_id=None, cache_implementation="zipage", cache_config=cfg)
        assert out.token_ids == ref[0, len(prompt):].tolist()
    assert llm.stats()["compressions"] >= 3 * 6
