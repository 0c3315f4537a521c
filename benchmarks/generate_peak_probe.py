"""Where generate()'s peak GPU memory differs between zipage and DynamicCache at batch 1.

    python benchmarks/generate_peak_probe.py [--model qwen3-0.6b] [--budget 512] [--new 1,64,512]

Random-weight Qwen3 shapes (as ``generate_speed.py``), a 200-token prompt at batch 1, greedy; for each
number of new tokens, each cache twice (the second run is reported: allocator and kernels warm), the
peak of ``torch.cuda.max_memory_allocated`` above what was allocated before the call. With 1 new token
the peak is the prompt's step alone, so the rows say whether a difference comes from the prefill or
from the decode steps. zipage also runs with ``ZIPAGE_DENSE_CUDNN=1`` (the model's SDPA free to pick
cuDNN, as DynamicCache's is) and ``ZIPAGE_GENERATE_ATTENTION=paged`` (the paged kernel instead of SDPA).

The last length is then run once more per cache with the allocator's peak read and reset after every
forward (a stopping criterion that never stops): what is allocated between steps, and the peak inside
each. The forward with the highest peak is run again with ``torch.cuda.memory._record_memory_history``
on for that forward alone, and the allocations live at its peak are listed by the first line of the
call stack that is in zipage, transformers or torch.nn (summed over calls from that line), above what
was allocated when it started, so the difference is named.
(On the CPU the two caches' peaks over op boundaries are equal at these shapes: a GPU-only difference
comes from memory an op takes and frees within itself, or from a CUDA-only path.)
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

import zipage  # noqa: F401  (registers cache_implementation="zipage" with transformers)
from generate_speed import Variant, load, run_once

ENV_VARIANTS = {"": {}, "cudnn": {"ZIPAGE_DENSE_CUDNN": "1"}, "paged": {"ZIPAGE_GENERATE_ATTENTION": "paged"}}
KEEP = ("zipage", "transformers", "torch/nn/")


def _site(frames: list[dict]) -> str:
    for f in frames:
        name = f.get("filename", "")
        if any(k in name for k in KEEP):
            short = name.split("site-packages/")[-1].split("/src/")[-1]
            return f"{short}:{f.get('line')} {f.get('name')}"
    return frames[0].get("filename", "?") + f":{frames[0].get('line')}" if frames else "(no stack)"


def live_at_peak(trace: list[dict]) -> tuple[int, dict[str, int]]:
    """(peak bytes above the start, bytes per allocation site live at that peak) from one device's trace."""
    live: dict[int, tuple[int, str]] = {}
    cur = peak = 0
    best: dict[int, tuple[int, str]] = {}
    for e in trace:
        action = e.get("action")
        if action == "alloc":
            live[e["addr"]] = (e["size"], _site(e.get("frames", [])))
            cur += e["size"]
            if cur > peak:
                peak, best = cur, dict(live)
        elif action == "free_requested" and e["addr"] in live:
            cur -= live.pop(e["addr"])[0]
    sites: dict[str, int] = collections.Counter()
    for size, site in best.values():
        sites[site] += size
    return peak, dict(sites)


class _EachStep(StoppingCriteria):
    """Calls ``fn(i)`` after each forward of generate() (``i`` = 0 after the prefill); never stops it."""

    def __init__(self, fn) -> None:
        self.fn, self.i = fn, 0

    def __call__(self, input_ids, scores, **kwargs):
        self.fn(self.i)
        self.i += 1
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _generate(model, ids, variant: Variant, budget, criteria) -> None:
    kw = dict(max_new_tokens=variant.new_tokens, min_new_tokens=variant.new_tokens, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(ids), stopping_criteria=StoppingCriteriaList([criteria]))
    if budget is not None:
        kw.update(cache_implementation="zipage", cache_config={"budget": budget, **variant.cache_config})
    with torch.inference_mode():
        model.generate(ids, **kw)
    torch.cuda.synchronize()


def _fresh() -> int:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _start_history() -> None:
    """The allocator's history from now on (an earlier window's events cleared where this torch can)."""
    try:
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python", clear_history=True)
    except TypeError:  # pragma: no cover - an older torch: the previous window was the other cache's whole run
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")


def step_peaks(model, ids, variant: Variant, budget) -> list[tuple[int, int, int, int]]:
    """Per forward of generate(), above the start: (bytes allocated after it, the allocator's peak during it, the
    bytes the live tensors requested after it, their peak during it). Allocated bytes are the allocator's block
    sizes, which can exceed the request by up to 1 MiB per block (a block it does not split); the run before
    the measured one puts one-time allocations (cuBLAS's workspace) into the base."""
    out: list[tuple[int, int, int, int]] = []
    _fresh()
    _generate(model, ids, variant, budget, _EachStep(lambda i: None))  # once unmeasured: one-time allocations
    base = _fresh()
    requested = torch.cuda.memory_stats().get("requested_bytes.all.current", 0)

    def record(i: int) -> None:
        stats = torch.cuda.memory_stats()
        out.append((torch.cuda.memory_allocated() - base, torch.cuda.max_memory_allocated() - base,
                    stats.get("requested_bytes.all.current", 0) - requested,
                    stats.get("requested_bytes.all.peak", 0) - requested))
        torch.cuda.reset_peak_memory_stats()

    _generate(model, ids, variant, budget, _EachStep(record))
    return out


