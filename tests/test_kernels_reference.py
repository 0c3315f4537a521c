"""The plain-PyTorch reference ops of ``zipage.kernels`` against independent dense references.

Every reference (here and in ``loop_reference``) is written the most obvious way: Python loops
over rows, heads, queries and tokens, with Python floats (double precision), and none of the
library's functions.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from loop_reference import dot, ref_pool, ref_redundancy, ref_window_scores, softmax

from zipage.kernels import (
    compact_reference,
    gather_kv_reference,
    pool_scores_reference,
    redundancy_scores_reference,
    slot_indices,
    store_kv_reference,
    window_scores_reference,
)

ATOL = 1e-5


def make_page_tables(B, n_pages_per_row, num_pages, rng):
    """Disjoint, random, non-contiguous page tables; the remaining pages belong to nobody."""
    perm = list(range(num_pages))
    rng.shuffle(perm)
    assert B * n_pages_per_row <= num_pages
    return [perm[b * n_pages_per_row : (b + 1) * n_pages_per_row] for b in range(B)], perm[B * n_pages_per_row :]


def pool_to_dict(cache):
    """{(page, offset): nested list of the token's [H, ...] content} from a pool tensor."""
    data = cache.double().tolist()
    return {(p, o): data[p][o] for p in range(cache.shape[0]) for o in range(cache.shape[1])}


def assert_pool_equals_dict(cache, model, atol=0.0):
    got = pool_to_dict(cache)
    assert got.keys() == model.keys()
    for key in model:
        exp = torch.tensor(model[key], dtype=torch.float64)
        act = torch.tensor(got[key], dtype=torch.float64)
        assert torch.allclose(act, exp, atol=atol, rtol=0), f"slot {key}: {act} != {exp}"


# ---------------------------------------------------------------------------------------- window scores


def _window_inputs(seed, B, Hq, Hkv, w, S, D, all_queries_padded=False):
    torch.manual_seed(seed)
    rng = random.Random(seed)
    queries = torch.randn(B, Hq, w, D) * 1.5
    keys = torch.randn(B, Hkv, S, D) * 1.5
    key_mask = torch.ones(B, S, dtype=torch.bool)
    for b in range(1, B):  # row 0 stays unpadded; others: left padding plus scattered holes
        left = rng.randint(1, max(1, S - w - 1))
        key_mask[b, :left] = False
        for j in range(left, S):
            if rng.random() < 0.2:
                key_mask[b, j] = False
    query_mask = key_mask[:, S - w :].clone()
    if B > 1:
        # a valid key whose query is padding (possible when queries come from elsewhere)
        query_mask[1, 0] = False
    if all_queries_padded:
        query_mask[-1] = False
    return queries, keys, key_mask, query_mask


WINDOW_SHAPES = [
    # B, Hq, Hkv, w, S, D
    (1, 4, 1, 4, 9, 8),
    (3, 8, 2, 4, 13, 8),
    (3, 2, 2, 3, 7, 4),
    (1, 3, 3, 5, 5, 8),  # window == whole context
    (3, 4, 1, 1, 6, 4),  # a single window query
]


@pytest.mark.parametrize("shape", WINDOW_SHAPES)
@pytest.mark.parametrize("group_reduce", ["max", "mean"])
@pytest.mark.parametrize("window_reduce", ["mean", "sum"])
def test_window_scores_matches_dense_loops(shape, group_reduce, window_reduce):
    B, Hq, Hkv, w, S, D = shape
    queries, keys, key_mask, query_mask = _window_inputs(11, *shape)
    scaling = D**-0.5
    got = window_scores_reference(queries, keys, key_mask, query_mask, scaling, group_reduce, window_reduce)
    exp = ref_window_scores(queries, keys, key_mask, query_mask, scaling, group_reduce, window_reduce)
    assert got.shape == (B, Hkv, S) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), exp, atol=ATOL, rtol=1e-5)
    # padded keys get exactly 0
    assert (got.masked_select(~key_mask[:, None, :].expand_as(got)) == 0).all()


