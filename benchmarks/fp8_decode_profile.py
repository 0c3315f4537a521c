"""The decode kernel on FP8 pages and on bf16 pages at the engine's largest decode batch, for Nsight
Compute to read (GPU; ``PART=ncu`` of ``benchmarks/gpu_session.sh``), e.g.

    ncu --clock-control none --set full -k regex:_decode_split_fp8 --launch-skip 3 --launch-count 1 \
        python benchmarks/fp8_decode_profile.py

Qwen3-8B shapes (32 query / 8 KV heads, head dim 128, 256-token pages), ``--batch`` sequences of 2,176
tokens. Each kernel runs three times before its fourth launch (compilation and warm-up): skip three
launches of ``_decode_split_fp8_kernel`` (FP8) or of ``_decode_split_kernel`` (bf16) to read the fourth."""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    from zipage.kernels.fp8 import quantize_reference
    from zipage.kernels.paged_attention import paged_decode_attention_triton

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--fp8-choice", default="convert=fp16,head_fast=1,load=tma,block_n=128,num_warps=4,num_stages=3",
                    help="the FP8 kernel's launch, as ZIPAGE_FP8_DECODE takes it")
    args = ap.parse_args()
    from zipage.kernels.paged_attention import _parse_fp8_choice

    parsed = _parse_fp8_choice(args.fp8_choice.strip())
    if parsed is None:
        ap.error("--fp8-choice is empty: give the launch as ZIPAGE_FP8_DECODE takes it")
    choice = dict(parsed)
    hq, hkv, d, page, ctx = 32, 8, 128, 256, 2176
    pages_per = -(-ctx // page)
    n_pages = args.batch * pages_per
    k = torch.randn(n_pages, page, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    table = torch.randperm(n_pages, device="cuda", dtype=torch.int32).view(args.batch, pages_per)
    lens = torch.full((args.batch,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(args.batch, hq, d, device="cuda", dtype=torch.bfloat16)
    kq, ks = quantize_reference(k)
    vq, vs = quantize_reference(v)
    scale = d ** -0.5
    for _ in range(4):  # the FP8 kernel: 3 warm-ups, then the profiled launch
        paged_decode_attention_triton(q, kq, vq, table, lens, scale, max_len_hint=ctx, k_scale=ks, v_scale=vs,
                                      fp8_kernel=dict(choice))
    for _ in range(4):  # the bf16 kernel on the same values, as the reference point (it runs at the copy bandwidth)
        paged_decode_attention_triton(q, k, v, table, lens, scale, max_len_hint=ctx, block_n=64)
    torch.cuda.synchronize()
    print("done")


if __name__ == "__main__":
    main()
