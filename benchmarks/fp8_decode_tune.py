"""The paged decode kernel on FP8 pages against bf16 pages, with launch variants (GPU; one call).

At Qwen3-8B's shapes (32 query heads over 8 KV heads, head dim 128, 256-token pages) and the
engine's decode batch sizes, it times the split kernel plus its merge and prints milliseconds and
the share of the copy bandwidth it moves (keys, values and, for FP8, their float32 scales):

* bf16 pages, the general kernel (the reference point: it runs at the copy bandwidth);
* FP8 pages, the general kernel (``kernel=general``, e4m3 -> bf16 casts in the tile loop);
* FP8 pages, ``kernels/paged_decode_fp8.py``: by default its fastest earlier choice (fp16 dots,
  gather loads) against tiles read from one page (``load=page``: a page-table read per tile, a
  scalar base) and through tensor descriptors (``load=tma``), each with fp16 dots and with FP8
  tensor cores on the stored codes (``convert=fp8mma``), over a few tiles and launches, and
  tensor-descriptor tiles with head-major scale pools (names ending ``/hm``), a partial tile's stale
  value rows zeroed as bytes, after conversion or left in place (``/bytes``, ``/operand``, ``/none``),
  and values stored dimension-major (``/vdim``, the engine's layout: each page ``[H_kv, D, page]``)
  over launches and register caps (``/r128``, ``/r96``);
  ``--all`` instead sweeps every ``convert`` (bf16 / fp16 / bits / fp8mma) x grid order
  (``head_fast``) x launch with gather loads, and head-major scale pools.

Each FP8 row's output is checked against the general kernel's (relative error). The fastest FP8
variant at the largest batch is written to ``--best-env`` as ``ZIPAGE_FP8_DECODE=...``, so the
same GPU call can run the engine with it:

    python benchmarks/fp8_decode_tune.py [--out benchmarks/results/fp8_decode_tune.json] [--best-env F]
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


FP8_LAUNCHES = [  # (block_n, num_warps, num_stages)
    (128, 4, 2), (128, 4, 3), (64, 4, 3), (256, 8, 3),
]


LOAD_LAUNCHES = [  # (block_n, num_warps, num_stages) for page-base and tensor-descriptor tiles
    (128, 4, 2), (128, 4, 3), (128, 4, 4), (128, 8, 3), (128, 2, 3), (64, 4, 4),
]


def direct_call(q, kq, vq, ks, vs, table, lens, scale, ctx, choice, launch, head_major=False, v_dim_major=False):
    """The 8-bit kernel called below the library's wrapper (which takes the pools' layouts only): with
    head-major scale pools (one head's scales contiguous along the page) or values stored dimension-major
    (``[pages, H_kv, D, page]``: ``v_dim_major``)."""
    from zipage.kernels.paged_attention import LOG2E, _merge_splits, decode_num_splits
    from zipage.kernels.paged_decode_fp8 import launch_decode_split_fp8

    if head_major:
        ks = ks.permute(0, 2, 1).contiguous().permute(0, 2, 1)
        vs = vs.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    if v_dim_major:  # the same logical [pages, page, H_kv, D] pool, each page stored [H_kv, D, page]
        vq = vq.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    B, Hq, D = q.shape
    splits = decode_num_splits(B, kq.shape[2], ctx, torch.cuda.get_device_properties(0).multi_processor_count,
                               launch["block_n"])
    starts = torch.zeros(B, dtype=torch.int32, device=q.device)

    def run():
        mid_o = torch.empty(B, Hq, splits, D, dtype=torch.float32, device=q.device)
        mid_lse = torch.empty(B, Hq, splits, dtype=torch.float32, device=q.device)
        out = torch.empty_like(q)
        launch_decode_split_fp8(q, kq, vq, ks, vs, table, lens, starts, mid_o, mid_lse, scale * LOG2E,
                                num_splits=splits, **launch, **choice)
        _merge_splits(mid_o, mid_lse, out, None, splits)
        return out
    return run


def main() -> None:
    from zipage.kernels.fp8 import INT8, quantize_reference
    from zipage.kernels.paged_attention import paged_decode_attention_triton

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/fp8_decode_tune.json")
    ap.add_argument("--best-env", default=None, help="write the fastest FP8 variant as ZIPAGE_FP8_DECODE=... here")
    ap.add_argument("--bandwidth", type=float, default=4.25e12)
    ap.add_argument("--batches", default="256,512")
    ap.add_argument("--ctx", default="2176", help="comma list of context lengths (every request's)")
    ap.add_argument("--all", action="store_true", help="every conversion x grid order x launch (slower)")
    ap.add_argument("--fp8mma", action="store_true", help="also FP8 tensor cores with page / tma loads")
    ap.add_argument("--match", default=None, help="comma list: time only the general kernels and the variants "
                    "whose name contains one of these (e.g. int8)")
    args = ap.parse_args()
    hq, hkv, d, page = 32, 8, 128, 256
    rows = []
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.ctx.split(",")]
    for ctx, batch in [(c, b) for c in contexts for b in batches]:
        pages_per = -(-ctx // page)
        n_pages = batch * pages_per
        k = torch.randn(n_pages, page, hkv, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        table = torch.randperm(n_pages, device="cuda", dtype=torch.int32).view(batch, pages_per)
        lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
        q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)
        kq, ks = quantize_reference(k)
        vq, vs = quantize_reference(v)
        del k, v
        k, v = kq.float().mul_(ks[..., None]).bfloat16(), vq.float().mul_(vs[..., None]).bfloat16()
        scale = d ** -0.5
        base = batch * ctx * hkv * d * 2  # bytes of bf16 keys (or of FP8 keys and values)
        variants = [("bf16", "general", dict(block_n=64, num_warps=4, num_stages=2), None),
                    ("fp8", "general", dict(block_n=128, num_warps=4, num_stages=3), None),
                    ("int8", "general", dict(block_n=128, num_warps=4, num_stages=3), None)]
        kq8, ks8 = quantize_reference(k, INT8)
        vq8, vs8 = quantize_reference(v, INT8)
        if args.all:  # the sweep of benchmarks/results/fp8/fp8_decode_variants.json
            for convert in ("bf16", "fp16", "bits"):
                for head_fast in (0, 1):
                    for block_n, warps, stages in FP8_LAUNCHES:
                        variants.append(("fp8", f"fp8/{convert}/hf{head_fast}", dict(
                            block_n=block_n, num_warps=warps, num_stages=stages),
                            dict(convert=convert, head_fast=head_fast)))
            for convert in ("fp16", "bits"):
                variants.append(("fp8", f"fp8/{convert}/hf1/hm", dict(block_n=128, num_warps=4, num_stages=3),
                                 dict(convert=convert, head_fast=1, head_major=True)))
            for head_fast in (0, 1):
                for block_n, warps, stages in FP8_LAUNCHES if head_fast else FP8_LAUNCHES[:1]:
                    variants.append(("fp8", f"fp8/fp8mma/hf{head_fast}", dict(block_n=block_n, num_warps=warps,
                                     num_stages=stages), dict(convert="fp8mma", head_fast=head_fast)))
        else:  # the best of that sweep (gather loads) against page-base and tensor-descriptor tiles
            variants.append(("fp8", "fp8/fp16/hf1", dict(block_n=128, num_warps=4, num_stages=2),
                             dict(convert="fp16", head_fast=1)))
            for load in ("page", "tma"):
                for convert in ("fp16", "fp8mma") if args.fp8mma else ("fp16",):
                    for block_n, warps, stages in LOAD_LAUNCHES if load == "tma" else LOAD_LAUNCHES[:1]:
                        variants.append(("fp8", f"fp8/{convert}/hf1/{load}", dict(
                            block_n=block_n, num_warps=warps, num_stages=stages),
                            dict(convert=convert, head_fast=1, load=load)))
                variants.append(("int8", f"int8/fp16/hf1/{load}", dict(block_n=128, num_warps=4, num_stages=3),
                                 dict(convert="fp16", head_fast=1, load=load)))
            variants.append(("int8", "int8/fp16/hf1/tma/noptx", dict(block_n=128, num_warps=4, num_stages=3),
                             dict(convert="fp16", head_fast=1, load="tma", int8_ptx=False)))  # (per-element form)
            for head_fast in (1, 0):  # head-major scale pools: a tile's 128 scales in 16 sectors, not 128
                for stages in (3, 4):
                    variants.append(("fp8", f"fp8/fp16/hf{head_fast}/tma/hm", dict(block_n=128, num_warps=4,
                                     num_stages=stages), dict(convert="fp16", head_fast=head_fast, load="tma",
                                                              head_major=True)))
            for kv in ("fp8", "int8"):  # a partial tile's stale value rows, and values stored dimension-major
                for edge, vdim in (("none", False), ("bytes", True), ("none", True)):
                    variants.append((kv, f"{kv}/fp16/hf1/tma/{edge}" + "/vdim" * vdim, dict(
                        block_n=128, num_warps=4, num_stages=3), dict(convert="fp16", head_fast=1, load="tma",
                                                                     v_edge=edge, v_dim_major=vdim)))
                # the engine's launch (values dimension-major) over launches, and with a register cap (168 -> 128:
                # four programs a multiprocessor instead of three; ptxas spills 48-64 bytes, decode_compile.py)
                for block_n, warps, stages in LOAD_LAUNCHES:
                    if (block_n, warps, stages) != (128, 4, 3):
                        variants.append((kv, f"{kv}/fp16/hf1/tma/none/vdim", dict(
                            block_n=block_n, num_warps=warps, num_stages=stages), dict(
                                convert="fp16", head_fast=1, load="tma", v_edge="none", v_dim_major=True)))
                for cap in (128, 96):
                    variants.append((kv, f"{kv}/fp16/hf1/tma/none/vdim/r{cap}", dict(
                        block_n=128, num_warps=4, num_stages=3), dict(
                            convert="fp16", head_fast=1, load="tma", v_edge="none", v_dim_major=True, maxnreg=cap)))
            # stale value rows converted as any other (v_edge="plain": pools that hold no NaN code), FP8's launches
            for block_n, warps, stages, cap in ((128, 4, 3, None), (128, 4, 2, None), (128, 4, 4, None),
                                                (128, 8, 3, None), (128, 4, 3, 128), (128, 2, 3, None),
                                                (128, 2, 2, None), (128, 2, 4, None)):
                variants.append(("fp8", "fp8/fp16/hf1/tma/plain/vdim" + (f"/r{cap}" if cap else ""), dict(
                    block_n=block_n, num_warps=warps, num_stages=stages), dict(
                        convert="fp16", head_fast=1, load="tma", v_edge="plain", v_dim_major=True,
                        **({"maxnreg": cap} if cap else {}))))
        if args.match:
            keys = args.match.split(",")
            variants = [x for x in variants if x[1] == "general" or any(m in x[1] for m in keys)]
        want = paged_decode_attention_triton(q, kq, vq, table, lens, scale, max_len_hint=ctx, k_scale=ks, v_scale=vs,
                                             fp8_kernel=dict(convert="general"), block_n=128, num_stages=3).float()
        for kv, kernel, launch, choice in variants:
            if choice is not None and (choice.get("head_major") or choice.get("v_dim_major")):
                pools = (kq, vq, ks, vs) if kv == "fp8" else (kq8, vq8, ks8, vs8)
                fn = direct_call(q, *pools, table, lens, scale, ctx,
                                 {k_: v_ for k_, v_ in choice.items() if k_ not in ("head_major", "v_dim_major")},
                                 launch, head_major=bool(choice.get("head_major")),
                                 v_dim_major=bool(choice.get("v_dim_major")))
                nbytes = base + batch * ctx * hkv * 4 * 2
            elif kv == "fp8":
                fn = lambda: paged_decode_attention_triton(  # noqa: E731
                    q, kq, vq, table, lens, scale, max_len_hint=ctx, k_scale=ks, v_scale=vs,
                    fp8_kernel=dict(convert="general") if choice is None else dict(choice, **launch),
                    **({} if choice is not None else launch))
                nbytes = base + batch * ctx * hkv * 4 * 2
            elif kv == "int8":  # (the general kernel; its error is INT8's rounding of the FP8-exact pages)
                fn = lambda: paged_decode_attention_triton(  # noqa: E731
                    q, kq8, vq8, table, lens, scale, max_len_hint=ctx, k_scale=ks8, v_scale=vs8,
                    fp8_kernel=dict(convert="general") if choice is None else dict(choice, **launch),
                    **({} if choice is not None else launch))
                nbytes = base + batch * ctx * hkv * 4 * 2
            else:
                fn = lambda: paged_decode_attention_triton(  # noqa: E731
                    q, k, v, table, lens, scale, max_len_hint=ctx, **launch)
                nbytes = base * 2
            try:
                err = ((fn().float() - want).norm() / want.norm()).item()
                ms = timed(fn)
            except Exception as e:  # noqa: BLE001 (a variant that does not compile)
                print(f"batch {batch} {kv} {kernel} {launch}: {e!r}"[:300])
                continue
            rows.append(dict(batch=batch, ctx=ctx, kv=kv, kernel=kernel, **launch, choice=choice, ms=round(ms, 4),
                             bw_share=round(nbytes / (ms * 1e-3) / args.bandwidth, 3), rel_err=round(err, 5)))
        del k, v, kq, vq, ks, vs, kq8, vq8, ks8, vs8
        torch.cuda.empty_cache()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"rows": rows}, indent=1) + "\n")  # (what a timeout leaves)
    out = {"rows": rows}
    fp8 = [r for r in rows if r["kv"] == "fp8" and r["choice"] is not None and r["batch"] == batches[-1]
           and r["ctx"] == contexts[-1] and r["rel_err"] < 2e-2 and not r["choice"].get("head_major")
           and not r["choice"].get("v_dim_major")]
    # (the engine's pools are token-major)
    if fp8:
        best = min(fp8, key=lambda r: r["ms"])
        env = ",".join([f"{k}={v}" for k, v in best["choice"].items()]
                       + [f"{k}={best[k]}" for k in ("block_n", "num_warps", "num_stages")])
        out["best"] = dict(best, env=env)
        if args.best_env:
            Path(args.best_env).write_text(f"ZIPAGE_FP8_DECODE={env}\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"{'ctx':>5} {'batch':>5} {'kv':>4} {'kernel':>22} {'block_n':>7} {'warps':>5} {'stages':>6} {'ms':>8} "
          f"{'bw':>5} {'err':>8}")
    for r in rows:
        print(f"{r['ctx']:>5} {r['batch']:>5} {r['kv']:>4} {r['kernel']:>22} {r['block_n']:>7} {r['num_warps']:>5} "
              f"{r['num_stages']:>6} {r['ms']:>8.3f} {r['bw_share']:>5.2f} {r['rel_err']:>8.1e}")
    if "best" in out:
        print(f"fastest FP8 variant at batch {batches[-1]}: {out['best']['env']} ({out['best']['ms']:.3f} ms)")


if __name__ == "__main__":
    main()