def step_trace(model, ids, variant: Variant, budget, step: int) -> tuple[int, int, dict[str, int]]:
    """generate() again with the allocator's history recorded over forward ``step`` only: (the peak of what that
    step allocates above what was allocated when it started, those bytes, the sites live at that peak)."""
    state = {}
    base = _fresh()

    def record(i: int) -> None:
        if i == step - 1:
            state["untraced"] = torch.cuda.memory_allocated() - base
            _start_history()
        elif i == step:
            state["snap"] = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)

    if step == 0:  # the prefill: recorded from the start
        state["untraced"] = 0
        _start_history()
    _generate(model, ids, variant, budget, _EachStep(record))
    trace = state["snap"]["device_traces"][torch.cuda.current_device()]
    peak, by_site = live_at_peak(trace)
    return peak, state["untraced"], by_site


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--new", default="1,64,512", help="new-token counts, comma-separated")
    ap.add_argument("--envs", default="default,cudnn,paged", help="zipage's runs: default, cudnn and/or paged")
    ap.add_argument("--steps-only", action="store_true",
                    help="only the step-by-step peaks and the trace of the highest (at the last --new)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    try:
        news = [int(n) for n in args.new.split(",")]
    except ValueError:
        ap.error(f"--new {args.new!r}: expected integers, comma-separated")
    envs = ["" if e == "default" else e for e in args.envs.split(",")]
    bad = [e for e in envs if e not in ENV_VARIANTS]
    if bad:
        ap.error(f"--envs: unknown {bad}; expected default, cudnn or paged")
    model = load(args.model, "cuda")
    ids = torch.randint(100, 20000, (1, 200), generator=torch.Generator().manual_seed(0)).cuda()
    rows = []
    for new in [] if args.steps_only else news:
        v = Variant(args.model, 1, 200, new, (None, args.budget))
        for budget, env in [(None, "")] + [(args.budget, e) for e in envs]:
            os.environ.update(ENV_VARIANTS[env])
            try:
                run_once(model, ids, v, budget, True)
                r = run_once(model, ids, v, budget, True)
            finally:
                for k in ENV_VARIANTS[env]:
                    os.environ.pop(k, None)
            name = "full" if budget is None else f"zipage-{budget}" + (f" {env}" if env else "")
            if budget is None:
                full_peak = r["peak_bytes"]
            rows.append({**r, "cache": name})
            print(f"{new:4d} new  {name:18s} peak {r['peak_bytes'] / 2**20:8.2f} MiB "
                  f"({(r['peak_bytes'] - full_peak) / 2**20:+.2f} vs full)  stored {r['stored']}  "
                  f"{r['new_tokens'] / r['seconds']:.1f} tok/s; requested bytes' peak "
                  f"{r.get('peak_requested_bytes', 0) / 2**20:.2f} MiB", flush=True)
    # Step by step: the peak inside each decode step (the allocator's peak, reset after every step) against what
    # is allocated between steps, for each cache; then the step with the highest peak run again with the
    # allocator's history recorded over that step alone, and what is live at its peak listed by call site.
    v = Variant(args.model, 1, 200, news[-1], (None, args.budget))
    steps, sites = {}, {}
    for budget in (None, args.budget):
        name = "full" if budget is None else f"zipage-{budget}"
        per_step = step_peaks(model, ids, v, budget)
        steps[name] = per_step
        top = max(range(len(per_step)), key=lambda i: per_step[i][1])
        before = per_step[top - 1][0] if top else 0
        print(f"\n{name}: highest in-step peak at call {top} of the stopping criteria "
              f"(0: the prefill): {per_step[top][1] / 2**20:.2f} MiB, with {before / 2**20:.2f} MiB allocated "
              f"before that step (+{(per_step[top][1] - before) / 2**20:.2f} MiB inside it); between steps at most "
              f"{max(r[0] for r in per_step) / 2**20:.2f} MiB; requested bytes: peak "
              f"{max(r[3] for r in per_step) / 2**20:.2f} MiB")
        peak, untraced, by_site = step_trace(model, ids, v, budget, top)
        sites[name] = {"step": top, "peak": peak, "untraced": untraced, "sites": by_site}
        print(f"  traced step {top}: peak {peak / 2**20:.2f} MiB above the {untraced / 2**20:.2f} MiB allocated "
              "when the recording started; live at that peak by site:")
        for site, size in sorted(by_site.items(), key=lambda kv: -kv[1])[:10]:
            print(f"  {size / 2**20:8.2f} MiB  {site}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "steps": steps, "live_at_step_peak": sites}, f, indent=1)


if __name__ == "__main__":
    main()
