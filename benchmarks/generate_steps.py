"""generate()'s decode step, zipage against DynamicCache, timed step by step in one process.

    python benchmarks/generate_steps.py [--model qwen3-0.6b] [--batch 16] [--prompt 200] [--new 512] [--budget 512]

Host-bound steps (generate() at these sizes on a GPU is mostly Python and launches) drift with the
machine: whole runs of one cache after another can differ by 10-20% between processes or minutes.
Here the two caches take turns, one decode step each, the same tokens fed to both (the model's forward
with ``past_key_values``, as generate() calls it; greedy tokens of DynamicCache), so a slow spell hits
both alike, and the figure is the median of the per-step ratios; the ratio of all steps' time beside it
counts zipage's compressions (a step in ``buffer``), which a median leaves out. A long ``--prompt`` puts
the stored length far past the budget without thousands of decode steps (zipage compresses the prompt
after its prefill): the step's cost at a stored length is the same whichever tokens filled it. Both caches first run the same
lengths untimed (SDPA's cuDNN plans for DynamicCache's every length, zipage's kernels). Random-weight
Qwen3 shapes (as ``generate_speed.py``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import DynamicCache

import zipage
from zipage.hf import cache_kwarg
from generate_speed import load

CACHE = cache_kwarg()  # the models' cache argument: cache from transformers 5.24, past_key_values before


def run(model, ids, steps: int, budget: int, timed: bool, fields: dict | None = None) -> dict:
    device = ids.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    caches = {"full": DynamicCache(config=model.config),
              "zipage": zipage.ZipageCache(config=model.config, budget=budget,
                                           max_cache_len=ids.shape[1] + steps + 1, **(fields or {}))}
    times = {name: [] for name in caches}
    with torch.inference_mode():
        nxt = None
        for name, cache in caches.items():
            out = model(input_ids=ids, **{CACHE: cache}, use_cache=True, logits_to_keep=1)
            if nxt is None:
                nxt = out.logits[:, -1:].argmax(-1)
        tokens = [nxt]
        for _ in range(steps):
            for name, cache in caches.items():
                sync()
                t = time.perf_counter()
                out = model(input_ids=tokens[-1], **{CACHE: cache}, use_cache=True, logits_to_keep=1)
                sync()
                times[name].append(time.perf_counter() - t)
                if name == "full":
                    new = out.logits[:, -1:].argmax(-1)
            tokens.append(new)
    zp = caches["zipage"]
    return {"times": times, "stored": zp.stored_length(), "compressions": zp.num_compressions} if timed else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=200)
    ap.add_argument("--new", type=int, default=512, help="decode steps")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--kv-cache-dtype", default=None, help="zipage's page type (default: ZipageConfig's)")
    ap.add_argument("--exact-tail", type=int, default=0, help="zipage's exact_tail (8-bit pages)")
    ap.add_argument("--buffer", type=int, default=None, help="zipage's buffer (default: ZipageConfig's)")
    ap.add_argument("--page-size", type=int, default=None, help="zipage's page size (default: ZipageConfig's)")
    ap.add_argument("--label", default="")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    for name in ("batch", "prompt", "new"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} {getattr(args, name)}: must be at least 1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load(args.model, device)
    ids = torch.randint(100, 20000, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0)).to(device)
    fields = {k: v for k, v in (("buffer", args.buffer), ("page_size", args.page_size),
                                ("kv_cache_dtype", args.kv_cache_dtype), ("exact_tail", args.exact_tail)) if v}
    run(model, ids, args.new, args.budget, timed=False, fields=fields)
    r = run(model, ids, args.new, args.budget, timed=True, fields=fields)
    full, zp = r["times"]["full"], r["times"]["zipage"]
    ratios = [z / f for z, f in zip(zp, full)]
    half = len(ratios) // 2
    row = {
        "model": args.model, "batch": args.batch, "prompt": args.prompt, "new": args.new, "budget": args.budget,
        "cache_fields": fields,
        "label": args.label, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "full_ms_median": statistics.median(full) * 1e3, "zipage_ms_median": statistics.median(zp) * 1e3,
        "step_ratio_median": statistics.median(ratios), "total_ratio": sum(zp) / sum(full),
        "step_ratio_first_half": statistics.median(ratios[:half]), "step_ratio_second_half": statistics.median(ratios[half:]),
        "stored": r["stored"], "compressions": r["compressions"],
    }
    print(f"{args.label:7s} {args.model} b{args.batch} {args.new} steps: full {row['full_ms_median']:.2f} ms, zipage-"
          f"{args.budget} {row['zipage_ms_median']:.2f} ms; zipage/full per step {row['step_ratio_median']:.3f} "
          f"(halves {row['step_ratio_first_half']:.3f} / {row['step_ratio_second_half']:.3f}; all steps' time "
          f"{row['total_ratio']:.3f}), "
          f"stored {row['stored']}, {row['compressions']} compressions", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**row, "full_s": full, "zipage_s": zp}, f)


if __name__ == "__main__":
    main()
