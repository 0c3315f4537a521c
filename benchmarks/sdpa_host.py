"""Host time of one decode-step attention call, by K/V layout and SDPA backend (CUDA).

generate() on a GPU at batch 16 is bound by the host's launch work. This times, per call, SDPA with
one query per sequence over K/V whose length grows by one each call (as in decode), for:
``contiguous`` (a fresh [B, Hkv, L, D] tensor each step, as DynamicCache's cat gives),
``head-major rows`` ([B, Hkv, capacity, D] storage sliced to L) and ``token-major rows``
([B, capacity, Hkv, D] storage sliced and transposed); each under the default backend choice and held
to cuDNN, FlashAttention and memory-efficient attention; and the paged decode kernel and the paged
store on the same rows.

    python benchmarks/sdpa_host.py
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


def per_call_us(fn, lengths) -> tuple[float, float]:
    """(host microseconds per call, wall microseconds per call incl. the device), over lengths."""
    for n in lengths[:3]:
        fn(n)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for n in lengths:
        fn(n)
    host = time.perf_counter() - t
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    return 1e6 * host / len(lengths), 1e6 * wall / len(lengths)


def main(argv=None) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from zipage.kernels import paged_decode_attention, store_kv

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--heads", default="16,8", help="query heads, KV heads")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--start", type=int, default=300)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("sdpa_host times CUDA launches: it needs a CUDA GPU")
    B, D = args.batch, args.dim
    Hq, Hkv = (int(x) for x in args.heads.split(","))
    dev, dt = "cuda", torch.bfloat16
    cap = -(-(args.start + args.steps + 16) // 16) * 16  # whole 16-token pages
    lengths = list(range(args.start, args.start + args.steps))
    q = torch.randn(B, Hq, 1, D, device=dev, dtype=dt)
    head_major = torch.randn(B, Hkv, cap, D, device=dev, dtype=dt)
    token_major = torch.randn(B, cap, Hkv, D, device=dev, dtype=dt)
    full = {n: head_major[:, :, :n].contiguous() for n in lengths}  # (built untimed: DynamicCache's cat result)
    layouts = {
        "contiguous": lambda n: full[n],
        "head-major rows": lambda n: head_major[:, :, :n],
        "token-major rows": lambda n: token_major[:, :n].transpose(1, 2),
    }
    backends = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    rows = []
    for lname, kv in layouts.items():
        for bname, backend in backends.items():
            def call(n, kv=kv):
                k = kv(n)
                return F.scaled_dot_product_attention(q, k, k, enable_gqa=True)

            def run(n, call=call, backend=backend):
                if backend is None:
                    return call(n)
                with sdpa_kernel(backend):
                    return call(n)
            try:
                host, wall = per_call_us(run, lengths)
                rows.append(dict(layout=lname, backend=bname, host_us=host, wall_us=wall))
            except Exception as err:  # a backend that refuses this layout
                rows.append(dict(layout=lname, backend=bname, error=f"{type(err).__name__}: {err}"[:160]))
    # the paged path on token-major rows: one store of the new token, one paged decode call
    page = 16
    pages = token_major.view(B * cap // page, page, Hkv, D)
    table = torch.arange(B * cap // page, device=dev, dtype=torch.int32).view(B, cap // page)
    qd = q[:, :, 0].contiguous()
    new = torch.randn(B, Hkv, D, device=dev, dtype=dt)

    def paged(n):
        lens = torch.full((B,), n, dtype=torch.int32, device=dev)
        return paged_decode_attention(qd, pages, pages, table, lens, D**-0.5, max_len_hint=n)

    def store(n):
        store_kv(pages, torch.arange(B, device=dev) * cap + n, new, pages, new)

    for name, fn in (("paged decode kernel", paged), ("paged store", store)):
        try:
            host, wall = per_call_us(fn, lengths)
            rows.append(dict(layout="token-major rows", backend=name, host_us=host, wall_us=wall))
        except Exception as err:
            rows.append(dict(layout="token-major rows", backend=name, error=f"{type(err).__name__}: {err}"[:160]))
    print(f"B {B}, heads {Hq}/{Hkv}, D {D}, K/V length {args.start}..{lengths[-1]} (one more each call); "
          "microseconds per call")
    print(f"{'layout':18s} {'backend':20s} {'host':>8s} {'wall':>8s}")
    for r in rows:
        if "error" in r:
            print(f"{r['layout']:18s} {r['backend']:20s} {r['error']}")
        else:
            print(f"{r['layout']:18s} {r['backend']:20s} {r['host_us']:8.1f} {r['wall_us']:8.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