@pytest.mark.parametrize("window_reduce", ["mean", "sum"])
def test_window_scores_all_queries_padded_row_is_zero(window_reduce):
    shape = (3, 4, 2, 4, 10, 8)
    queries, keys, key_mask, query_mask = _window_inputs(5, *shape, all_queries_padded=True)
    got = window_scores_reference(queries, keys, key_mask, query_mask, 8**-0.5, "max", window_reduce)
    exp = ref_window_scores(queries, keys, key_mask, query_mask, 8**-0.5, "max", window_reduce)
    torch.testing.assert_close(got.double(), exp, atol=ATOL, rtol=1e-5)
    assert torch.equal(got[-1], torch.zeros_like(got[-1]))
    assert got[0].abs().sum() > 0


def test_window_scores_causal_and_mean_over_window():
    """One KV head, one query head: the last stored token is seen only by the last window query,
    and with mean over w queries every valid query's row of probabilities sums to 1."""
    torch.manual_seed(3)
    B, H, w, S, D = 1, 1, 4, 10, 8
    queries = torch.randn(B, H, w, D)
    keys = torch.randn(B, H, S, D)
    keys[0, 0, -1] = queries[0, 0].sum(0) * 5  # huge logit for every query, if they could see it
    km = torch.ones(B, S, dtype=torch.bool)
    qm = torch.ones(B, w, dtype=torch.bool)
    total = window_scores_reference(queries, keys, km, qm, D**-0.5, "max", "sum")
    mean = window_scores_reference(queries, keys, km, qm, D**-0.5, "max", "mean")
    assert total.sum().item() == pytest.approx(w, abs=1e-5)  # each query's softmax sums to 1
    torch.testing.assert_close(mean, total / w)
    # token S-1 is visible only to query w-1: its score is that query's single probability (< 1)
    logits = [D**-0.5 * dot(queries[0, 0, w - 1].tolist(), keys[0, 0, j].tolist()) for j in range(S)]
    p_last = softmax(dict(enumerate(logits)))[S - 1]
    assert total[0, 0, -1].item() == pytest.approx(p_last, abs=1e-5)
    # had the earlier queries seen it, each would have put ~1 on it too
    assert total[0, 0, -1].item() < 1.0 + 1e-5
    assert total[0, 0, -1].item() > 0.9


@pytest.mark.parametrize("shape", [(1, 4, 1, 4, 9, 8), (3, 8, 2, 4, 13, 8)])
@pytest.mark.parametrize("decay", [0.8, 0.5])
def test_window_scores_fused_global_score(shape, decay):
    """``prev``/``decay``: the G-KV global score max(score, decay * prev), element by element."""
    B, Hq, Hkv, w, S, D = shape
    queries, keys, key_mask, query_mask = _window_inputs(17, *shape)
    torch.manual_seed(18)
    prev = torch.rand(B, Hkv, S) * 0.3
    got = window_scores_reference(queries, keys, key_mask, query_mask, D**-0.5, "max", "mean", prev=prev, decay=decay)
    plain = ref_window_scores(queries, keys, key_mask, query_mask, D**-0.5, "max", "mean")
    P = prev.double().tolist()
    Q = plain.tolist()
    exp = torch.tensor(
        [[[max(Q[b][h][j], decay * P[b][h][j]) for j in range(S)] for h in range(Hkv)] for b in range(B)],
        dtype=torch.float64,
    )
    from_prev = decay * prev.double() > plain
    assert from_prev.any() and (~from_prev).any()  # both branches of the max are exercised
    torch.testing.assert_close(got.double(), exp, atol=ATOL, rtol=1e-5)


def test_window_scores_rejects_bad_shapes():
    q = torch.randn(1, 3, 2, 4)
    k = torch.randn(1, 2, 5, 4)
    m = torch.ones(1, 5, dtype=torch.bool)
    with pytest.raises(ValueError):
        window_scores_reference(q, k, m, torch.ones(1, 2, dtype=torch.bool), 0.5)
    with pytest.raises(ValueError):
        window_scores_reference(torch.randn(1, 2, 6, 4), k, m, torch.ones(1, 6, dtype=torch.bool), 0.5)


# ---------------------------------------------------------------------------------------- redundancy


