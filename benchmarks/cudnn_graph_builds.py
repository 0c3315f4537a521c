"""What cuDNN's ragged attention costs the engine in graph builds, three ways, on one GPU in one call (needs
``pip install nvidia-cudnn-frontend``).

The route (``kernels/cudnn_prefill.py``) builds a graph per (sequences rounded up to a power of two, length
bucket): tens of milliseconds each, paid inside the step that first needs it. Over a short run of ragged
prompts that cost outweighed the faster attention (session 53). This measures, over the keys a run of up to 32
prompts of up to 4,096 tokens can meet:

- ``fixed``: the current graphs: build ms per key (first call, wall, the run included), agreement;
- ``dynamic``: the same keys with cuDNN's dynamic shapes and one shared kernel cache (session 53, cuDNN 9.19:
  builds of ~14 ms instead of ~84, but WRONG outputs for two sequences or more, so the route does not use it);
- ``override``: ONE graph built for the largest key with shape overrides enabled, every key then run through
  it with its own shapes and strides given at execution (no build per key), if cuDNN supports that for this
  graph; agreement and kernel ms against ``fixed`` (session 53: cuDNN 9.19 declines, it needs 9.21);
- ``min_bucket``: graphs of a larger S_max for every prompt up to it (``CudnnPrefill(min_bucket=...)``: one
  graph per batch size), kernel ms against the exact buckets': what the empty tiles cost.

    python3 benchmarks/cudnn_graph_builds.py --out $OUT/cudnn_graph_builds.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prefill_tune as pt  # noqa: E402
from cudnn_prefill_probe import start  # noqa: E402

try:
    from zipage.kernels import cudnn_prefill as cp
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kernels import cudnn_prefill as cp

BATCHES = (1, 2, 4, 8, 16, 32)
BUCKETS = (128, 256, 512, 1024, 2048, 4096)


def lens_for(b: int, s: int, gen: torch.Generator) -> list[int]:
    """``b`` ragged lengths whose key is (b, s): the longest exactly ``s`` (its bucket), the rest in (s/4, s]."""
    lo = max(1, s // 4)
    return [s] + torch.randint(lo, s + 1, (b - 1,), generator=gen).tolist()


def timed(fn) -> tuple[object, float]:
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, (time.perf_counter() - t) * 1000


class Override:
    """One ragged-attention graph at (B_max, S_max) (``CudnnPrefill``'s, built with shape overrides enabled), run
    for smaller batches with per-call shape overrides."""

    def __init__(self, b_max: int, s_max: int, scale: float):
        self.prefill = cp.CudnnPrefill(torch.device("cuda"))
        self.prefill.graph_kwargs = dict(is_override_shape_enabled=True)
        self.heads = dict(q=pt.HQ, k=pt.HKV, v=pt.HKV, o=pt.HQ)
        self.rows = {n: h * pt.D for n, h in self.heads.items()}  # (the probe's packed tensors)
        rows = [self.rows[n] for n in ("q", "k", "v", "o")]
        self.g, self.t = self.prefill._graph((b_max, s_max, pt.HQ, pt.HKV, pt.D, pt.DT, *rows, float(scale), False))

    def __call__(self, q, k, v, starts, lens, max_len, out):
        b, s, d = lens.numel(), cp.length_bucket(max_len), pt.D
        cu = starts.view(b + 1, 1, 1, 1)
        t = self.t
        pack = {t["q"]: q, t["k"]: k, t["v"]: v, t["o"]: out, t["lens"]: lens.view(b, 1, 1, 1)}
        uids, shapes, strides = [], [], []
        for n in ("q", "k", "v", "o"):
            r = self.rows[n]
            pack[t[n + "_off"]] = cu * r
            uids += [t[n].get_uid(), t[n + "_off"].get_uid()]
            shapes += [[b, self.heads[n], s, d], [b + 1, 1, 1, 1]]
            strides += [[s * r, d, r, 1], [1, 1, 1, 1]]
        uids.append(t["lens"].get_uid())
        shapes.append([b, 1, 1, 1])
        strides.append([1, 1, 1, 1])
        p = self.prefill
        p.cudnn.set_stream(handle=p.handle, stream=torch.cuda.current_stream().cuda_stream)
        self.g.execute(pack, p.workspace, handle=p.handle, override_uids=uids, override_shapes=shapes,
                       override_strides=strides)
        return out


def main(argv=None) -> int:
    args, cudnn, info = start(__doc__, "benchmarks/results/cudnn_graph_builds.json", argv)
    if cudnn is None:
        return 1
    gen = torch.Generator().manual_seed(0)
    keys = [(b, s) for b in BATCHES for s in BUCKETS]
    steps = {}
    for b, s in keys:
        lens = lens_for(b, s, gen)
        step = pt.Step(lens, lens)
        k, v = step.fresh_kv()
        steps[b, s] = (step, k, v, step.packed(step.baseline()))
    result = dict(info=info, keys=keys, modes={})
    for mode in ("fixed", "dynamic"):
        row = dict(build_ms={}, ok={}, kernel_ms={})
        try:
            prefill = cp.CudnnPrefill(torch.device("cuda"))
            if mode == "dynamic":
                prefill.graph_kwargs = dict(is_dynamic_shape_enabled=True, kernel_cache=cudnn.create_kernel_cache())
            warm = pt.Step([64], [64])
            wk, wv = warm.fresh_kv()
            _, row["init_ms"] = timed(lambda: prefill(warm.q, wk, wv, warm.cu, warm.lens, 64, warm.scale))
            for key in keys:
                step, k, v, ref = steps[key]
                run = lambda: prefill(step.q, k, v, step.cu, step.lens, step.max_q, step.scale)  # noqa: B023, E731
                out, row["build_ms"][str(key)] = timed(run)
                row["ok"][str(key)] = pt.agrees(out, ref)[0]
                if key[0] in (4, 32) and key[1] in (512, 4096):
                    row["kernel_ms"][str(key)] = pt.bench(run)
        except Exception as e:
            row["error"] = "".join(traceback.format_exception(e))[-2000:]
            print(row["error"], flush=True)
        builds = list(row["build_ms"].values())
        if builds:
            row.update(build_ms_median=statistics.median(builds), build_ms_total=sum(builds),
                       all_ok=all(row["ok"].values()))
        result["modes"][mode] = row
        print(mode, json.dumps({k: x for k, x in row.items() if k not in ("build_ms", "ok")}), flush=True)
    row = dict(ok={}, kernel_ms={})
    try:
        step0 = steps[keys[0]][0]
        ov, row["build_ms"] = timed(lambda: Override(max(BATCHES), max(BUCKETS), step0.scale))
        for key in keys:
            step, k, v, ref = steps[key]
            out = torch.empty_like(step.q)
            run = lambda: ov(step.q, k, v, step.cu, step.lens, step.max_q, out)  # noqa: B023, E731
            got, ms = timed(run)
            row["ok"][str(key)] = pt.agrees(got, ref)[0]
            row.setdefault("first_ms", {})[str(key)] = ms
            if key[0] in (4, 32) and key[1] in (512, 4096):
                row["kernel_ms"][str(key)] = pt.bench(run)
        row["all_ok"] = all(row["ok"].values())
    except Exception as e:
        row["error"] = "".join(traceback.format_exception(e))[-2000:]
        print(row["error"], flush=True)
    result["modes"]["override"] = row
    print("override", json.dumps({k: x for k, x in row.items() if k not in ("ok", "first_ms", "error")}), flush=True)
    # the empty tiles of a larger S_max: kernel ms per (batch, longest prompt), each min_bucket's over the exact one's
    cases = [(b, n) for b in (1, 4, 16, 32) for n in (128, 512, 2048, 4096)]
    table = {}
    for mb in (128, 2048, 4096, 8192, 16384):
        try:
            prefill = cp.CudnnPrefill(torch.device("cuda"), pad_batch=True, min_bucket=mb)
            for key in cases:
                step, k, v, ref = steps[key]
                run = lambda: prefill(step.q, k, v, step.cu, step.lens, step.max_q, step.scale)  # noqa: B023, E731
                ok = pt.agrees(run(), ref)[0]
                table.setdefault(str(key), {})[mb] = (pt.bench(run), ok)
        except Exception as e:
            table.setdefault("error", {})[mb] = "".join(traceback.format_exception(e))[-1500:]
            print(table["error"][mb], flush=True)
    result["min_bucket"] = table
    print(f"{'(B, longest)':14s}" + "".join(f"{mb:>10d}" for mb in (128, 2048, 4096, 8192, 16384)))
    for key in cases:
        got = table.get(str(key), {})
        base = got.get(128, (float("nan"), True))[0]
        print(f"{str(key):14s}" + "".join(f"{got[mb][0] / base:9.2f}{'' if got[mb][1] else '!'}" if mb in got
                                          else f"{'-':>10s}" for mb in (128, 2048, 4096, 8192, 16384)))
    print("(kernel ms over the exact bucket's; ! = disagrees with the baseline)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
