"""Whole prompts through cuDNN's ragged attention (``kernels/cudnn_prefill.py``) against gather + SDPA and the
Triton prefill kernel, on one GPU, in one call (needs ``pip install nvidia-cudnn-frontend``).

The cases and the baseline are ``benchmarks/prefill_tune.py``'s (Qwen3-8B heads, bf16): whole prompts of one
length a case, and ragged prompts. For each case: the baseline's ms (gather + SDPA, one call per length; and
its fastest other formulation), the Triton kernel's default launch, and ``cudnn-ragged``: its first call (the
graph's build included, wall ms), then its time, its host time per call, and whether it agrees with the
baseline. Then the same graph reused for other lengths under the same bucket, and a batch with a zero-length
sequence.

    python3 benchmarks/cudnn_prefill_probe.py --out $OUT/cudnn_prefill_probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prefill_tune as pt  # noqa: E402

try:
    from zipage.kernels import cudnn_prefill as cp
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kernels import cudnn_prefill as cp


def host_us(fn, n: int = 50) -> float:
    """Host microseconds per call (launches queued, one synchronize at the end, not counted)."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    dt = time.perf_counter() - t
    torch.cuda.synchronize()
    return dt / n * 1e6


def versions():
    """The ``cudnn`` module (None where it does not load) and what ran: the GPU, torch, cuDNN as torch sees it,
    the frontend and the cuDNN library it calls."""
    cudnn = cp._module()
    return cudnn, dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                       torch_cudnn=torch.backends.cudnn.version(),
                       frontend=getattr(cudnn, "__version__", None) if cudnn else None,
                       backend=cudnn.backend_version() if cudnn else None)


