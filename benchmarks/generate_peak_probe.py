"""Where generate()'s peak GPU memory differs between zipage and DynamicCache at batch 1.

    python benchmarks/generate_peak_probe.py [--model qwen3-0.6b] [--budget 512] [--new 1,64,512]

Random-weight Qwen3 shapes (as ``generate_speed.py``), a 200-token prompt at batch 1, greedy; for each
number of new tokens, each cache twice (the second run is reported: allocator and kernels warm), the
peak of ``torch.cuda.max_memory_allocated`` above what was allocated before the call. With 1 new token
the peak is the prompt's step alone, so the rows say whether a difference comes from the prefill or
from the decode steps. zipage also runs with ``ZIPAGE_DENSE_CUDNN=1`` (the model's SDPA free to pick
cuDNN, as DynamicCache's is) and ``ZIPAGE_GENERATE_ATTENTION=paged`` (the paged kernel instead of SDPA).

The last length is then run once more per cache under ``torch.cuda.memory._record_memory_history``, and
the allocations live at each run's peak are listed by the first line of the call stack that is in
zipage, transformers or torch.nn (summed over calls from that line), so the difference is named.
(On the CPU the two caches' peaks over op boundaries are equal at these shapes: a GPU-only difference
comes from memory an op takes and frees within itself, or from a CUDA-only path.)
"""

from __future__ import annotations

import argparse
import collections
import json
import os

import torch

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--new", default="1,64,512", help="new-token counts, comma-separated")
    ap.add_argument("--envs", default="default,cudnn,paged", help="zipage's runs: default, cudnn and/or paged")
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
    for new in news:
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
                  f"{r['new_tokens'] / r['seconds']:.1f} tok/s", flush=True)
    sites = {}
    v = Variant(args.model, 1, 200, news[-1], (None, args.budget))
    for budget in (None, args.budget):
        torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
        run_once(model, ids, v, budget, True)
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        trace = snap["device_traces"][torch.cuda.current_device()]
        peak, by_site = live_at_peak(trace)
        name = "full" if budget is None else f"zipage-{budget}"
        sites[name] = by_site
        print(f"\n{name}: {peak / 2**20:.2f} MiB live at the traced peak ({len(trace)} events); by site:")
        for site, size in sorted(by_site.items(), key=lambda kv: -kv[1])[:12]:
            print(f"  {size / 2**20:8.2f} MiB  {site}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "live_at_peak": sites}, f, indent=1)


if __name__ == "__main__":
    main()
