"""Kernel benchmark: every zipage Triton kernel against the obvious PyTorch alternative, on one GPU.

Qwen3-8B head shapes (32 query heads, 8 KV heads, head dim 128), bf16. Reports time (median of
``triton.testing.do_bench``), achieved bandwidth (minimal bytes: each input read once, each output
written once) and its fraction of the device-to-device copy bandwidth measured in the same run. The
attention kernels' outputs are checked against the alternative's (``check``: the relative error of the whole
output and of its worst row); a failed check is marked in the table and the JSON and ends the run with status
1, after the results are written. The whole-model compression rows take tens of milliseconds a call, so they
are timed over a fixed number of calls (``bench_calls``) rather than ``do_bench``'s time budget.

    python benchmarks/kernel_bench.py --out benchmarks/results/kernels.json --plot benchmarks/results/kernels.png
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch
import torch.nn.functional as F

HQ, HKV, D = 32, 8, 128
LAYERS = 36  # Qwen3-8B
DT = torch.bfloat16
ES = 2  # bytes per bf16 element


def bench(fn, warmup=10, rep=60):
    """Median milliseconds of ``fn`` (``do_bench``: ``warmup`` and ``rep`` are milliseconds of calls, not counts)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")  # milliseconds


def bench_calls(fn, warmup: int = 2, calls: int = 10) -> float:
    """Median milliseconds of ``calls`` timed calls of ``fn`` after ``warmup`` untimed ones (counts, for calls
    too slow for ``do_bench``'s millisecond budgets, which would time them once)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return sorted(times)[len(times) // 2]


REL_TOL, ROW_TOL = 2e-2, 0.1  # bf16: the whole output's relative error, and its worst row's (a query and head)


def check(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """A kernel's output against the alternative's: relative error of the whole output and of its worst row
    (the last dimension; a wrong tile of rows barely moves the whole output's error), and whether both pass."""
    try:
        from prefill_tune import row_rel_err
    except ImportError:
        from .prefill_tune import row_rel_err
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    row = row_rel_err(out, ref)
    return dict(rel_err=rel, row_rel_err=row, ok=rel < REL_TOL and row < ROW_TOL)


def decode_weight_bytes_qwen3_8b(batch: int) -> int:
    """Bytes of Qwen3-8B's bf16 weights a decode step of ``batch`` requests reads (``throughput.decode_weight_bytes``
    on the published config, built on the meta device): every weight but the untied input embedding table, of
    which only the ``batch`` rows of its tokens. 15.14e9 bytes at batch 128 (the parameters are 16.38e9)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    try:
        from engine_run import QWEN3_8B
        from throughput import decode_weight_bytes
    except ImportError:
        from .engine_run import QWEN3_8B
        from .throughput import decode_weight_bytes
    with torch.device("meta"):
        model = Qwen3ForCausalLM._from_config(Qwen3Config(**QWEN3_8B), dtype=DT)
    return decode_weight_bytes(model, batch)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    n = 1 << 30  # 2 GiB of bf16
    src = torch.randn(n, device="cuda", dtype=DT)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), rep=200)
    del src, dst
    return 2 * n * ES / ms / 1e6


def pool_for(B, ctx, page):
    per_row = -(-ctx // page)
    P = B * per_row
    k = torch.randn(P, page, HKV, D, device="cuda", dtype=DT)
    v = torch.randn(P, page, HKV, D, device="cuda", dtype=DT)
    table = torch.randperm(P, device="cuda").view(B, per_row).to(torch.int32)
    return k, v, table


def gathered_sdpa_decode(q, k, v, table, ctx):
    """The obvious alternative: gather each sequence's pages into dense K/V, then SDPA."""
    B, page = table.shape[0], k.shape[1]
    pos = torch.arange(ctx, device="cuda")
    slots = table[:, pos // page].long() * page + pos % page
    kd = k.view(-1, HKV, D)[slots].transpose(1, 2)  # [B, HKV, ctx, D]
    vd = v.view(-1, HKV, D)[slots].transpose(1, 2)
    return F.scaled_dot_product_attention(q[:, :, None, :], kd, vd, enable_gqa=True)


def run_decode(rows, bw, batches, contexts, page):
    from zipage.kernels import paged_decode_attention_triton

    for B in batches:
        for ctx in contexts:
            kv_bytes = B * ctx * HKV * D * ES * 2
            if kv_bytes * 3 > 40e9:
                continue
            torch.manual_seed(0)
            k, v, table = pool_for(B, ctx, page)
            q = torch.randn(B, HQ, D, device="cuda", dtype=DT)
            lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
            scale = D**-0.5
            ours = lambda: paged_decode_attention_triton(q, k, v, table, lens, scale, max_len_hint=ctx)  # noqa: E731
            ref = gathered_sdpa_decode(q, k, v, table, ctx)[:, :, 0]
            err = check(ours(), ref)
            t_ours = bench(ours)
            t_sdpa = bench(lambda: gathered_sdpa_decode(q, k, v, table, ctx))
            moved = kv_bytes + 2 * B * HQ * D * ES
            rows.append(dict(kernel="decode_attention", batch=B, context=ctx, page=page, ms=t_ours,
                             baseline_ms=t_sdpa, speedup=t_sdpa / t_ours, gbps=moved / t_ours / 1e6,
                             frac_copy_bw=moved / t_ours / 1e6 / bw, **err))
            del k, v, table
            torch.cuda.empty_cache()


def run_prefill(rows, bw):
    """Whole prompts through the prefill the engine runs (``paged_prefill_attention``: the second kernel, its
    default launch) and, as ``prefill_attention_v1``, the first kernel; 256-token pages, the engine's default."""
    from zipage.kernels import paged_prefill_attention, paged_prefill_attention_triton

    for B, n in ((1, 4096), (4, 2048), (16, 512)):
        page = 256
        k, v, table = pool_for(B, n, page)
        q = torch.randn(B * n, HQ, D, device="cuda", dtype=DT)
        cu = torch.arange(0, B + 1, device="cuda", dtype=torch.int32) * n
        lens = torch.full((B,), n, dtype=torch.int32, device="cuda")
        kernels = {
            "prefill_attention": lambda: paged_prefill_attention(q, k, v, table, cu, lens, D**-0.5, max_q_len=n),
            "prefill_attention_v1": lambda: paged_prefill_attention_triton(q, k, v, table, cu, lens, D**-0.5,
                                                                           max_q_len=n),
        }

        def sdpa():
            pos = torch.arange(n, device="cuda")
            slots = table[:, pos // page].long() * page + pos % page
            kd = k.view(-1, HKV, D)[slots].transpose(1, 2)
            vd = v.view(-1, HKV, D)[slots].transpose(1, 2)
            qd = q.view(B, n, HQ, D).transpose(1, 2)
            return F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)

        ref = sdpa().transpose(1, 2).reshape(B * n, HQ, D)
        t_sdpa = bench(sdpa)
        flops = 4 * B * n * n / 2 * HQ * D
        for name, ours in kernels.items():
            err = check(ours(), ref)
            t_ours = bench(ours)
            rows.append(dict(kernel=name, batch=B, context=n, page=page, ms=t_ours, baseline_ms=t_sdpa,
                             speedup=t_sdpa / t_ours, tflops=flops / t_ours / 1e9, **err))


def run_store(rows, bw):
    from zipage.kernels import store_kv_reference, store_kv_triton

    for n in (128, 16384):
        page = 64
        P = -(-n // page) + 8
        kc = torch.zeros(P, page, HKV, D, device="cuda", dtype=DT)
        vc = torch.zeros_like(kc)
        slots = torch.randperm(P * page, device="cuda")[:n].view(1, n)
        k = torch.randn(1, n, HKV, D, device="cuda", dtype=DT)
        v = torch.randn_like(k)
        ours = lambda: store_kv_triton(kc, slots, k, vc, v)  # noqa: E731
        ref = lambda: (store_kv_reference(kc, slots, k), store_kv_reference(vc, slots, v))  # noqa: E731
        moved = 4 * n * HKV * D * ES
        t_ours, t_ref = bench(ours), bench(ref)
        rows.append(dict(kernel="store_kv", tokens=n, ms=t_ours, baseline_ms=t_ref, speedup=t_ref / t_ours,
                         gbps=moved / t_ours / 1e6, frac_copy_bw=moved / t_ours / 1e6 / bw))


def _sequence(S, page):
    k = torch.randn(1, HKV, S, D, device="cuda", dtype=DT)
    q = torch.randn(1, HQ, 16, D, device="cuda", dtype=DT)
    km = torch.ones(1, S, dtype=torch.bool, device="cuda")
    return q, k, km


def run_scoring(rows, bw):
    from zipage.kernels import (
        lightning_redundancy_triton,
        redundancy_scores_reference,
        window_scores_reference,
        window_scores_triton,
    )

    for S in (2304, 32768):
        q, k, km = _sequence(S, 256)
        qm = km[:, -16:]
        prev = torch.rand(1, HKV, S, device="cuda")
        ours = lambda: window_scores_triton(q, k, km, qm, D**-0.5, prev=prev, decay=0.8)  # noqa: E731
        ref = lambda: window_scores_reference(q, k, km, qm, D**-0.5, prev=prev, decay=0.8)  # noqa: E731
        moved = HKV * S * D * ES + 2 * HKV * S * 4  # keys read once, prev read, out written (the minimal bytes)
        t_ours, t_ref = bench(ours), bench(ref)
        rows.append(dict(kernel="window_score", context=S, ms=t_ours, baseline_ms=t_ref, speedup=t_ref / t_ours,
                         gbps=moved / t_ours / 1e6, frac_copy_bw=moved / t_ours / 1e6 / bw))
        for block in (16, 256):
            ours = lambda: lightning_redundancy_triton(k, km, block)  # noqa: E731
            ref = lambda: redundancy_scores_reference(k, km, block)  # noqa: E731
            moved = HKV * S * D * ES + HKV * S * 4
            t_ours, t_ref = bench(ours), bench(ref)
            rows.append(dict(kernel="lightning_redundancy", context=S, page=block, ms=t_ours, baseline_ms=t_ref,
                             speedup=t_ref / t_ours, gbps=moved / t_ours / 1e6, frac_copy_bw=moved / t_ours / 1e6 / bw))


def run_compact(rows, bw):
    from zipage.kernels import compact_reference, compact_triton, slot_indices

    for B, S, keep_n, page in ((1, 2304, 2048, 256), (1, 2304, 2048, 16), (16, 2304, 2048, 64)):
        per_row = -(-S // page)
        P = B * per_row
        k = torch.randn(P, page, HKV, D, device="cuda", dtype=DT)
        v = torch.randn_like(k)
        st = torch.rand(P, page, HKV, device="cuda")
        table = torch.randperm(P, device="cuda").view(B, per_row)
        slots = slot_indices(table, 0, S, page)
        keep = torch.rand(B, HKV, S, device="cuda").topk(keep_n, dim=-1).indices.sort(dim=-1).values
        # each timed call compacts the same pool again: a fixed point after the first call moves the same bytes
        ours = lambda: compact_triton([k, v, st], slots, keep)  # noqa: E731
        ref = lambda: compact_reference([k, v, st], slots, keep)  # noqa: E731
        moved = 2 * B * keep_n * HKV * (2 * D * ES + 4)
        t_ours, t_ref = bench(ours), bench(ref)
        rows.append(dict(kernel="compact", batch=B, context=S, keep=keep_n, page=page, ms=t_ours, baseline_ms=t_ref,
                         speedup=t_ref / t_ours, gbps=moved / t_ours / 1e6, frac_copy_bw=moved / t_ours / 1e6 / bw))


def run_compression(rows, bw):
    """One sequence compressed from budget + buffer to budget in every layer (score, redundancy, top-k,
    compaction), through the library's own compress_layers on pools stacked over layers, ``stride``
    layers per batch; against the PyTorch reference path of the same code."""
    import sys

    from zipage import ZipageConfig
    from zipage.compress import LayerPages, compress_layers
    from zipage.kernels import slot_indices
    from zipage.scoring import get_scorer

    budget, page = 2048, 256
    S = budget + page
    cfg = ZipageConfig(budget=budget, page_size=page)
    scorer = get_scorer("zipage", cfg)
    per_row = -(-S // page)
    k = torch.randn(LAYERS, per_row, page, HKV, D, device="cuda", dtype=DT)
    pools = LayerPages(k, torch.randn_like(k), torch.rand(LAYERS, per_row, page, HKV, device="cuda"))
    slots = slot_indices(torch.arange(per_row, device="cuda")[None], 0, S, page)
    km = torch.ones(LAYERS, 1, S, dtype=torch.bool, device="cuda")
    q = torch.randn(LAYERS, 1, HQ, 16, D, device="cuda", dtype=DT)

    def compress_all(stride):
        for l0 in range(0, LAYERS, stride):
            sl = slice(l0, min(l0 + stride, LAYERS))
            compress_layers(LayerPages(pools.keys[sl], pools.values[sl], pools.state[sl]), slots, km[sl], q[sl],
                            scorer, k=budget, window=16, sinks=0, scaling=D**-0.5, page_size=page, first=False)

    # the package exports functions named like some of its modules: take the modules themselves
    mods = [sys.modules[f"zipage.kernels.{name}"] for name in ("compact", "paged_kv", "redundancy", "window_score")]
    saved = [m.use_triton for m in mods]
    for stride in (1, 8, LAYERS):
        t_ours = bench_calls(lambda: compress_all(stride), warmup=3, calls=15)
        for m in mods:
            m.use_triton = lambda *t: False
        t_ref = bench_calls(lambda: compress_all(stride), warmup=2, calls=7)
        for m, f in zip(mods, saved):
            m.use_triton = f
        rows.append(dict(kernel="compression_all_layers", layers=LAYERS, layer_stride=stride, budget=budget,
                         page=page, context=S, ms=t_ours, baseline_ms=t_ref, speedup=t_ref / t_ours))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/kernels.json")
    ap.add_argument("--plot", default="benchmarks/results/kernels.png")
    ap.add_argument("--quick", action="store_true", help="a smaller grid")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    t0 = time.time()
    bw = copy_bandwidth()
    rows: list[dict] = []
    run_decode([], bw, (8,), (2048,), page=64)  # untimed: the first timed row would pay the warm-up (clocks, caches)
    batches = (1, 8, 64, 128) if not args.quick else (1, 64)
    contexts = (512, 2048, 8192, 32768) if not args.quick else (2048,)
    run_decode(rows, bw, batches, contexts, page=64)
    for page in (16, 256):
        run_decode(rows, bw, (64,), (8192,), page=page)
    run_prefill(rows, bw)
    run_store(rows, bw)
    run_scoring(rows, bw)
    run_compact(rows, bw)
    run_compression(rows, bw)
    # one decode step of a 128-sequence batch: attention of every layer at budget + buffer, plus the weights
    dec = [r for r in rows if r["kernel"] == "decode_attention" and r["batch"] == 128 and r["context"] == 2048]
    comp = [r for r in rows if r["kernel"] == "compression_all_layers" and r["layer_stride"] == 8]
    summary = {"copy_bandwidth_gbps": bw, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "python": platform.python_version(), "seconds": time.time() - t0}
    if dec and comp:
        attn_step = dec[0]["ms"] * LAYERS
        # Qwen3-8B bf16 weights a step of 128 reads once at copy bandwidth (ms): the untied input embedding table
        # left out but for its 128 rows (15.14e9 bytes; the 16.4e9 used before counted the table whole)
        weights_floor = decode_weight_bytes_qwen3_8b(128) / bw / 1e6
        summary.update(decode_step_attention_ms_b128=attn_step, decode_step_floor_ms_b128=attn_step + weights_floor,
                       compression_one_sequence_ms=comp[0]["ms"],
                       compression_vs_attention_step=comp[0]["ms"] / attn_step)
    import triton

    summary["triton"] = triton.__version__
    failed = [r for r in rows if r.get("ok") is False]
    summary["checks_failed"] = len(failed)
    result = {"summary": summary, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    try:
        plot(rows, bw, args.plot)
    except Exception as err:  # pragma: no cover
        print("plot failed:", err)
    print_table(rows, summary)
    if failed:
        raise SystemExit(f"{len(failed)} kernel output(s) disagree with the alternative: " + "; ".join(
            f"{r['kernel']} B={r.get('batch')} ctx={r.get('context')}: rel {r['rel_err']:.3g}, worst row "
            f"{r['row_rel_err']:.3g}" for r in failed))


def plot(rows, bw, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    dec = [r for r in rows if r["kernel"] == "decode_attention" and r["page"] == 64]
    for B in sorted({r["batch"] for r in dec}):
        rs = sorted((r for r in dec if r["batch"] == B), key=lambda r: r["context"])
        a.plot([r["context"] for r in rs], [r["frac_copy_bw"] * 100 for r in rs], "o-", label=f"zipage B={B}")
        a.plot([r["context"] for r in rs], [r["frac_copy_bw"] * 100 * r["ms"] / r["baseline_ms"] for r in rs], "x--",
               alpha=0.6, label=f"gathered SDPA B={B}")
    a.set_xscale("log", base=2)
    a.axhline(70, color="gray", lw=0.8, ls=":")
    a.set_xlabel("context (tokens)")
    a.set_ylabel("% of measured copy bandwidth")
    a.set_title(f"paged decode attention (Qwen3-8B heads, bf16); copy BW {bw / 1000:.2f} TB/s")
    a.legend(fontsize=7, ncol=2)
    other = [r for r in rows if r["kernel"] != "decode_attention"]
    labels = [f"{r['kernel']}\n{r.get('context', r.get('tokens', ''))}" + (f" p{r['page']}" if "page" in r else "")
              + (f" stride {r['layer_stride']}" if "layer_stride" in r else "") + (f" B{r['batch']}" if "batch" in r else "")
              for r in other]
    b.barh(range(len(other)), [r["speedup"] for r in other], color="tab:green")
    b.set_yticks(range(len(other)), labels, fontsize=6)
    b.set_xscale("log")
    b.axvline(1, color="gray", lw=0.8)
    b.set_xlabel("speed-up over the PyTorch alternative (x)")
    b.set_title("other kernels")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def print_table(rows, summary):
    print(f"\ncopy bandwidth {summary['copy_bandwidth_gbps']:.0f} GB/s on {summary['device']}")
    print(f"{'kernel':24s} {'B':>4s} {'ctx':>6s} {'page':>4s} {'ms':>8s} {'base ms':>8s} {'x':>6s} {'GB/s':>7s} {'%bw':>5s}")
    for r in rows:
        print(f"{r['kernel']:24s} {r.get('batch', r.get('tokens', r.get('layer_stride', ''))):>4} {r.get('context', ''):>6} "
              f"{r.get('page', ''):>4} {r['ms']:8.3f} {r['baseline_ms']:8.3f} {r['speedup']:6.2f} "
              f"{r.get('gbps', math.nan):7.0f} {100 * r.get('frac_copy_bw', math.nan):5.1f}"
              f"{'  ! disagrees' if r.get('ok') is False else ''}")
    for k, v in summary.items():
        if isinstance(v, float):
            print(f"{k}: {v:.3f}")


if __name__ == "__main__":
    main()
