"""Scorers, ``select_keep`` and ``compress_layer`` against independent dense references.

The references (here and in ``loop_reference``) are written with Python loops and Python floats
(double precision) from what the docstrings and docs/method.md say; none of the library's kernels
is reused.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from loop_reference import ref_pool, ref_redundancy, ref_window_scores

import zipage
import zipage.scoring as scoring_module
from zipage import ScoreInputs, Scorer, ZipageConfig, get_scorer, list_scorers, register_scorer
from zipage.compress import LayerPages, compress_layer, select_keep

BUILTINS = ["zipage", "snapkv", "h2o", "streaming", "knorm", "random"]
ATOL = 1e-5


# ---------------------------------------------------------------------------------------- references


def ref_zipage(cfg: ZipageConfig, x: ScoreInputs):
    """-> (final score, state) in float64, from the scoring in docs/method.md (window attention,
    pooling, the decayed global score, redundancy; plus the non-paper knobs group_reduce,
    pooling_scope, value_weight and global_mode)."""
    attn = ref_window_scores(x.queries, x.keys, x.key_mask, x.query_mask, x.scaling, cfg.group_reduce, "mean")
    if (x.first or cfg.pooling_scope == "all") and cfg.pooling != "none":
        attn = ref_pool(attn, cfg.pooling_kernel, cfg.pooling)
    if cfg.value_weight:
        V = x.values.double().tolist()
        vn = torch.tensor([[[math.sqrt(math.fsum(v * v for v in tok)) for tok in head] for head in row] for row in V], dtype=torch.float64)
        attn = attn * vn
    if cfg.use_global and x.state is not None:
        prev = x.state.double().tolist()
        a = attn.tolist()
        op = max if cfg.global_mode == "max" else (lambda u, v: u + v)
        attn = torch.tensor(
            [[[op(a[b][h][j], cfg.global_decay * prev[b][h][j]) for j in range(len(a[b][h]))] for h in range(len(a[b]))] for b in range(len(a))],
            dtype=torch.float64,
        )
    if cfg.redundancy == "none":
        return ref_recent(attn, min(cfg.recent, cfg.budget // 2)), attn
    block = x.page_size if cfg.redundancy == "lightning" else None
    red, _ = ref_redundancy(x.keys, x.key_mask, block, cfg.similarity_threshold, cfg.redundancy_tau)
    lam = cfg.redundancy_lambda
    return ref_recent(lam * attn - (1 - lam) * red, min(cfg.recent, cfg.budget // 2)), attn


def ref_recent(scores, recent):
    """The last `recent` positions of each (row, head) move above all others, keeping their order."""
    out = scores.clone()
    S = scores.shape[-1]
    for b in range(scores.shape[0]):
        for h in range(scores.shape[1]):
            lift = 2 * max(abs(v) for v in scores[b, h].tolist()) + 1
            for j in range(max(S - recent, 0), S):
                out[b, h, j] += lift
    return out


def ref_snapkv(cfg, x):
    attn = ref_window_scores(x.queries, x.keys, x.key_mask, x.query_mask, x.scaling, "mean", "mean")
    return ref_pool(attn, cfg.pooling_kernel, "avg"), None


def ref_h2o(cfg, x):
    acc = ref_window_scores(x.queries, x.keys, x.key_mask, x.query_mask, x.scaling, "mean", "sum")
    if x.state is not None:
        acc = acc + x.state.double()
    return acc, acc


def ref_knorm(cfg, x):
    K = x.keys.double().tolist()
    return torch.tensor([[[-math.sqrt(math.fsum(v * v for v in tok)) for tok in head] for head in row] for row in K], dtype=torch.float64), None


def ref_streaming(cfg, x):
    """A score with the documented order: the first `sinks` real tokens above all, then by position."""
    B, H, S = x.keys.shape[:3]
    sinks = cfg.sinks or 4
    out = []
    for b in range(B):
        real = [j for j in range(S) if x.key_mask[b, j]]
        sink_set = set(real[:sinks])
        row = [10.0 * S + j if j in sink_set else float(j) for j in range(S)]
        out.append([row] * H)
    return torch.tensor(out, dtype=torch.float64), None


REFS = {"zipage": ref_zipage, "snapkv": ref_snapkv, "h2o": ref_h2o, "knorm": ref_knorm, "streaming": ref_streaming}


def ref_select(scores, key_mask, k, window, sinks):
    """Top-k per (row, head) by (class, score): protected real tokens > other real tokens > padding.
    Returns python lists; padding picks are returned as None (which padding is kept is unspecified)."""
    B, H, S = scores.shape
    sc = scores.double().tolist()
    km = key_mask.tolist()
    out = []
    for b in range(B):
        real = [j for j in range(S) if km[b][j]]
        protected = set(real[:sinks]) | {j for j in range(max(S - window, 0), S) if km[b][j]}
        rows = []
        for h in range(H):
            order = sorted(real, key=lambda j: (j in protected, sc[b][h][j]), reverse=True)
            chosen = sorted(order[:k])
            rows.append(chosen + [None] * (k - len(chosen)))
        out.append(rows)
    return out


def selection_margin(scores, key_mask, k, window, sinks):
    """Smallest gap between the last kept and the first evicted unprotected real score (tie guard)."""
    B, H, S = scores.shape
    sc = scores.double().tolist()
    km = key_mask.tolist()
    margin = math.inf
    for b in range(B):
        real = [j for j in range(S) if km[b][j]]
        protected = set(real[:sinks]) | {j for j in range(max(S - window, 0), S) if km[b][j]}
        for h in range(H):
            vals = sorted((sc[b][h][j] for j in real if j not in protected), reverse=True)
            slots = k - len(protected)
            if 0 < slots < len(vals):
                margin = min(margin, vals[slots - 1] - vals[slots])
    return margin


# ---------------------------------------------------------------------------------------- inputs


def make_inputs(seed, B, Hq, Hkv, S, D, w, page_size, *, state=False, first=True, padding=True):
    torch.manual_seed(seed)
    rng = random.Random(seed)
    keys = torch.randn(B, Hkv, S, D)
    for b in range(B):  # near-duplicate keys, so the redundancy term has something to find
        for h in range(Hkv):
            for t in range(1, S):
                if rng.random() < 0.4:
                    keys[b, h, t] = keys[b, h, rng.randint(max(0, t - 3), t - 1)] + 0.4 * torch.randn(D)
    keys = keys * (torch.rand(B, Hkv, S, 1) + 0.5)
    values = torch.randn(B, Hkv, S, D)
    queries = torch.randn(B, Hq, w, D) * 1.5
    key_mask = torch.ones(B, S, dtype=torch.bool)
    if padding:
        for b in range(1, B):
            key_mask[b, : rng.randint(1, 3)] = False  # left padding
    return ScoreInputs(
        keys=keys,
        values=values,
        queries=queries,
        key_mask=key_mask,
        query_mask=key_mask[:, S - w :],
        scaling=D**-0.5,
        page_size=page_size,
        state=torch.rand(B, Hkv, S) * 0.2 if state else None,
        first=first,
        layer_idx=0,
    )


SHAPES = [
    # B, Hq, Hkv, S, D, w, page_size
    (1, 8, 2, 13, 8, 4, 4),
    (3, 8, 2, 18, 8, 4, 4),
    (3, 2, 2, 11, 4, 3, 8),
]


# ---------------------------------------------------------------------------------------- registry


def test_builtin_scorers_registered():
    assert set(BUILTINS) <= set(list_scorers())
    assert list_scorers() == sorted(list_scorers())
    for name in BUILTINS:
        s = get_scorer(name)
        assert isinstance(s, Scorer) and s.name == name


def test_get_scorer_unknown_name_lists_known_ones():
    with pytest.raises(ValueError) as err:
        get_scorer("nope")
    msg = str(err.value)
    assert "nope" in msg
    for name in list_scorers():
        assert name in msg
    with pytest.raises(ValueError, match="nope"):  # a config holding the name is refused where it is resolved
        get_scorer(ZipageConfig(scorer="nope").scorer)


@pytest.fixture
def private_registry(monkeypatch):
    """Register test scorers in a copy of the registry, so they do not leak into other tests."""
    monkeypatch.setattr(scoring_module, "_REGISTRY", dict(scoring_module._REGISTRY))


def test_custom_scorer_by_name(private_registry):
    @register_scorer
    class FirstValueScorer(Scorer):
        name = "test-first-value"

        def score(self, x):
            return x.values[..., 0] * 2.0

    assert "test-first-value" in list_scorers()
    cfg = ZipageConfig(scorer="test-first-value", budget=8, page_size=4, window=2)
    s = get_scorer(cfg.scorer, cfg)
    assert isinstance(s, FirstValueScorer) and s.config is cfg
    x = make_inputs(1, 3, 4, 2, 10, 4, 2, 4)
    scores, state = s(x)
    assert state is None and scores.dtype == torch.float32
    torch.testing.assert_close(scores, x.values[..., 0] * 2.0)

    # end to end: compress_layer hands it the values (a custom scorer needs them by default)
    pages, slots, tables = _paged_layout(random.Random(1), x.keys, x.values, 4)
    keep = compress_layer(pages, slots, x.key_mask, None, s, k=6, window=2, sinks=0, scaling=x.scaling,
                          page_size=4, first=True, layer_idx=0)
    exp_keep = ref_select(x.values[..., 0].double(), x.key_mask, 6, 2, 0)
    assert keep.tolist() == exp_keep
    for b in range(3):
        for h in range(2):
            for j, src in enumerate(exp_keep[b][h]):
                assert torch.equal(pages.values[tables[b][j // 4], j % 4, h], x.values[b, h, src])

    with pytest.raises(ValueError):

        @register_scorer
        class Nameless(Scorer):
            pass


def test_scorer_with_wrong_shape_raises(private_registry):
    @register_scorer
    class BadScorer(Scorer):
        name = "test-bad-shape"

        def score(self, x):
            return x.keys[..., :-1, 0]  # one token short

    x = make_inputs(2, 1, 4, 2, 10, 4, 2, 4)
    with pytest.raises(ValueError, match="test-bad-shape"):
        get_scorer("test-bad-shape")(x)
    # and through compress_layer, before anything is written
    pages, slots, _ = _paged_layout(random.Random(0), x.keys, x.values, 4)
    snapshot = pages.keys.clone()
    with pytest.raises(ValueError):
        compress_layer(pages, slots, x.key_mask, x.queries, get_scorer("test-bad-shape"), k=6, window=2, sinks=0,
                       scaling=x.scaling, page_size=4, first=True, layer_idx=0)
    assert torch.equal(pages.keys, snapshot)


# ---------------------------------------------------------------------------------------- the zipage scorer


ZIPAGE_VARIANTS = [
    # config overrides, first, with state
    ({}, True, False),  # first compression: max-pool(5), no state
    ({}, False, True),  # later compression: no pooling, global max(s, 0.8 * prev)
    ({}, True, True),  # pooled, then global
    ({"use_global": False}, False, True),  # the state is ignored
    ({"use_global": False}, True, True),  # ... at the first compression too
    ({"redundancy": "none"}, True, False),
    ({"redundancy": "none"}, False, True),
    ({"redundancy": "full"}, True, False),
    ({"redundancy": "full"}, False, True),
    ({"redundancy_lambda": 0.5, "redundancy_tau": 0.1, "global_decay": 0.5}, False, True),
    ({"pooling": "none"}, True, False),
    ({"group_reduce": "mean"}, False, True),
    ({"pooling_scope": "all", "pooling": "avg"}, False, True),
    ({"value_weight": True}, True, True),
    ({"value_weight": True, "redundancy": "none"}, False, True),
    ({"global_mode": "sum", "redundancy": "none"}, False, True),
    ({"global_mode": "sum"}, True, True),
    ({"recent": 3}, False, True),
    ({"recent": 3, "redundancy": "none", "use_global": False}, True, False),
    ({"recent": 100, "redundancy": "none", "use_global": False}, False, True),  # capped at budget // 2
]


def test_default_zipage_is_window_attention_plus_recency_floor():
    """The default scorer: mean-group window attention, no redundancy, no global score, and the last
    `recent` tokens ranked first (so a top-k keeps them), in both directions of the check."""
    B, Hq, Hkv, S, D, w, ps = 2, 8, 2, 40, 8, 4, 4
    cfg = ZipageConfig(budget=16, page_size=ps, window=w, recent=6)
    x = make_inputs(11, B, Hq, Hkv, S, D, w, ps, state=True, first=False)
    scores, state = get_scorer("zipage", cfg)(x)
    raw = ref_window_scores(x.queries, x.keys, x.key_mask, x.query_mask, x.scaling, "mean", "mean")
    # no global score: no state comes back and none is kept (no state pool); the one passed in is ignored
    assert state is None and not get_scorer("zipage", cfg).stateful
    assert get_scorer("zipage", ZipageConfig.paper(budget=16)).stateful
    assert (scores[..., S - 6 :].amin(-1) > scores[..., : S - 6].amax(-1)).all()
    torch.testing.assert_close(scores[..., : S - 6].double(), raw[..., : S - 6], atol=ATOL, rtol=1e-5)
    keep = select_keep(scores, x.key_mask, 16, w, 0)
    for b in range(B):
        for h in range(Hkv):
            kept = set(keep[b, h].tolist())
            assert set(range(S - 6, S)) <= kept
            rest = sorted(range(S - 6), key=lambda j: -raw[b, h, j].item())[:10]
            assert set(rest) <= kept


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("overrides,first,with_state", ZIPAGE_VARIANTS)
def test_zipage_scorer_matches_dense_reference(shape, overrides, first, with_state):
    B, Hq, Hkv, S, D, w, ps = shape
    cfg = ZipageConfig.paper(budget=8, page_size=ps, window=w, **overrides)
    x = make_inputs(S * 7 + B, B, Hq, Hkv, S, D, w, ps, state=with_state, first=first)
    scores, state = get_scorer("zipage", cfg)(x)
    exp_scores, exp_state = ref_zipage(cfg, x)
    assert scores.shape == (B, Hkv, S) and scores.dtype == torch.float32
    torch.testing.assert_close(scores.double(), exp_scores, atol=ATOL, rtol=1e-5)
    if cfg.use_global:
        torch.testing.assert_close(state.double(), exp_state, atol=ATOL, rtol=1e-5)
    else:  # without the global score there is no state to keep
        assert state is None
    if cfg.redundancy != "none":
        assert not torch.allclose(scores.double(), cfg.redundancy_lambda * exp_state, atol=1e-4)
    if with_state and cfg.use_global and cfg.global_mode == "max" and not cfg.value_weight:
        # the inputs exercise both branches of the max
        raw = ref_window_scores(x.queries, x.keys, x.key_mask, x.query_mask, x.scaling, cfg.group_reduce, "mean")
        if (first or cfg.pooling_scope == "all") and cfg.pooling != "none":
            raw = ref_pool(raw, cfg.pooling_kernel, cfg.pooling)
        from_prev = cfg.global_decay * x.state.double() > raw
        assert from_prev.any() and (~from_prev).any()


def test_zipage_pooling_only_at_first_compression():
    cfg = ZipageConfig(budget=8, page_size=4, window=4, recent=0)
    x = make_inputs(5, 1, 4, 1, 12, 8, 4, 4)
    raw = ref_window_scores(x.queries, x.keys, x.key_mask, x.query_mask, x.scaling, cfg.group_reduce, "mean")
    first, _ = get_scorer("zipage", cfg)(x)
    x.first = False
    later, _ = get_scorer("zipage", cfg)(x)
    torch.testing.assert_close(first.double(), ref_pool(raw, 5, "max"), atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(later.double(), raw, atol=ATOL, rtol=1e-5)
    assert not torch.allclose(first, later)


# ---------------------------------------------------------------------------------------- other scorers


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("kernel", [3, 5])
def test_snapkv_matches_dense_reference(shape, first, kernel):
    B, Hq, Hkv, S, D, w, ps = shape
    cfg = ZipageConfig(budget=8, page_size=ps, window=w, scorer="snapkv", pooling_kernel=kernel)
    x = make_inputs(S + kernel, B, Hq, Hkv, S, D, w, ps, first=first)
    scores, state = get_scorer("snapkv", cfg)(x)
    exp, _ = ref_snapkv(cfg, x)
    assert state is None
    torch.testing.assert_close(scores.double(), exp, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_state", [False, True])
def test_h2o_matches_dense_reference(shape, with_state):
    B, Hq, Hkv, S, D, w, ps = shape
    cfg = ZipageConfig(budget=8, page_size=ps, window=w, scorer="h2o")
    x = make_inputs(S + 3, B, Hq, Hkv, S, D, w, ps, state=with_state, first=not with_state)
    scores, state = get_scorer("h2o", cfg)(x)
    exp, exp_state = ref_h2o(cfg, x)
    torch.testing.assert_close(scores.double(), exp, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(state.double(), exp_state, atol=ATOL, rtol=1e-5)
    # window sums: every valid query spreads a mass of 1 (over its group mean)
    nq = x.query_mask.sum(1).double()
    prev = x.state.double().sum(-1) if with_state else 0.0
    torch.testing.assert_close(scores.double().sum(-1), (nq[:, None] + prev).expand(B, Hkv), atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_knorm_matches_dense_reference(shape):
    B, Hq, Hkv, S, D, w, ps = shape
    x = make_inputs(S + 1, B, Hq, Hkv, S, D, w, ps)
    scores, state = get_scorer("knorm")(x)
    exp, _ = ref_knorm(None, x)
    assert state is None
    torch.testing.assert_close(scores.double(), exp, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("sinks", [0, 2])
def test_streaming_keeps_sinks_and_most_recent(sinks):
    cfg = ZipageConfig(budget=10, page_size=4, window=3, scorer="streaming", sinks=sinks)
    x = make_inputs(9, 3, 4, 2, 17, 4, 3, 4)
    x.key_mask[2, 5] = False  # a hole among the real tokens too
    scores, _ = get_scorer("streaming", cfg)(x)
    n_sinks = sinks or 4
    for b in range(3):
        real = [j for j in range(17) if x.key_mask[b, j]]
        sink_set, others = real[:n_sinks], real[n_sinks:]
        for h in range(2):
            s = scores[b, h].tolist()
            assert min(s[j] for j in sink_set) > max(s[j] for j in others)
            assert all(s[a] < s[c] for a, c in zip(others, others[1:]))  # grows with position
    # what it keeps: the sinks and then the most recent real tokens
    keep = select_keep(scores, x.key_mask, 10, 0, 0)
    for b in range(3):
        real = [j for j in range(17) if x.key_mask[b, j]]
        exp = sorted(real[:n_sinks] + real[n_sinks:][-(10 - n_sinks) :])
        for h in range(2):
            assert keep[b, h].tolist() == exp


def test_random_scorer_is_seeded():
    x = make_inputs(4, 3, 4, 2, 12, 4, 2, 4)
    a1, _ = get_scorer("random", ZipageConfig(seed=7))(x)
    b = get_scorer("random", ZipageConfig(seed=7))
    b1, _ = b(x)
    b2, _ = b(x)
    c1, _ = get_scorer("random", ZipageConfig(seed=8))(x)
    assert torch.equal(a1, b1)
    assert not torch.equal(b1, b2)  # the generator moves on
    assert not torch.equal(a1, c1)
    assert ((a1 >= 0) & (a1 < 1)).all() and a1.shape == (3, 2, 12)
    assert not torch.equal(a1[:, 0], a1[:, 1])  # heads are scored independently
    exp = torch.rand(3, 2, 12, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a1, exp)


@pytest.mark.parametrize("name", BUILTINS)
def test_every_builtin_returns_float32_scores(name):
    x = make_inputs(6, 3, 8, 2, 13, 4, 4, 4, state=True, first=False)
    scorer = get_scorer(name, ZipageConfig(budget=8, page_size=4, window=4))
    scores, state = scorer(x)
    assert scores.shape == (3, 2, 13) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    assert (state is not None) == scorer.stateful
    if name in REFS:
        exp, _ = REFS[name](scorer.config, x)
        if name == "streaming":  # order only
            assert torch.equal(scores.argsort(-1), exp.argsort(-1))
        else:
            torch.testing.assert_close(scores.double(), exp, atol=ATOL, rtol=1e-5)


# ---------------------------------------------------------------------------------------- select_keep


@pytest.mark.parametrize("B,H,S", [(1, 2, 12), (3, 2, 17), (3, 4, 9)])
@pytest.mark.parametrize("window,sinks", [(0, 0), (3, 0), (3, 2), (1, 1)])
@pytest.mark.parametrize("k_frac", [0.4, 0.7])
def test_select_keep_matches_reference(B, H, S, window, sinks, k_frac):
    torch.manual_seed(B * 100 + S + window * 7 + sinks)
    scores = torch.randn(B, H, S)
    key_mask = torch.ones(B, S, dtype=torch.bool)
    if B > 1:
        key_mask[1, :3] = False  # left padding
        key_mask[2, 4] = False  # a hole
        key_mask[2, 0] = False
    k = max(window + sinks, int(S * k_frac), 1)
    # padding scored highest: it must still go first
    scores = scores.masked_fill(~key_mask[:, None, :], 100.0)
    keep = select_keep(scores, key_mask, k, window, sinks)
    assert keep.shape == (B, H, k) and keep.dtype == torch.int64
    assert (keep[..., 1:] > keep[..., :-1]).all()  # ascending, no repeats
    exp = ref_select(scores, key_mask, k, window, sinks)
    assert keep.tolist() == exp


def test_select_keep_keeps_the_earlier_of_equal_scores():
    """Exact ties (a repeated token's key norm is equal to the last bit) go to the earlier tokens, whatever the
    other scores and however many rows and heads are selected together (topk's choice among ties moved with
    them, so a request's compression depended on the requests batched beside it)."""
    tie = torch.tensor([0.5, -1.0, 2.0, -1.0, -1.0, 3.0, -1.0, -1.0, 0.0, 1.0])
    scores = torch.stack([tie, tie.flip(0)])[None].expand(3, 2, 10).clone()
    scores[1:, :, 9] = 5.0  # other scores around the ties change, the tie-break must not
    key_mask = torch.ones(3, 10, dtype=torch.bool)
    keep = select_keep(scores, key_mask, 6, 0, 0)
    assert keep[0, 0].tolist() == [0, 1, 2, 5, 8, 9]  # 3.0, 2.0, 1.0, 0.5, 0.0 and the first of the -1.0s
    assert keep[0, 1].tolist() == [0, 1, 2, 4, 7, 9]  # (the flipped row: its first -1.0 is at 2)
    for b in (1, 2):
        assert keep[b, 0].tolist() == [0, 1, 2, 5, 8, 9]


def test_select_keep_protects_window_and_sinks_against_low_scores():
    S = 12
    scores = torch.linspace(1.0, 0.0, S).repeat(2, 3, 1)  # lower and lower towards the end
    key_mask = torch.ones(2, S, dtype=torch.bool)
    key_mask[1, :2] = False
    scores[:, :, 2:5] = -5.0  # the sinks of row 1 (its first real tokens) score lowest
    keep = select_keep(scores, key_mask, 7, window=3, sinks=2)
    assert keep[0, 0].tolist() == [0, 1, 5, 6, 9, 10, 11]
    assert keep[1, 0].tolist() == [2, 3, 5, 6, 9, 10, 11]
    assert (keep == keep[:, :1]).all()


def test_select_keep_keeps_padding_only_when_short_of_real_tokens():
    torch.manual_seed(0)
    S, k = 10, 7
    scores = torch.randn(2, 3, S)
    key_mask = torch.ones(2, S, dtype=torch.bool)
    key_mask[1, :5] = False  # row 1 has only 5 real tokens
    keep = select_keep(scores, key_mask, k, window=2, sinks=0)
    for h in range(3):
        kept = keep[1, h].tolist()
        assert set(range(5, 10)) <= set(kept)  # all real tokens
        assert sum(1 for j in kept if j < 5) == 2  # plus 2 padding tokens
    exp = ref_select(scores, key_mask, k, 2, 0)
    assert keep[0].tolist() == exp[0]
    with pytest.raises(ValueError):
        select_keep(scores, key_mask, 0, 2)
    with pytest.raises(ValueError):
        select_keep(scores, key_mask, S + 1, 2)


# ---------------------------------------------------------------------------------------- compress_layer


def _paged_layout(rng, keys, values, page_size, state=None, spare_pages=3):
    """Scatter dense [B, H, S, D] keys/values (and [B, H, S] state) into a pool through random,
    non-contiguous page tables. Returns (pages, slots, tables)."""
    B, H, S, D = keys.shape
    n = -(-S // page_size)
    num_pages = B * n + spare_pages
    perm = list(range(num_pages))
    rng.shuffle(perm)
    tables = [perm[b * n : (b + 1) * n] for b in range(B)]
    pk = torch.randn(num_pages, page_size, H, D)  # garbage everywhere else
    pv = torch.randn(num_pages, page_size, H, D)
    pst = torch.rand(num_pages, page_size, H) if state is not None else None
    slots = torch.empty(B, S, dtype=torch.int64)
    for b in range(B):
        for j in range(S):
            page, off = tables[b][j // page_size], j % page_size
            slots[b, j] = page * page_size + off
            pk[page, off] = keys[b, :, j]
            pv[page, off] = values[b, :, j]
            if pst is not None:
                pst[page, off] = state[b, :, j]
    return LayerPages(pk, pv, pst), slots, tables


COMPRESS_CASES = [
    # scorer, first, with_state, B, S, k, sinks
    ("zipage", True, False, 1, 13, 7, 0),
    ("zipage", True, True, 3, 18, 9, 1),  # a first compression has no history: the stored state is ignored
    ("zipage", False, True, 3, 18, 9, 0),
    ("zipage", False, True, 1, 13, 6, 2),
    ("snapkv", True, False, 3, 18, 9, 0),
    ("h2o", False, True, 3, 14, 8, 1),
    ("knorm", True, False, 3, 18, 9, 0),
    ("streaming", True, False, 3, 18, 10, 0),
]


@pytest.mark.parametrize("case", COMPRESS_CASES)
def test_compress_layer_against_dense_reference(case):
    name, first, with_state, B, S, k, sinks = case
    Hq, Hkv, D, w, ps = 8, 2, 8, 4, 4  # GQA 8 query heads over 2 KV heads, pages of 4
    assert S % ps  # partly filled last page
    seed = S * 31 + B * 7 + k + sinks + (13 if first else 0)
    x = make_inputs(seed, B, Hq, Hkv, S, D, w, ps, state=with_state, first=first)
    # zipage: the paper's settings (its redundancy term leaves no ties after max-pooling); the default
    # scorer's selection is checked in test_default_zipage_is_window_attention_plus_recency_floor
    make = ZipageConfig.paper if name == "zipage" else ZipageConfig
    cfg = make(budget=k, page_size=ps, window=w, sinks=sinks, scorer=name)
    scorer = get_scorer(name, cfg)
    rng = random.Random(seed)
    pages, slots, tables = _paged_layout(rng, x.keys, x.values, ps, state=x.state if with_state else None)
    before = LayerPages(pages.keys.clone(), pages.values.clone(), None if pages.state is None else pages.state.clone())

    # dense reference: score -> protect -> top-k -> gather
    ref_inputs = ScoreInputs(x.keys, x.values, x.queries, x.key_mask, x.query_mask, x.scaling, ps,
                             state=x.state if scorer.stateful and not first else None, first=first)
    exp_scores, exp_state = REFS[name](cfg, ref_inputs)
    if name != "streaming":
        assert selection_margin(exp_scores, x.key_mask, k, w, sinks) > 1e-5, "near-tie in the test inputs"
    exp_keep = ref_select(exp_scores, x.key_mask, k, w, sinks)
    assert all(j is not None for row in exp_keep for h in row for j in h)  # no padding kept here

    keep = compress_layer(pages, slots, x.key_mask, x.queries if scorer.needs_queries else None, scorer,
                          k=k, window=w, sinks=sinks, scaling=x.scaling, page_size=ps, first=first, layer_idx=0)
    assert keep.tolist() == exp_keep

    for b in range(B):
        for h in range(Hkv):
            for j, src in enumerate(exp_keep[b][h]):
                page, off = tables[b][j // ps], j % ps
                assert torch.equal(pages.keys[page, off, h], x.keys[b, h, src])
                assert torch.equal(pages.values[page, off, h], x.values[b, h, src])
                if with_state and exp_state is not None:
                    assert pages.state[page, off, h].item() == pytest.approx(exp_state[b, h, src].item(), abs=ATOL)
    # pages outside every table are untouched
    owned = {p for t in tables for p in t}
    spare = [p for p in range(pages.keys.shape[0]) if p not in owned]
    assert torch.equal(pages.keys[spare], before.keys[spare])
    assert torch.equal(pages.values[spare], before.values[spare])
    if pages.state is not None:
        assert torch.equal(pages.state[spare], before.state[spare])
        if exp_state is None:  # a stateless scorer leaves the state pool alone
            assert torch.equal(pages.state, before.state)


def test_compress_layer_keeps_padding_rows_consistent():
    """Row 1 is mostly padding: all its real tokens survive, padding fills the rest, K/V follow."""
    B, Hq, Hkv, S, D, w, ps, k = 2, 8, 2, 13, 8, 4, 4, 8
    x = make_inputs(21, B, Hq, Hkv, S, D, w, ps, padding=False)
    x.key_mask[1, :7] = False  # 6 real tokens < k
    x.query_mask = x.key_mask[:, S - w :]
    cfg = ZipageConfig.paper(budget=k, page_size=ps, window=w)  # no ties after pooling (see above)
    pages, slots, tables = _paged_layout(random.Random(3), x.keys, x.values, ps)
    keep = compress_layer(pages, slots, x.key_mask, x.queries, get_scorer("zipage", cfg), k=k, window=w, sinks=0,
                          scaling=x.scaling, page_size=ps, first=True, layer_idx=0)
    for h in range(Hkv):
        kept = keep[1, h].tolist()
        assert set(range(7, 13)) <= set(kept) and len(kept) == k
        for j, src in enumerate(kept):
            page, off = tables[1][j // ps], j % ps
            assert torch.equal(pages.keys[page, off, h], x.keys[1, h, src])
    exp_scores, _ = ref_zipage(cfg, ScoreInputs(x.keys, x.values, x.queries, x.key_mask, x.query_mask, x.scaling, ps))
    assert keep[0].tolist() == ref_select(exp_scores, x.key_mask, k, w, 0)[0]


def test_zipage_module_exports():
    assert zipage.get_scorer is get_scorer and zipage.ScoreInputs is ScoreInputs


def test_select_keep_non_finite_scores_never_beat_protection_or_lose_to_padding():
    S, k, window, sinks = 12, 6, 2, 1
    key_mask = torch.ones(1, S, dtype=torch.bool)
    key_mask[0, 1:3] = False  # two padding tokens after the first real one
    for bad in (float("nan"), float("inf"), float("-inf")):
        scores = torch.zeros(1, 1, S)
        scores[0, 0, 3:8] = bad  # five real tokens with a non-finite score
        keep = select_keep(scores, key_mask, k, window, sinks)[0, 0].tolist()
        assert 0 in keep and S - 2 in keep and S - 1 in keep, (bad, keep)  # sinks and window
        assert 1 not in keep and 2 not in keep, (bad, keep)  # padding goes before any real token
        assert len(keep) == k


def test_scorer_object_without_config_follows_the_cache_config():
    from zipage.scoring.zipage import ZipageScorer

    cfg = zipage.ZipageConfig.paper(budget=64, page_size=8)
    plain = ZipageScorer()
    bound = get_scorer(plain, cfg)
    assert bound.config is cfg and bound.stateful  # the paper's global score is on
    assert plain.config is not cfg  # the object given is left as it is
    own = ZipageScorer(zipage.ZipageConfig(budget=32, page_size=8))
    assert get_scorer(own, cfg) is own  # built with its own config: kept
    model_cfg = zipage.ZipageConfig.paper(budget=64, page_size=8, scorer=ZipageScorer())
    from conftest import tiny_model

    cache_scorer = zipage.ZipageCache(config=tiny_model("llama").config, zipage_config=model_cfg).scorer
    assert cache_scorer.config is model_cfg and cache_scorer.stateful


def test_a_scorer_setting_the_scorer_does_not_read_is_refused():
    """ZipageConfig's scorer settings are read by some scorers only: one set away from its default for a scorer
    that ignores it is refused by name when the scorer is built (it ran as if unset); the settings a scorer
    reads, defaults, and scorers that declare nothing pass."""
    from zipage.config import SCORER_FIELDS

    for name in list_scorers():
        reads = type(get_scorer(name, ZipageConfig())).config_fields
        assert reads is not None and set(reads) <= set(SCORER_FIELDS), name
    with pytest.raises(ValueError, match=r"use_global=True: the snapkv scorer does not read"):
        get_scorer("snapkv", ZipageConfig(scorer="snapkv", use_global=True))
    with pytest.raises(ValueError, match=r"pooling='none', recent=0: the h2o scorer"):
        get_scorer("h2o", ZipageConfig(pooling="none", recent=0))
    with pytest.raises(ValueError, match=r"seed=3: the zipage scorer .*SamplingParams\(seed="):
        get_scorer("zipage", ZipageConfig(seed=3))  # (LLM(seed=3) is not vLLM's sampling seed here)
    get_scorer("random", ZipageConfig(seed=3))
    get_scorer("snapkv", ZipageConfig(pooling_kernel=7))
    get_scorer("zipage", ZipageConfig.paper(recent=0, value_weight=True))

    class Mine(Scorer):  # (a scorer of one's own that says nothing is not checked)
        def score(self, x):
            return x.keys.float().norm(dim=-1)

    get_scorer(Mine, ZipageConfig(use_global=True))

    class Declared(Mine):
        config_fields = ("pooling_kernel",)

    with pytest.raises(ValueError, match="use_global"):
        get_scorer(Declared, ZipageConfig(use_global=True))

    class Derived(type(get_scorer("snapkv", ZipageConfig()))):  # (reads more than its parent: not checked)
        pass

    get_scorer(Derived, ZipageConfig(group_reduce="max"))
    # where the cache and the engine build their scorer
    from conftest import tiny_model

    model = tiny_model("llama")
    with pytest.raises(ValueError, match="window_reduce='max': the knorm scorer"):
        zipage.LLM(model, budget=16, page_size=4, scorer="knorm", window_reduce="max")
    with pytest.raises(ValueError, match="use_global=True: the keydiff scorer"):
        zipage.ZipageCache(config=model.config, zipage_config=ZipageConfig(budget=16, page_size=4, scorer="keydiff",
                                                                           use_global=True))
