"""The paged decode kernel on FP8 pages against bf16 pages, with launch variants (GPU; one call).

At Qwen3-8B's shapes (32 query heads over 8 KV heads, head dim 128, 256-token pages) and the
engine's decode batch sizes, it times the split kernel plus its merge and prints milliseconds and
the share of the copy bandwidth it moves (keys, values and, for FP8, their float32 scales):

    python benchmarks/fp8_decode_tune.py [--out benchmarks/results/fp8_decode_tune.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def timed(fn, rep: int = 30) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(rep):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / rep


def main() -> None:
    from zipage.kernels.fp8 import quantize_reference
    from zipage.kernels.paged_attention import paged_decode_attention_triton

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/fp8_decode_tune.json")
    ap.add_argument("--bandwidth", type=float, default=4.25e12)
    args = ap.parse_args()
    hq, hkv, d, page, ctx = 32, 8, 128, 256, 2176
    rows = []
    for batch in (256, 512):
        pages_per = -(-ctx // page)
        n_pages = batch * pages_per
        k = torch.randn(n_pages, page, hkv, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        table = torch.randperm(n_pages, device="cuda", dtype=torch.int32).view(batch, pages_per)
        lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
        q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)
        kq, ks = quantize_reference(k)
        vq, vs = quantize_reference(v)
        scale = d ** -0.5
        base = batch * ctx * hkv * d * 2
        for fp8 in (False, True):
            for block_n in (64, 128):
                for warps in (4, 8):
                    for stages in (2, 3):
                        if fp8:
                            fn = lambda: paged_decode_attention_triton(  # noqa: E731
                                q, kq, vq, table, lens, scale, max_len_hint=ctx, block_n=block_n, k_scale=ks,
                                v_scale=vs, num_warps=warps, num_stages=stages)
                            nbytes = base + batch * ctx * hkv * 4 * 2
                        else:
                            fn = lambda: paged_decode_attention_triton(  # noqa: E731
                                q, k, v, table, lens, scale, max_len_hint=ctx, block_n=block_n, num_warps=warps,
                                num_stages=stages)
                            nbytes = base * 2
                        try:
                            ms = timed(fn)
                        except Exception as e:  # noqa: BLE001 (a variant that does not compile)
                            print(f"batch {batch} fp8={fp8} block_n={block_n} warps={warps} stages={stages}: {e!r}"[:200])
                            continue
                        rows.append(dict(batch=batch, kv="fp8" if fp8 else "bf16", block_n=block_n, warps=warps,
                                         stages=stages, ms=round(ms, 4),
                                         bw_share=round(nbytes / (ms * 1e-3) / args.bandwidth, 3)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    print(f"{'batch':>5} {'kv':>4} {'block_n':>7} {'warps':>5} {'stages':>6} {'ms':>8} {'bw share':>8}")
    for r in rows:
        print(f"{r['batch']:>5} {r['kv']:>4} {r['block_n']:>7} {r['warps']:>5} {r['stages']:>6} {r['ms']:>8.3f} "
              f"{r['bw_share']:>8.2f}")


if __name__ == "__main__":
    main()
