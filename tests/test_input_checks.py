"""Arguments the kernels and the cache must refuse (or take) the same way in every path.

Each case was a review finding: a Triton launcher and its PyTorch reference that read one bad argument
differently (a negative softcap or window, ``num_splits=0``, a short ``max_q_len`` hint, a ``cu_seqlens_q``
one entry short, index tensors of the wrong rows, a page id of -1, unsorted ``keep``, values of another
shape, an empty batch, mixed dtypes), and two of the cache's and config's arguments. Value checks that
need the index tensors' contents run on CPU tensors only (on a GPU they would cost a device sync), which
is where these tests (and the interpreter) put them.
"""

from __future__ import annotations

import pytest
import torch
from conftest import requires_triton

import zipage
from zipage.kernels import (
    compact_reference,
    compact_triton,
    exact_attention,
    paged_decode_attention_reference,
    paged_decode_attention_triton,
    paged_prefill_attention_reference,
    paged_prefill_attention_triton,
    store_kv_reference,
    store_kv_triton,
    window_scores_reference,
    window_scores_triton,
)


def _pool(lens, page=16, H=2, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    per_row = max(max(-(-n // page) for n in lens), 1)
    P = len(lens) * per_row + 2
    table = torch.randperm(P, generator=g)[: len(lens) * per_row].view(len(lens), per_row).to(torch.int32)
    k = torch.randn(P, page, H, D, generator=g).to(dtype)
    v = torch.randn(P, page, H, D, generator=g).to(dtype)
    return k, v, table, torch.tensor(lens, dtype=torch.int32)


def _v2():
    from zipage.kernels.paged_prefill import paged_prefill_attention_v2

    return paged_prefill_attention_v2


def _decode_paths():
    return [paged_decode_attention_reference, paged_decode_attention_triton]


def _prefill_paths():
    return [paged_prefill_attention_reference, paged_prefill_attention_triton, _v2()]


@requires_triton
@pytest.mark.parametrize("softcap", [-2.0, 0.0, float("nan")])
def test_softcap_must_be_positive_in_every_path(softcap):
    k, v, table, lens = _pool([40])
    q = torch.randn(1, 4, 16)
    for fn in _decode_paths():
        with pytest.raises(ValueError, match="softcap"):
            fn(q, k, v, table, lens, 0.25, softcap=softcap)
    qp, cu = torch.randn(10, 4, 16), torch.tensor([0, 10], dtype=torch.int32)
    for fn in _prefill_paths():
        with pytest.raises(ValueError, match="softcap"):
            fn(qp, k, v, table, cu, lens, 0.25, softcap=softcap)
    with pytest.raises(ValueError, match="softcap"):
        exact_attention(q, torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16), None, 0.25, softcap=softcap)


@requires_triton
@pytest.mark.parametrize("window", [0, -3])
def test_window_must_be_at_least_one_in_every_path(window):
    k, v, table, lens = _pool([40])
    q = torch.randn(1, 4, 16)
    for fn in _decode_paths():
        with pytest.raises(ValueError, match=f"window={window}: must be >= 1"):
            fn(q, k, v, table, lens, 0.25, window=window)
    qp, cu = torch.randn(10, 4, 16), torch.tensor([0, 10], dtype=torch.int32)
    for fn in _prefill_paths():
        with pytest.raises(ValueError, match=f"window={window}: must be >= 1"):
            fn(qp, k, v, table, cu, lens, 0.25, window=window)


@requires_triton
@pytest.mark.parametrize("num_splits", [0, -1])
def test_decode_num_splits_must_be_positive(num_splits):
    k, v, table, lens = _pool([40])
    with pytest.raises(ValueError, match="num_splits"):
        paged_decode_attention_triton(torch.randn(1, 4, 16), k, v, table, lens, 0.25, num_splits=num_splits)


@requires_triton
def test_prefill_max_q_len_shorter_than_a_run_is_refused_on_cpu():
    k, v, table, lens = _pool([100])
    q, cu = torch.randn(100, 4, 16), torch.tensor([0, 100], dtype=torch.int32)
    for fn in (paged_prefill_attention_triton, _v2()):
        with pytest.raises(ValueError, match="max_q_len=10"):
            fn(q, k, v, table, cu, lens, 0.25, max_q_len=10)
    # a hint at least the longest run is taken
    ref = paged_prefill_attention_reference(q, k, v, table, cu, lens, 0.25)
    out = paged_prefill_attention_triton(q, k, v, table, cu, lens, 0.25, max_q_len=100)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@requires_triton
def test_prefill_v1_checks_cu_seqlens_q_entries():
    k, v, table, lens = _pool([40, 100])
    q, cu = torch.randn(100, 4, 16), torch.tensor([0, 30, 100], dtype=torch.int32)
    for fn in (paged_prefill_attention_triton, _v2()):
        with pytest.raises(ValueError, match="cu_seqlens_q has 2 entries for 2 sequences"):
            fn(q, k, v, table, cu[:2], lens, 0.25)


@requires_triton
def test_decode_index_rows_and_values_are_checked_on_cpu():
    k, v, table, _ = _pool([64, 64])  # 4 pages of 16 per row
    q = torch.randn(2, 4, 16)
    lens = torch.tensor([64, 64], dtype=torch.int32)
    with pytest.raises(ValueError, match="kv_lens"):
        paged_decode_attention_triton(q, k, v, table, lens[:1].clone(), 0.25)
    with pytest.raises(ValueError, match="page_table"):
        paged_decode_attention_triton(q, k, v, table[:1].clone(), lens, 0.25)
    with pytest.raises(ValueError, match="kv_starts"):
        paged_decode_attention_triton(q, k, v, table, lens, 0.25, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(IndexError, match="kv_lens"):  # 70 tokens on a row of 64 slots
        paged_decode_attention_triton(q, k, v, table, torch.tensor([70, 64], dtype=torch.int32), 0.25)
    bad = table.clone()
    bad[1, 2] = k.shape[0]  # a page id past the pool
    with pytest.raises(IndexError, match="page"):
        paged_decode_attention_triton(q, k, v, bad, lens, 0.25)
    # ids past a row's length are not read, so they are not checked
    short = torch.tensor([64, 20], dtype=torch.int32)
    ref = paged_decode_attention_reference(q, k, v, table, short, 0.25)
    torch.testing.assert_close(paged_decode_attention_triton(q, k, v, bad, short, 0.25), ref, atol=1e-4, rtol=1e-4)


def test_references_refuse_negative_page_ids_and_slots():
    k, v, table, lens = _pool([20])
    q = torch.randn(1, 4, 16)
    bad = table.clone()
    bad[0, 0] = -1
    with pytest.raises(IndexError, match="page"):
        paged_decode_attention_reference(q, k, v, bad, lens, 0.25)
    qp, cu = torch.randn(5, 4, 16), torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(IndexError, match="page"):
        paged_prefill_attention_reference(qp, k, v, bad, cu, lens, 0.25)
    cache = torch.zeros(4, 16, 2, 8)
    with pytest.raises(IndexError, match="slot"):
        store_kv_reference(cache, torch.tensor([3, -1]), torch.ones(2, 2, 8))
    assert not cache.any()


@requires_triton
def test_compact_triton_refuses_keep_out_of_order_on_cpu():
    P, page = 8, 16
    base = torch.arange(P * page, dtype=torch.float32).view(P, page, 1, 1)
    slots = torch.arange(100)[None]
    keep = torch.arange(20, 100).flip(0).view(1, 1, 80)
    cache = base.clone()
    with pytest.raises(ValueError, match="ascending"):
        compact_triton([cache], slots, keep)
    assert torch.equal(cache, base)
    a, b = base.clone(), base.clone()
    compact_reference([a], slots, keep.flip(-1))
    compact_triton([b], slots, keep.flip(-1))
    assert torch.equal(a, b)


@requires_triton
def test_store_kv_triton_checks_the_values_shape():
    cache = torch.zeros(4, 16, 2, 8)
    slots = torch.tensor([0, 5, 17])
    for fn in (store_kv_reference, store_kv_triton):
        with pytest.raises((ValueError, RuntimeError)):
            fn(cache, slots, torch.randn(3, 8, 2))  # [n, D, H]: same numel, another layout
    with pytest.raises(ValueError, match="values"):
        store_kv_triton(cache, slots, torch.randn(3, 8, 2))
    with pytest.raises(ValueError, match="values"):
        store_kv_triton(cache, slots, torch.randn(3, 2, 8), torch.zeros(4, 16, 2, 8), torch.randn(3, 16))
    assert not cache.any()
    vals = torch.randn(3, 2, 8)
    store_kv_triton(cache, slots, vals)
    assert torch.equal(cache.view(-1, 2, 8)[slots], vals)


@requires_triton
def test_window_scores_triton_takes_an_empty_batch():
    args = (torch.randn(0, 2, 4, 16), torch.randn(0, 2, 10, 16), torch.ones(0, 10, dtype=torch.bool),
            torch.ones(0, 4, dtype=torch.bool), 0.25)
    want = window_scores_reference(*args)
    got = window_scores_triton(*args)
    assert got.shape == want.shape == (0, 2, 10) and got.dtype == want.dtype


@requires_triton
def test_mixed_query_and_pool_dtypes_are_refused():
    k, v, table, lens = _pool([20])
    q = torch.randn(1, 4, 16).half()
    with pytest.raises(ValueError, match="dtype"):
        paged_decode_attention_triton(q, k, v, table, lens, 0.25)
    qp, cu = torch.randn(5, 4, 16).half(), torch.tensor([0, 5], dtype=torch.int32)
    for fn in (paged_prefill_attention_triton, _v2()):
        with pytest.raises(ValueError, match="dtype"):
            fn(qp, k, v, table, cu, lens, 0.25)


@requires_triton
def test_eight_bit_pools_with_wider_queries_still_work():
    from zipage.kernels import FP8, quantize_reference

    k, v, table, lens = _pool([20])
    (kc, ks), (vc, vs) = quantize_reference(k, FP8), quantize_reference(v, FP8)
    q = torch.randn(1, 4, 16)
    ref = paged_decode_attention_reference(q, kc, vc, table, lens, 0.25, k_scale=ks, v_scale=vs)
    out = paged_decode_attention_triton(q, kc, vc, table, lens, 0.25, k_scale=ks, v_scale=vs)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("idx", [5, 2, -1])
def test_cache_update_refuses_a_layer_index_out_of_range(idx):
    from transformers import LlamaConfig

    cfg = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                      intermediate_size=64, vocab_size=100)
    cache = zipage.ZipageCache(config=cfg, budget=16, page_size=4, window=4)
    k = torch.randn(1, 2, 5, 16)
    with pytest.raises(IndexError, match=rf"layer_idx={idx}.*2 layers"):
        cache.update(k, k, idx)


def test_config_replace_keeps_an_explicit_buffer():
    explicit = zipage.ZipageConfig(budget=64, page_size=16, buffer=16)
    assert explicit.replace(page_size=32).buffer == 16
    assert explicit.replace(budget=128).replace(page_size=32).buffer == 16
    default = zipage.ZipageConfig(budget=64, page_size=16)
    assert default.buffer == 16 and default.replace(page_size=32).buffer == 32
    assert default.replace(budget=128).replace(page_size=32).buffer == 32  # still following after a copy
    assert default.replace(page_size=32, buffer=8).buffer == 8
    assert repr(explicit) == repr(default) and explicit == default


def test_reorder_cache_takes_one_source_row_per_row():
    """A beam_idx of the wrong length was taken: the rows' tensors changed length and the next update failed
    far from the cause."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                      intermediate_size=64, vocab_size=100)
    cache = zipage.ZipageCache(config=cfg, budget=16, page_size=4, window=4, scorer="streaming")
    k = torch.randn(2, 2, 5, 16)
    for layer in range(2):
        cache.update(k, k, layer)
    with pytest.raises(ValueError, match="one source row for each of the cache's 2 rows"):
        cache.reorder_cache(torch.tensor([0]))
    cache.reorder_cache(torch.tensor([1, 0]))
    assert cache.get_seq_length() == 5