def start(doc: str, out: str, argv=None):
    """A cuDNN benchmark's opening: its ``--out`` (default ``out``) parsed, the versions printed; returns
    ``(args, cudnn, info)``."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--out", default=out)
    args = ap.parse_args(argv)
    cudnn, info = versions()
    print(info, flush=True)
    return args, cudnn, info


def main(argv=None) -> int:
    args, cudnn, info = start(__doc__, "benchmarks/results/cudnn_prefill_probe.json", argv)
    if cudnn is None:
        import importlib

        try:
            importlib.import_module("cudnn").backend_version()
        except Exception:
            traceback.print_exc()
        return 1
    rows = []
    prefill = cp.CudnnPrefill(torch.device("cuda"))
    tuned = cp.CudnnPrefill(torch.device("cuda"), autotune=True)  # (every plan timed, the fastest kept)
    gen = torch.Generator().manual_seed(0)
    cases = [(name, [n] * B) for name, B, n, nq in pt.CASES if n == nq]
    for name, B, lo, hi in pt.RAGGED:
        cases.append((name, torch.randint(lo, hi + 1, (B,), generator=gen).tolist()))
    cfg = pt.v2.parse_config("m64n64w4s3-tma")
    for name, lens in cases:
        step = pt.Step(lens, lens)
        k, v = step.fresh_kv()
        lens_t = step.lens
        run = lambda: prefill(step.q, k, v, step.cu, lens_t, step.max_q, step.scale)  # noqa: E731
        ref = step.packed(step.baseline())
        row = dict(case=name, lens=lens, baseline_ms=pt.bench(step.baseline))
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
            row["baseline_cudnn_ms"] = pt.bench(step.baseline)
        row["best_baseline_ms"] = min(row["baseline_ms"], row["baseline_cudnn_ms"])
        row["triton_ms"] = pt.bench(lambda: step.run_v2(cfg))
        try:
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = run()
            torch.cuda.synchronize()
            row["first_call_ms"] = (time.perf_counter() - t) * 1000
            ok, err = pt.agrees(out, ref)
            row.update(ok=ok, **err)
            row["cudnn_ms"] = pt.bench(run)
            row["cudnn_host_us"] = host_us(run)
            row["ratio_cudnn"] = row["best_baseline_ms"] / row["cudnn_ms"]
            run_t = lambda: tuned(step.q, k, v, step.cu, lens_t, step.max_q, step.scale)  # noqa: E731
            ok_t, err_t = pt.agrees(run_t(), ref)
            row.update(tuned_ok=ok_t, tuned_err=err_t, cudnn_tuned_ms=pt.bench(run_t))
            row["ratio_tuned"] = row["best_baseline_ms"] / row["cudnn_tuned_ms"]
            # the three alternated, three rounds of 60 ms each: medians (the single runs above are one window each)
            alt: dict[str, list] = {"baseline": [], "cudnn": [], "tuned": []}
            base = step.baseline if row["baseline_ms"] <= row["baseline_cudnn_ms"] else lambda: step.baseline("cudnn")
            for _ in range(3):
                for how, fn in (("baseline", base), ("cudnn", run), ("tuned", run_t)):
                    alt[how].append(pt.bench(fn, rep=60))
            row["alternated_ms"] = {how: sorted(x)[1] for how, x in alt.items()}
            row["alt_ratio_cudnn"] = row["alternated_ms"]["baseline"] / row["alternated_ms"]["cudnn"]
            row["alt_ratio_tuned"] = row["alternated_ms"]["baseline"] / row["alternated_ms"]["tuned"]
            key = tuned.key(step.q, k, v, len(lens), step.max_q, step.scale)
            row.update(plans=tuned.plan_times[key], chosen_plan=tuned.chosen_plan[key])
        except Exception as e:
            row["error"] = "".join(traceback.format_exception(e))[-1500:]
            print(row["error"], flush=True)
        row["ratio_triton"] = row["best_baseline_ms"] / row["triton_ms"]
        rows.append(row)
        print(json.dumps({k: (round(x, 4) if isinstance(x, float) else x) for k, x in row.items()
                          if k != "lens"}), flush=True)
        del step
    # one graph reused for other lengths in its bucket; a zero-length sequence in a batch
    extra = {}
    try:
        for lens in ([700, 1000, 900, 1024], [513, 1024, 600, 800], [1000, 0, 1024, 5]):
            live = [n for n in lens if n]
            step = pt.Step(live, live)
            k, v = step.fresh_kv()
            cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
            lt = torch.tensor(lens, dtype=torch.int32, device="cuda")
            before = len(prefill.graphs)
            out = prefill(step.q, k, v, cu, lt, max(lens), pt.D**-0.5)
            ok, err = pt.agrees(out, step.packed(step.baseline()))
            extra[str(lens)] = dict(ok=ok, new_graphs=len(prefill.graphs) - before, **err)
    except Exception as e:
        extra["error"] = "".join(traceback.format_exception(e))[-1500:]
    try:  # sequences with other rows between them (an engine step's other prompts): read and written in place
        lens, gaps = [800, 1000, 300], [0, 400, 77]
        step = pt.Step(lens, lens)
        k, v = step.fresh_kv()
        spots, starts = [], []
        a = 0
        for n, gap in zip(lens, gaps):
            a += gap
            starts.append(a)
            spots.append(torch.arange(a, a + n))
            a += n
        spots = torch.cat(spots).cuda()
        spread = lambda x: x.new_zeros(a, *x.shape[1:]).index_copy_(0, spots, x)  # noqa: E731
        out = torch.full((a, pt.HQ, pt.D), 7.0, dtype=pt.DT, device="cuda")
        prefill(spread(step.q), spread(k), spread(v), torch.tensor(starts + [a], dtype=torch.int32, device="cuda"),
                torch.tensor(lens, dtype=torch.int32, device="cuda"), max(lens), pt.D**-0.5, out=out)
        ok, err = pt.agrees(out[spots], step.packed(step.baseline()))
        untouched = bool((out[~torch.isin(torch.arange(a, device="cuda"), spots)] == 7).all())
        extra["gaps"] = dict(ok=ok, untouched=untouched, **err)
    except Exception as e:
        extra["gaps_error"] = "".join(traceback.format_exception(e))[-1500:]
    try:  # the batch padded to a power of two with empty sequences (one graph per doubling of B)
        padded = cp.CudnnPrefill(torch.device("cuda"), pad_batch=True)
        for lens in ([1000, 1024, 5], [700, 300, 513, 90, 1024], [64]):
            step = pt.Step(lens, lens)
            k, v = step.fresh_kv()
            out = padded(step.q, k, v, step.cu, step.lens, max(lens), pt.D**-0.5)
            ok, err = pt.agrees(out, step.packed(step.baseline()))
            extra[f"padded {lens}"] = dict(ok=ok, graphs=len(padded.graphs), **err)
    except Exception as e:
        extra["padded_error"] = "".join(traceback.format_exception(e))[-1500:]
    print("reuse / zero length / gaps / padded:", json.dumps(extra), flush=True)
    info.update(graphs=len(prefill.graphs), build_seconds=prefill.build_seconds, extra=extra)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(info=info, rows=rows), indent=1))
    print(f"{'case':22s} {'base ms':>8s} {'best':>8s} {'triton':>8s} {'cudnn':>8s} {'tuned':>8s} {'host us':>8s} "
          f"{'first ms':>8s}  ratio triton / cudnn / tuned, plans")
    for r in rows:
        print(f"{r['case']:22s} {r['baseline_ms']:8.3f} {r['best_baseline_ms']:8.3f} {r['triton_ms']:8.3f} "
              f"{r.get('cudnn_ms', float('nan')):8.3f} {r.get('cudnn_tuned_ms', float('nan')):8.3f} "
              f"{r.get('cudnn_host_us', float('nan')):8.1f} {r.get('first_call_ms', float('nan')):8.1f}  "
              f"{r['ratio_triton']:.2f}x / {r.get('ratio_cudnn', float('nan')):.3f}x / "
              f"{r.get('ratio_tuned', float('nan')):.3f}x (alternated {r.get('alt_ratio_cudnn', float('nan')):.3f}x / "
              f"{r.get('alt_ratio_tuned', float('nan')):.3f}x) "
              f"{'' if r.get('ok') and r.get('tuned_ok') else 'DISAGREES/ERROR'}"
              f" {r.get('plans')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
