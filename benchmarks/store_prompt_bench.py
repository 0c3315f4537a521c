"""A prompt's KV store on the GPU: ``--tokens`` new tokens (8 KV heads x 128, bf16) quantized into FP8 pages
(values dimension-major, as the engine stores them) in one ``store_kv`` call, the time a layer with the keys'
scale search by the squared error and weighted by queries' moments. Prints one line each:

    python benchmarks/store_prompt_bench.py [--tokens 8192] [--label TEXT]

The store's launch and search follow the environment (``ZIPAGE_STORE_LAUNCH``, ``ZIPAGE_FP8_SCALE_STEPS``); it
times whichever ``zipage`` is installed, so a tree carried as ``.before`` and installed is timed by the same script.
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    from zipage.kernels import store_kv
    from zipage.kernels.fp8 import FP8, query_weights, value_pool

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--label", default="", help="text put before each line (which tree, which launch)")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    if args.tokens < 1 or args.repeats < 1:
        ap.error(f"--tokens {args.tokens} and --repeats {args.repeats} must both be at least 1")
    H, D, page = 8, 128, 256
    n = args.tokens
    pages = -(-n // page)
    k = torch.randn(n, H, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    kp = torch.zeros(pages, page, H, D, device="cuda", dtype=FP8)
    vp = value_pool((pages, page, H, D), FP8, "cuda")
    ks, vs = torch.zeros(pages, page, H, device="cuda"), torch.zeros(pages, page, H, device="cuda")
    slots = torch.arange(n, device="cuda")
    q = torch.randn(256, H, D, device="cuda") + 2 * torch.randn(H, D, device="cuda")
    weights = query_weights(q.sum(0), (q * q).sum(0), 256)
    for name, kw in (("", {}), (" query-weighted keys", dict(key_weights=weights))):
        store_kv(kp, slots, k, vp, v, ks, vs, **kw)  # (compiles)
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(args.repeats):
            store_kv(kp, slots, k, vp, v, ks, vs, **kw)
        b.record()
        torch.cuda.synchronize()
        us = a.elapsed_time(b) / args.repeats * 1000
        print(f"{args.label}prompt store, {n} tokens x {H} heads x {D}{name}: {us:.1f} us per layer", flush=True)


if __name__ == "__main__":
    main()
