"""Prefill through PyTorch's FlashAttention (kernels/flash_prefill.py): against the float32 reference
on a GPU (fresh prompts over their own keys/values, and over the pool through a page table where
this torch takes one), the engine's dispatch (which steps take it, and that every step that took it
agrees with the Triton kernel on the same inputs), and on a CPU that it never runs there."""

from __future__ import annotations

import pytest
import torch
from conftest import CUDA, tiny_model
from test_paged_prefill import make_case, rel_err

from zipage.kernels import flash_prefill as fa
from zipage.kernels import paged_attention, paged_prefill_attention_reference


def fresh_kv(case):
    """The prompts' own keys and values packed [T, Hkv, D] (every sequence's queries are all its tokens)."""
    page = case["k_cache"].shape[1]
    slots = []
    for b, n in enumerate(case["kv_lens"].tolist()):
        pos = torch.arange(n, device=case["q"].device)
        slots.append(case["page_table"][b, pos // page].long() * page + pos % page)
    slots = torch.cat(slots)
    flat = lambda t: t.reshape(-1, *t.shape[2:])[slots]  # noqa: E731
    return flat(case["k_cache"]), flat(case["v_cache"])


def reference(case):
    D = case["q"].shape[-1]
    return paged_prefill_attention_reference(case["q"].float(), case["k_cache"], case["v_cache"], case["page_table"],
                                             case["cu_seqlens_q"], case["kv_lens"], D**-0.5)


def test_the_op_is_there_and_never_runs_on_a_cpu():
    assert {"cum_seq_q", "cum_seq_k", "scale"} <= fa.op_arguments()  # this torch's FlashAttention forward
    q = torch.zeros(4, 4, 64, dtype=torch.bfloat16)
    assert not fa.applies(q, "fresh") and not fa.applies(q, "paged", page_size=256, pool_dtype=torch.bfloat16)


def test_the_switch_refuses_unknown_kernels_by_name(monkeypatch):
    monkeypatch.setenv("ZIPAGE_PREFILL_KERNEL", "flash2")
    with pytest.raises(ValueError, match="ZIPAGE_PREFILL_KERNEL='flash2'.*auto, flash"):
        paged_attention.prefill_choice()
    for ok in ("auto", "flash", "v1", "v2", "v2:m64n64w4s3"):
        monkeypatch.setenv("ZIPAGE_PREFILL_KERNEL", ok)
        assert paged_attention.prefill_choice() == ok
    monkeypatch.delenv("ZIPAGE_PREFILL_KERNEL")
    assert paged_attention.prefill_choice() == "auto"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Hq, Hkv, D", [(32, 8, 128), (4, 4, 64), (14, 2, 64)])
@pytest.mark.parametrize("mode", ["fresh", "paged"])
def test_flash_prefill_matches_the_reference(mode, Hq, Hkv, D, dtype):
    if mode == "paged" and "block_table" not in fa.op_arguments():
        pytest.skip("this torch's FlashAttention takes no page table")
    if mode == "fresh":  # whole prompts of mixed lengths: queries = stored tokens
        lens = q_lens = [300, 1, 17, 256, 513]
    else:  # prefix-cached and chunked sequences: queries are the last of their stored tokens
        lens, q_lens = [600, 300, 1, 257, 40], [88, 300, 1, 1, 40]
    case = make_case("cuda", dtype, Hq, Hkv, D, 256, lens, q_lens)
    ref = reference(case)
    args = dict(scale=D**-0.5)
    assert fa.applies(case["q"], mode, page_size=256, pool_dtype=dtype)
    if mode == "fresh":
        k, v = fresh_kv(case)
        out = fa.flash_prefill_fresh(case["q"], k, v, case["cu_seqlens_q"], max(q_lens), **args)
    else:
        out = fa.flash_prefill_paged(case["q"], case["k_cache"], case["v_cache"], case["page_table"],
                                     case["cu_seqlens_q"], case["kv_lens"], max_q_len=max(q_lens),
                                     max_kv_len=max(lens), **args)
    assert out.shape == case["q"].shape and out.dtype == dtype
    assert rel_err(out, ref) < (2e-2 if dtype == torch.bfloat16 else 3e-3)
    # a broken causal alignment or head mapping is far off: the same check fails on a shuffled output
    assert rel_err(out.roll(1, dims=1), ref) > 0.3


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("choice", ["auto", "flash"])
def test_engine_prefill_through_flash_agrees_with_the_kernel(choice, monkeypatch):
    """The engine in bf16 with 256-token pages (FlashAttention's paged layout): every prefill that the
    dispatch sends to FlashAttention is recomputed by the Triton kernel on the same inputs and must
    agree; fresh prompts take it, prefix-cached and chunked steps take it only under ``flash``; the
    engine's greedy tokens are those of a run with the Triton kernel alone."""
    from test_engine import prompts_of

    from zipage import LLM, SamplingParams
    from zipage.kernels.paged_prefill import paged_prefill_attention_v2

    model = tiny_model("qwen3", scale=1.0, head_dim=64, num_attention_heads=8, num_key_value_heads=2).cuda()
    model = model.to(torch.bfloat16)
    shared = prompts_of((300,), seed=3)[0]
    prompts = prompts_of((12, 290, 7, 600), seed=1) + prompts_of((5, 33), seed=2, prefix=shared)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    def run(kernel):
        monkeypatch.setenv("ZIPAGE_PREFILL_KERNEL", kernel)
        llm = LLM(model, budget=None, page_size=256, num_pages=64, enable_prefix_caching=True, max_num_seqs=4,
                  max_num_batched_tokens=512)
        return [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    expected = run("v2")
    seen = {"fresh": 0, "paged": 0}

    def checked(mode, fn):
        def wrapper(q, *a, **kw):
            out = fn(q, *a, **kw)
            seen[mode] += 1
            return out
        return wrapper

    real_fresh, real_paged = fa.flash_prefill_fresh, fa.flash_prefill_paged
    monkeypatch.setattr(fa, "flash_prefill_fresh", checked("fresh", real_fresh))
    monkeypatch.setattr(fa, "flash_prefill_paged", checked("paged", real_paged))
    # every prefill the engine runs: FlashAttention's answer (when the dispatch takes it) against the kernel's
    real_dispatch = paged_attention.paged_prefill_attention
    errors = []

    def both(q, k_cache, v_cache, table, cu, lens, scale, kv_starts=None, k_scale=None, v_scale=None, **kw):
        out = real_dispatch(q, k_cache, v_cache, table, cu, lens, scale, kv_starts, k_scale, v_scale, **kw)
        kw = {k: v for k, v in kw.items() if k not in ("new_kv", "max_kv_len")}
        ref = paged_prefill_attention_v2(q, k_cache, v_cache, table, cu, lens, scale, kv_starts, k_scale=k_scale,
                                         v_scale=v_scale, **kw)
        errors.append(rel_err(out, ref))
        return out

    import zipage.engine.runner as runner

    monkeypatch.setattr(runner, "paged_prefill_attention", both)
    tokens = run(choice)
    assert seen["fresh"] > 0 and (seen["paged"] > 0) == (choice == "flash" and "block_table" in fa.op_arguments())
    assert errors and max(errors) < 2e-2, max(errors)
    agree = sum(a == b for x, y in zip(tokens, expected) for a, b in zip(x, y)) / sum(len(x) for x in expected)
    assert agree > 0.9, agree  # bf16: two kernels may round a near-tie differently, not more
