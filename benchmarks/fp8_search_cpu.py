"""What FP8 pages' scale search costs generate() on a CPU (SmolLM2-135M): the same call with one
``max|x| / 448`` scale per row (``ZIPAGE_FP8_SCALE_STEPS=1``), with the search (16 scales per stored row)
by the plain squared error (``ZIPAGE_FP8_QUERY_WEIGHTS=0``), and with the keys' search weighted by the
queries' moments (the default: the prompt's keys are quantized twice, before and after its queries are
counted), taking turns, best of ``--repeats``; and the reference quantization alone on a prompt's keys
and on one decode step's.

    python benchmarks/fp8_search_cpu.py [--threads 2] [--repeats 2] [--out benchmarks/results/fp8/search_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--out", default="benchmarks/results/fp8/search_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from zipage.kernels.fp8 import FP8, query_weights, quantize_reference
    from zipage.models import load_smollm2

    model, _ = load_smollm2(torch.float32)
    ids = torch.randint(100, 20000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    cfg = dict(budget=256, kv_cache_dtype="fp8", exact_tail=32)
    settings = {"1": ("1", "0"), "16": ("16", "0"), "16, query-weighted keys": ("16", "1")}  # (steps, weights)
    rows = {}
    for _ in range(args.repeats):
        for name, (steps, qw) in settings.items():
            os.environ["ZIPAGE_FP8_SCALE_STEPS"], os.environ["ZIPAGE_FP8_QUERY_WEIGHTS"] = steps, qw
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                           cache_implementation="zipage", cache_config=cfg, pad_token_id=0)
            rows.setdefault(name, {"generate_s": []})["generate_s"].append(time.perf_counter() - t)
    H, D = model.config.num_key_value_heads, model.config.head_dim
    q = torch.randn(256, H, D) + torch.randn(H, D) * 2
    weights = query_weights(q.sum(0), (q * q).sum(0), 256)
    for name, (steps, qw) in settings.items():
        os.environ["ZIPAGE_FP8_SCALE_STEPS"] = steps
        w = weights if qw == "1" else None
        for part, shape in (("prompt", (1, args.prompt_tokens, H, D)), ("step", (1, 1, H, D))):
            x = torch.randn(shape)
            quantize_reference(x, FP8, w)
            n = 5 if part == "prompt" else 200
            t = time.perf_counter()
            for _ in range(n):
                quantize_reference(x, FP8, w)
            rows[name][f"quantize_{part}_us"] = (time.perf_counter() - t) / n * 1e6
    os.environ.pop("ZIPAGE_FP8_SCALE_STEPS")
    os.environ.pop("ZIPAGE_FP8_QUERY_WEIGHTS")
    print(f"SmolLM2-135M, float32, {args.threads} threads: generate() of {args.prompt_tokens} + {args.new_tokens} "
          f"tokens on FP8 pages (budget 256, exact_tail 32), best of {args.repeats}")
    print("| scales per row | generate() s | quantize a prompt's keys (one layer) | one decode step's |")
    print("|---|---|---|---|")
    for steps, r in rows.items():
        r["generate_best_s"] = min(r["generate_s"])
        print(f"| {steps} | {r['generate_best_s']:.2f} | {r['quantize_prompt_us'] / 1000:.2f} ms | "
              f"{r['quantize_step_us']:.0f} us |")
    ratio = rows["16"]["generate_best_s"] / rows["1"]["generate_best_s"]
    weighted = rows["16, query-weighted keys"]["generate_best_s"] / rows["1"]["generate_best_s"]
    print(f"search / one scale: {ratio:.3f}x the generate() time; query-weighted search / one scale: {weighted:.3f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    result = {"threads": args.threads, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "rows": rows, "ratio": ratio, "ratio_query_weighted": weighted}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