def _redundant_keys(seed, B, H, S, D):
    """Random keys with runs of near-duplicates (so the 'most recent near-duplicate' rule matters)
    and wildly different norms (so only cosine similarity gives the right answer)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    keys = torch.randn(B, H, S, D)
    for b in range(B):
        for h in range(H):
            for t in range(1, S):
                if rng.random() < 0.5:
                    src = rng.randint(max(0, t - 3), t - 1)
                    keys[b, h, t] = keys[b, h, src] + 0.35 * torch.randn(D)
    keys = keys * (torch.rand(B, H, S, 1) * 5 + 0.2)
    key_mask = torch.ones(B, S, dtype=torch.bool)
    for b in range(1, B):
        key_mask[b, : rng.randint(1, 3)] = False
        key_mask[b, rng.randint(4, S - 1)] = False
    return keys, key_mask


RED_CASES = [
    # B, H, S, D, block
    (1, 2, 16, 8, None),
    (3, 2, 13, 8, None),
    (1, 2, 16, 8, 4),
    (3, 2, 13, 8, 4),  # partly filled last page (13 = 3*4 + 1)
    (3, 1, 11, 6, 8),  # partly filled last page (11 = 8 + 3)
    (1, 3, 8, 4, 8),  # S == block: lightning == all pairs
    (3, 2, 7, 4, 1),  # block 1: nothing to compare with -> uniform over valid tokens
]


@pytest.mark.parametrize("case", RED_CASES)
@pytest.mark.parametrize("threshold,tau", [(0.5, 0.4), (0.3, 0.1)])
def test_redundancy_matches_dense_loops(case, threshold, tau):
    B, H, S, D, block = case
    keys, key_mask = _redundant_keys(7 + S, B, H, S, D)
    got = redundancy_scores_reference(keys, key_mask, block, threshold, tau)
    exp, stats = ref_redundancy(keys, key_mask, block, threshold, tau)
    if block != 1:
        # the inputs exercise the rule and stay clear of the threshold (float32 vs float64)
        assert stats["multi_near"] > 0 and stats["margin"] > 1e-4, stats
    assert got.shape == (B, H, S) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), exp, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.sum(-1).double(), torch.ones(B, H, dtype=torch.float64), atol=1e-5, rtol=0)
    assert (got.masked_select(~key_mask[:, None, :].expand_as(got)) == 0).all()
    if block == 1:
        torch.testing.assert_close(got, key_mask[:, None, :].float().expand_as(got) / key_mask.sum(1)[:, None, None])


def test_redundancy_drops_most_recent_near_duplicate():
    """Hand-built page whose near-duplicates have distinct similarities, so dropping any other
    partner than the most recent near-duplicate gives a different answer."""
    keys = torch.tensor([[1.0, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1.5, 0], [0, 0, 0, 3]])[None, None]
    mask = torch.ones(1, 4, dtype=torch.bool)
    s01, s02, s12 = 1 / math.sqrt(2), 1 / math.sqrt(3.25), 1 / math.sqrt(2 * 3.25)
    assert s01 > 0.5 and s02 > 0.5 and s12 < 0.5
    r = [
        s01,  # token 0: near {1, 2}, the most recent is 2 -> keep sim(0, 1) (+ sim(0, 3) = 0)
        s12,  # token 1: near {0} -> drop it, keep sim(1, 2)
        s12,  # token 2: near {0} -> drop it, keep sim(2, 1)
        0.0,  # token 3: orthogonal to everything
    ]
    p = softmax({i: r[i] / (0.4 * 4) for i in range(4)})
    exp = torch.tensor([p[i] for i in range(4)], dtype=torch.float64)
    got = redundancy_scores_reference(keys, mask, 4, 0.5, 0.4)
    torch.testing.assert_close(got[0, 0].double(), exp, atol=1e-6, rtol=1e-5)
    # all pairs over a single page is the same comparison set but n = S = 4 as well
    torch.testing.assert_close(redundancy_scores_reference(keys, mask, None, 0.5, 0.4)[0, 0].double(), exp, atol=1e-6, rtol=1e-5)
    # with two pages of 2 tokens: token 0 only sees 1 (near, dropped) -> r = 0, etc.
    p2 = softmax({i: 0.0 for i in range(4)})
    torch.testing.assert_close(redundancy_scores_reference(keys, mask, 2, 0.5, 0.4)[0, 0].double(),
                               torch.tensor([p2[i] for i in range(4)], dtype=torch.float64), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------- pooling


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 3, 4), (3, 2, 7), (3, 2, 13)])
@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_pool_scores_matches_dense_loops(shape, kernel, mode):
    torch.manual_seed(sum(shape) * 10 + kernel)
    scores = torch.randn(*shape)  # negative values too: out-of-range positions must not count as 0
    got = pool_scores_reference(scores, kernel, mode)
    exp = ref_pool(scores, kernel, mode)
    assert got.shape == scores.shape
    torch.testing.assert_close(got.double(), exp, atol=ATOL, rtol=1e-6)


def test_pool_scores_edges_and_modes():
    scores = torch.tensor([[[1.0, 5.0, 2.0, 0.0, 3.0, 4.0]]])
    torch.testing.assert_close(pool_scores_reference(scores, 5, "max"), torch.tensor([[[5.0, 5.0, 5.0, 5.0, 4.0, 4.0]]]))
    torch.testing.assert_close(pool_scores_reference(-scores, 3, "max"), torch.tensor([[[-1.0, -1.0, 0.0, 0.0, 0.0, -3.0]]]))
    avg = pool_scores_reference(scores, 3, "avg")
    torch.testing.assert_close(avg, torch.tensor([[[3.0, 8 / 3, 7 / 3, 5 / 3, 7 / 3, 3.5]]]))
    assert torch.equal(pool_scores_reference(scores, 5, "none"), scores)
    with pytest.raises(ValueError):
        pool_scores_reference(scores, 3, "median")


# ---------------------------------------------------------------------------------------- paged KV


PAGED_CASES = [
    # B, page_size, S, trailing dims of a token
    (1, 4, 10, (2, 3)),
    (3, 4, 13, (2, 3)),
    (3, 8, 19, (3,)),  # a score-state like cache [num_pages, page, H]
    (3, 2, 5, (1, 4)),
]


@pytest.mark.parametrize("case", PAGED_CASES)
def test_slot_indices_store_gather_against_page_dict(case):
    B, ps, S, tail = case
    seed = B * 100 + ps * 10 + S
    torch.manual_seed(seed)
    rng = random.Random(seed)
    n_per_row = -(-S // ps)
    num_pages = B * n_per_row + 3
    tables, _ = make_page_tables(B, n_per_row, num_pages, rng)
    table = torch.tensor(tables)
    cache = torch.randn(num_pages, ps, *tail)
    model = pool_to_dict(cache)

    # slot_indices over several ranges, including ones that start mid-page
    for start, end in [(0, S), (3, S), (ps, S), (S - 1, S), (2, 2 + ps + 1)]:
        end = min(end, S)
        got = slot_indices(table, start, end, ps)
        exp = [[tables[b][j // ps] * ps + j % ps for j in range(start, end)] for b in range(B)]
        assert got.tolist() == exp

    # gather: token j of row b is the content of (page table[j // ps], offset j % ps)
    slots = slot_indices(table, 0, S, ps)
    got = gather_kv_reference(cache, slots)
    assert got.shape == (B, S, *tail)
    for b in range(B):
        for j in range(S):
            exp = torch.tensor(model[(tables[b][j // ps], j % ps)], dtype=torch.float64)
            assert torch.equal(got[b, j].double(), exp)

    # store: positions 2..S-1 of every row get new values (float64 written into a float32 pool)
    start = 2
    values = torch.randn(B, S - start, *tail, dtype=torch.float64)
    store_kv_reference(cache, slot_indices(table, start, S, ps), values)
    for b in range(B):
        for j in range(start, S):
            model[(tables[b][j // ps], j % ps)] = values[b, j - start].float().double().tolist()
    assert_pool_equals_dict(cache, model)
    assert cache.dtype == torch.float32


# ---------------------------------------------------------------------------------------- compaction


COMPACT_CASES = [
    # B, page_size, S, H, k
    (1, 4, 10, 2, 6),
    (3, 4, 13, 3, 7),
    (3, 4, 13, 3, 1),
    (3, 8, 19, 2, 19),  # keep everything: nothing moves
    (3, 2, 9, 4, 4),
]


def _random_keep(B, H, S, k, rng):
    keep = []
    for _ in range(B):
        rows = [sorted(rng.sample(range(S), k)) for _ in range(H)]
        keep.append(rows)
    return keep


@pytest.mark.parametrize("case", COMPACT_CASES)
def test_compact_against_page_dict(case):
    B, ps, S, H, k = case
    seed = B * 1000 + ps * 100 + S + k
    torch.manual_seed(seed)
    rng = random.Random(seed)
    n_per_row = -(-S // ps)
    # one extra row ("bystander") owns pages too but is not compacted; plus pages that belong to nobody
    num_pages = (B + 1) * n_per_row + 2
    tables, _ = make_page_tables(B + 1, n_per_row, num_pages, rng)
    table = torch.tensor(tables[:B])
    slots = slot_indices(table, 0, S, ps)

    keys = torch.randn(num_pages, ps, H, 5)
    values = torch.randn(num_pages, ps, H, 3).to(torch.float64)
    state = torch.rand(num_pages, ps, H)  # [num_pages, page, H] score state
    caches = [keys, values, state]
    before = [c.clone() for c in caches]
    models = [pool_to_dict(c) for c in caches]

    keep = _random_keep(B, H, S, k, rng)
    if H > 1 and k < S:
        assert any(keep[b][0] != keep[b][1] for b in range(B))  # heads really differ
    keep_t = torch.tensor(keep, dtype=torch.int64)

    # the expected pools, from the page dict: slot j < k of row b, head h <- old token keep[b][h][j]
    def where(b, j):
        return (tables[b][j // ps], j % ps)

    for model, old in zip(models, before):
        old_d = pool_to_dict(old)
        for b in range(B):
            for h in range(H):
                for j, src in enumerate(keep[b][h]):
                    model[where(b, j)][h] = old_d[where(b, src)][h]

    compact_reference(caches, slots, keep_t)

    for cache, model in zip(caches, models):
        assert_pool_equals_dict(cache, model)  # kept tokens in place, every other slot untouched
    # and, per head, the first k slots of each row hold the kept tokens in ascending order
    for cache, old in zip(caches, before):
        dense_old = gather_kv_reference(old, slots)
        dense_new = gather_kv_reference(cache, slots)
        for b in range(B):
            for h in range(H):
                assert torch.equal(dense_new[b, :k, h], dense_old[b, keep[b][h], h])
    # the bystander row's pages and the unowned pages did not change
    untouched = [p for p in range(num_pages) if p not in {q for t in tables[:B] for q in t}]
    for cache, old in zip(caches, before):
        assert torch.equal(cache[untouched], old[untouched])


@pytest.mark.parametrize("B,ps,S,H,k", [(1, 4, 10, 2, 6), (3, 4, 13, 3, 7)])
def test_compact_into_fresh_pages(B, ps, S, H, k):
    """``dst_slots``: the kept tokens go, in order, into other pages; the source pages are untouched."""
    seed = 77 + B + S
    torch.manual_seed(seed)
    rng = random.Random(seed)
    n_src, n_dst = -(-S // ps), -(-k // ps)
    num_pages = B * (n_src + n_dst) + 2
    perm = list(range(num_pages))
    rng.shuffle(perm)
    src_tables = [perm[b * n_src : (b + 1) * n_src] for b in range(B)]
    dst_tables = [perm[B * n_src + b * n_dst : B * n_src + (b + 1) * n_dst] for b in range(B)]
    slots = slot_indices(torch.tensor(src_tables), 0, S, ps)
    dst = slot_indices(torch.tensor(dst_tables), 0, k, ps)
    keys = torch.randn(num_pages, ps, H, 4)
    state = torch.rand(num_pages, ps, H)
    caches = [keys, state]
    models = [pool_to_dict(c) for c in caches]
    keep = _random_keep(B, H, S, k, rng)
    for model in models:
        old = {key: [list(v) if isinstance(v, list) else v for v in val] for key, val in model.items()}
        for b in range(B):
            for h in range(H):
                for j, src in enumerate(keep[b][h]):
                    model[(dst_tables[b][j // ps], j % ps)][h] = old[(src_tables[b][src // ps], src % ps)][h]
    compact_reference(caches, slots, torch.tensor(keep), dst)
    for cache, model in zip(caches, models):
        assert_pool_equals_dict(cache, model)


def test_compact_rejects_bad_arguments():
    cache = torch.zeros(4, 2, 1, 1)
    slots = torch.arange(6)[None]
    with pytest.raises(ValueError):
        compact_reference([cache], slots, torch.arange(7)[None, None])  # keeps more than stored
    with pytest.raises(ValueError):
        compact_reference([cache], slots, torch.arange(3)[None])  # keep must be [B, H, k]
    with pytest.raises(ValueError):
        compact_reference([cache], slots, torch.arange(3).repeat(1, 2, 1))  # 2 heads in keep, 1 in the cache
