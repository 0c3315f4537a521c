"""Where generate()'s peak GPU memory differs between zipage and DynamicCache at batch 1.

    python benchmarks/generate_peak_probe.py [--model qwen3-0.6b] [--budget 512]

Random-weight Qwen3 shapes (as ``generate_speed.py``), a 200-token prompt at batch 1, greedy; for 1, 64
and 512 new tokens, each cache twice (the second run is reported: allocator and kernels warm), the peak
of ``torch.cuda.max_memory_allocated`` above what was allocated before the call. With 1 new token the
peak is the prompt's step alone, so the rows say whether a difference comes from the prefill or from
the decode steps.
"""

from __future__ import annotations

import argparse
import json

import torch

from generate_speed import Variant, load, run_once


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model = load(args.model, "cuda")
    ids = torch.randint(100, 20000, (1, 200), generator=torch.Generator().manual_seed(0)).cuda()
    rows = []
    for new in (1, 64, 512):
        v = Variant(args.model, 1, 200, new, (None, args.budget))
        for budget in (None, args.budget):
            run_once(model, ids, v, budget, True)
            r = run_once(model, ids, v, budget, True)
            rows.append(dict(new_tokens=new, cache="full" if budget is None else f"zipage-{budget}", **r))
            print(f"{new:4d} new  {rows[-1]['cache']:11s} peak {r['peak_bytes'] / 2**20:8.2f} MiB  "
                  f"stored {r['stored']}", flush=True)
        full, zp = rows[-2]["peak_bytes"], rows[-1]["peak_bytes"]
        print(f"{new:4d} new  zipage - full: {(zp - full) / 2**20:+.2f} MiB", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
