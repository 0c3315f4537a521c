"""The exact-tail merge kernel's launch (``kernels/exact_tail.py``, ``LAUNCH``) on one GPU: warps per program and
ring rows per tile, for rings of 16, 32 and 64 rows at a decode step's shapes (Qwen3-8B heads: 32 query heads over
8 KV heads, head dim 128, bf16), every row's count at the full tail. Each launch is checked against the PyTorch
reference first; the table gives the median time and the bandwidth of the bytes it must move (ring rows read,
queries, the paged part's output and log-sum-exp, the result).

    python benchmarks/merge_tune.py --requests 490 --out benchmarks/results/merge_tune.json
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=490)
    ap.add_argument("--tails", default="16,32,64")
    ap.add_argument("--warps", default="1,2,4,8")
    ap.add_argument("--rows", default="16,32,64")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from triton.testing import do_bench

    from zipage.kernels import exact_tail as et

    B, H, G, D = args.requests, 8, 4, 128
    dt = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)
    results = []
    for tail in (int(t) for t in args.tails.split(",")):
        q = torch.randn(B, H * G, D, device="cuda", generator=g).to(dt)
        out = torch.randn(B, H * G, D, device="cuda", generator=g).to(dt)
        lse = torch.randn(B, H * G, device="cuda", generator=g)
        ring_k, ring_v = (torch.randn((B + 1) * tail, H, D, device="cuda", generator=g).to(dt) for _ in range(2))
        first = torch.arange(B, device="cuda") * tail
        pos = torch.randint(tail, 4000, (B,), device="cuda", generator=g)
        count = torch.full((B,), tail, device="cuda")
        call = (q, out, lse, ring_k, ring_v, first, pos, count, tail, 0.088)
        want = et.exact_tail_merge_reference(*call)
        moved = B * H * tail * D * 2 * 2 + 3 * q.numel() * 2 + lse.numel() * 4
        for warps in (int(w) for w in args.warps.split(",")):
            for rows in (int(r) for r in args.rows.split(",")):
                if rows > max(16, tail):
                    continue
                et.LAUNCH.update(num_warps=warps, max_block_rows=rows)
                got = et.exact_tail_merge_triton(*call)
                torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
                ms = do_bench(lambda: et.exact_tail_merge_triton(*call), warmup=20, rep=100, return_mode="median")
                results.append(dict(tail=tail, num_warps=warps, block_rows=rows, us=ms * 1000,
                                    gbps=moved / ms / 1e6))
                print(f"tail {tail:3d}  warps {warps}  rows {rows:2d}: {ms * 1000:7.1f} us  "
                      f"{moved / ms / 1e6:7.0f} GB/s", flush=True)
    et.LAUNCH.update(num_warps=2, max_block_rows=et.MAX_BLOCK_ROWS)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(requests=B, heads=[H * G, H], head_dim=D, dtype="bfloat16",
                           device=torch.cuda.get_device_name(), results=results), f, indent=1)


if __name__ == "__main__":
    main()
