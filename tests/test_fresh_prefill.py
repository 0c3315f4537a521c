"""Whole prompts through PyTorch's fused attention (kernels/fresh_prefill.py) and the engine's use of it."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, tiny_sliding_model

import zipage.engine.runner as runner_mod
from zipage import LLM, SamplingParams
from zipage.kernels.fresh_prefill import (bucket_length, fresh_prefill_attention, fresh_prefill_reference,
                                          plan_fresh)

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def packed(lens, hq=8, hkv=2, d=16, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q, k, v = (torch.randn(T, h, d, generator=g).to(device, dtype) for h in (hq, hkv, hkv))
    starts = [sum(lens[:i]) for i in range(len(lens))]
    return q, k, v, starts


def test_bucket_length_pads_to_a_few_shapes_and_at_most_an_eighth():
    for n in list(range(1, 3000, 7)) + [4096, 4097, 8191, 32768, 32769, 100_000]:
        b = bucket_length(n)
        assert b >= n and b % 128 == 0
        assert b - n < 128 or (b - n) * 8 <= b, (n, b)
    assert len({bucket_length(n) for n in range(1025, 2049)}) == 8  # eight buckets to a doubling
    assert len({bucket_length(n) for n in range(1, 1025)}) == 8  # multiples of 128 below
    with pytest.raises(ValueError, match="at least one token"):
        bucket_length(0)


def test_plan_reads_exact_contiguous_batches_in_place_and_copies_the_rest():
    lens = [128, 128, 128, 300, 1500, 1100, 5]
    plan = plan_fresh(lens, [sum(lens[:i]) for i in range(len(lens))])
    assert sorted(s for b in plan for s in b.seqs) == list(range(len(lens)))  # every prompt, once
    by = {b.seqs: b for b in plan}
    assert by[(0, 1)].first_row == 0 and by[(0, 1)].length == 128  # a power of two in place
    assert by[(2,)].first_row == 256
    assert by[(6,)].first_row is None and by[(6,)].length == 128  # 5 tokens padded to 128: copied
    assert by[(3,)].length == 384 and by[(4,)].length == 1536 and by[(5,)].length == 1152
    # copy_min leaves copied batches of shorter buckets out of the plan (in-place ones stay)
    plan = plan_fresh(lens, [sum(lens[:i]) for i in range(len(lens))], copy_min=1200)
    assert sorted(s for b in plan for s in b.seqs) == [0, 1, 2, 4]
    plan = plan_fresh(lens, [sum(lens[:i]) for i in range(len(lens))], copy_min=None)  # in place only
    assert sorted(s for b in plan for s in b.seqs) == [0, 1, 2] and all(b.first_row is not None for b in plan)
    with pytest.raises(ValueError, match="3 lengths for 2 starts"):
        plan_fresh([1, 2, 3], [0, 1])


@pytest.mark.parametrize("lens", [[128, 128, 128, 128], [1, 37, 129, 300, 128, 1200], [640] * 3 + [17]])
def test_fresh_attention_matches_dense_causal_attention(lens):
    q, k, v, starts = packed(lens)
    plan = plan_fresh(lens, starts)
    ref = fresh_prefill_reference(q, k, v, lens, 0.3)
    torch.testing.assert_close(fresh_prefill_attention(q, k, v, plan, 0.3), ref, atol=2e-5, rtol=1e-4)


def test_fresh_attention_writes_the_planned_rows_only():
    lens = [40, 128, 128, 60]
    q, k, v, starts = packed(lens)
    plan = plan_fresh(lens, starts, copy_min=10_000)  # the two 128-token prompts, in place
    assert [b.seqs for b in plan] == [(1, 2)]
    out = torch.full_like(q, 7.0)
    fresh_prefill_attention(q, k, v, plan, 0.3, out=out)
    ref = fresh_prefill_reference(q, k, v, lens, 0.3)
    torch.testing.assert_close(out[40:296], ref[40:296], atol=2e-5, rtol=1e-4)
    assert (out[:40] == 7).all() and (out[296:] == 7).all()


def run_engine(monkeypatch, fresh, model, prompts, copy_min=None, **kw):
    monkeypatch.setenv("ZIPAGE_FRESH_PREFILL", "1" if fresh else "0")
    if copy_min is not None:
        monkeypatch.setattr(runner_mod, "FRESH_COPY_MIN", copy_min)
    llm = LLM(model, page_size=8, num_pages=256, **kw)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    return [o.token_ids for o in outs], llm.runner


def prompts_of(lengths, seed=0, prefix=()):
    g = torch.Generator().manual_seed(seed)
    return [list(prefix) + torch.randint(3, 96, (n,), generator=g).tolist() for n in lengths]


def mixed_steps(budget):
    """Engine settings whose steps mix whole prompts, chunks and decode rows (a buffer of 8 with a budget)."""
    return dict(budget=budget, max_num_batched_tokens=320, max_num_seqs=4, **({} if budget is None else dict(buffer=8)))


@pytest.mark.parametrize("budget, copy_min", [(None, None), (None, 0), (32, 0)])
def test_engine_gives_the_same_tokens_with_whole_prompts_through_fused_attention(monkeypatch, budget, copy_min):
    """Mixed steps: whole prompts (in place and copied), a cached prefix, chunks after the first, decode rows."""
    model = tiny_model("qwen3")
    shared = prompts_of((40,), seed=3)[0]
    # step 1: 37, 128, 128 and 27 of 90 tokens (the fused attention's batch between two the kernel serves), ...
    prompts = prompts_of((37, 128, 128, 90, 128, 200, 60), seed=1) + prompts_of((20, 9), seed=2, prefix=shared)
    kw = mixed_steps(budget)
    base, r0 = run_engine(monkeypatch, False, model, prompts, **kw)
    got, r1 = run_engine(monkeypatch, True, model, prompts, copy_min=copy_min, **kw)
    assert r0.fresh_prefill_tokens == 0 and not r0.fresh_prefill
    assert r1.fresh_prefill_tokens >= 256  # the two 128-token prompts at least, in place
    if copy_min == 0:
        assert r1.fresh_prefill_tokens >= 128 * 2 + 37 + 90
    assert got == base


def test_fresh_prefill_setting_is_checked(monkeypatch):
    monkeypatch.setenv("ZIPAGE_FRESH_PREFILL", "yes")
    with pytest.raises(ValueError, match="ZIPAGE_FRESH_PREFILL='yes'"):
        LLM(tiny_model("llama"), budget=None, page_size=8, num_pages=32)
    monkeypatch.delenv("ZIPAGE_FRESH_PREFILL")
    assert not runner_mod.fresh_prefill_default(torch.device("cpu"), torch.bfloat16, 128)  # off unless asked
    monkeypatch.setenv("ZIPAGE_FRESH_PREFILL", "1")
    assert runner_mod.fresh_prefill_default(torch.device("cpu"), torch.float32, 128)
    assert not runner_mod.fresh_prefill_default(torch.device("cpu"), torch.float32, 512)  # (head dims past 256)


def test_sliding_layers_keep_the_paged_kernel(monkeypatch):
    """A model with sliding-window layers: its full layers take the fused attention, its sliding ones not."""
    model = tiny_sliding_model("gemma3")
    prompts = prompts_of((128, 128, 50), seed=4)
    base, _ = run_engine(monkeypatch, False, model, prompts, budget=None)
    got, r = run_engine(monkeypatch, True, model, prompts, budget=None)
    assert r.fresh_prefill_tokens >= 256 and got == base


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("lens", [[512] * 4, [300, 1024, 77, 2049]])
def test_fresh_attention_on_the_gpu_matches_dense_math(lens):
    q, k, v, starts = packed(lens, hq=32, hkv=8, d=128, dtype=torch.bfloat16, device="cuda")
    plan = plan_fresh(lens, starts, "cuda")
    ref = fresh_prefill_reference(q, k, v, lens, 128**-0.5)
    out = fresh_prefill_attention(q, k, v, plan, 128**-0.5)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_on_the_gpu_with_whole_prompts_through_fused_attention(monkeypatch):
    """bf16 on CUDA: the prompts' batches through cuDNN in place; the first tokens as the paged kernel's (the two
    attentions round differently in bf16, so a near-tie may flip one)."""
    model = tiny_model("qwen3").to("cuda", torch.bfloat16)
    prompts = prompts_of([128] * 6 + [256, 256], seed=7)
    base, _ = run_engine(monkeypatch, False, model, prompts, budget=None)
    got, r = run_engine(monkeypatch, True, model, prompts, budget=None)
    assert r.fresh_prefill_tokens == 6 * 128 + 2 * 256
    assert sum(a[0] == b[0] for a, b in zip(base, got)) >= 7
