"""The decode step's KV store (``store_kv``: one new token per request per layer) on the GPU.

Each request owns one 256-token page in each of ``--layers`` layers' pools (so, as in the engine, one
step's writes reach far more bytes than the L2 holds); a step stores one token per request into every
layer, at the next position of its page. Times a step's stores (one CUDA graph, median) per layer, for
bf16 pages, 8-bit pages with values token-major, and 8-bit values dimension-major (the engine's layout
on compute capability 9+: each byte of a token's values lands in its own 32-byte sector, which the
memory then reads and writes back whole), keys alone, and FP8 keys whose scale search is weighted by
queries' moments (``fp8.query_weights``, what the engine's FP8 pages do once a prompt was seen). Prints a
table and writes JSON:

    python benchmarks/store_bench.py [--requests 490] [--out benchmarks/results/store_bench.json]

``--launches 'default;heads=2,split=1;...'`` repeats the 8-bit rows under each ``ZIPAGE_STORE_LAUNCH`` (how the
store's programs are cut: KV heads a program, keys and values in programs of their own, warps; the codes are the
same whatever the launch, ``tests/test_fp8_kernels.py``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    from zipage.kernels import store_kv
    from zipage.kernels.fp8 import FP8, INT8, query_weights, value_pool

    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", default="256,490")
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/store_bench.json")
    ap.add_argument("--launches", default="default",
                    help="';'-separated ZIPAGE_STORE_LAUNCH settings for the 8-bit rows ('default': unset)")
    args = ap.parse_args()
    launches = [x.strip() for x in args.launches.split(";") if x.strip()]
    from zipage.kernels.paged_kv import set_store_launch

    for launch in launches:  # (refused before any row runs)
        set_store_launch("" if launch == "default" else launch)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    H, D, page, L = 8, 128, 256, args.layers
    rows = []
    for B in map(int, args.requests.split(",")):
        k = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        q = torch.randn(256, H, D, device="cuda") + torch.randn(H, D, device="cuda") * 2
        qw = query_weights(q.sum(0), (q * q).sum(0), 256)
        cases = (("bf16", torch.bfloat16, False, True), ("fp8 values token-major", FP8, False, True),
                 ("fp8 values dimension-major", FP8, True, True), ("fp8 query-weighted keys", FP8, True, True),
                 ("int8 values dimension-major", INT8, True, True), ("fp8 keys only", FP8, False, False))
        for launch, (name, dtype, vdim, with_values) in [(x, c) for x in launches for c in cases]:
            if launch != launches[0] and dtype == torch.bfloat16:
                continue  # (bf16 pages take the plain store: no launch choices)
            if not with_values and "split=1" in launch:
                continue  # (keys alone: nothing to split, the same launch as without the split)
            set_store_launch("" if launch == "default" else launch)
            kw = dict(key_weights=qw) if "query-weighted" in name else {}
            kp = [torch.zeros(B, page, H, D, device="cuda", dtype=dtype) for _ in range(L)]
            vp = [value_pool((B, page, H, D), dtype, "cuda") if vdim else torch.zeros(B, page, H, D, device="cuda",
                                                                                      dtype=dtype) for _ in range(L)]
            q8 = dtype != torch.bfloat16
            ks = [torch.zeros(B, page, H, device="cuda") for _ in range(L)] if q8 else [None] * L
            vs = [torch.zeros(B, page, H, device="cuda") for _ in range(L)] if q8 else [None] * L
            slots = torch.arange(B, device="cuda") * page  # each request's page, position 0

            def step():
                for i in range(L):
                    if with_values:
                        store_kv(kp[i], slots, k, vp[i], v, ks[i], vs[i], **kw)
                    else:
                        store_kv(kp[i], slots, k, scale=ks[i])

            step()  # (compiles), then one CUDA graph of a step's stores: device time, no launch overhead
            slots.add_(1)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                step()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(args.steps):  # the next position each step (the slot update outside the timing)
                slots.add_(1)
                a.record()
                g.replay()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            times.sort()
            us = times[len(times) // 2] * 1000 / L  # the median step
            # check the last step's tokens landed (the codes of one request and layer, against a direct read)
            got = vp[-1][:, 1 + args.steps] if with_values else kp[-1][:, 1 + args.steps]
            ok = bool(got.float().abs().sum() > 0)
            rows.append(dict(requests=B, pages=name, launch=launch, us_per_layer=round(us, 2),
                             ms_per_step=round(us * L / 1000, 3), stored=ok))
            print(f"{B:>5} {name:>28} {launch:>24} {us:8.2f} us/layer {us * L / 1000:7.3f} ms/step  stored={ok}",
                  flush=True)
            out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")  # (each row: a time limit keeps what ran)
            del kp, vp, ks, vs
            torch.cuda.empty_cache()
    out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
