"""Micro-benchmark of the sampler: the batched sampler against the per-row loop it replaced.

    python benchmarks/sampler.py                 # 256 rows x 151,936 vocab (Qwen3's) on the CPU
    python benchmarks/sampler.py --device cuda

The per-row loop is the engine's sampler before the batched one (one softmax, sort and
multinomial per sampled row); both are timed on the same logits for several mixes of requests.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from zipage import SamplingParams
from zipage.engine.sampler import sample

MIXES = {
    "greedy": lambda i: SamplingParams(temperature=0),
    "temperature": lambda i: SamplingParams(temperature=0.8),
    "top-p 0.95 + top-k 50": lambda i: SamplingParams(temperature=0.6, top_p=0.95, top_k=50),
    "top-p, half seeded": lambda i: SamplingParams(temperature=0.6, top_p=0.95, seed=i if i % 2 else None),
    "min-p 0.05": lambda i: SamplingParams(temperature=0.8, min_p=0.05),
}


def per_row_sample(logits: torch.Tensor, params: list[SamplingParams], generators) -> torch.Tensor:
    """The replaced sampler: greedy rows in one argmax, every sampled row on its own."""
    logits = logits.float()
    out = logits.argmax(dim=-1)
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = logits[i] / p.temperature
        if p.top_k > 0 and p.top_k < row.shape[-1]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(row, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            drop = probs.cumsum(dim=-1) - probs > p.top_p
            row = row.scatter(0, order[drop], float("-inf"))
        probs = torch.softmax(row, dim=-1)
        out[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return out


def timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", default="benchmarks/results/sampler_cpu.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    logits = torch.randn(args.rows, args.vocab, device=device) * 4
    rows = []
    for name, make in MIXES.items():
        params = [make(i) for i in range(args.rows)]

        def gens():
            return [torch.Generator(device=device).manual_seed(p.seed) if p.seed is not None else None for p in params]

        before = timed(lambda: per_row_sample(logits, params, gens()), args.repeats, device)
        after = timed(lambda: sample(logits, params, gens()), args.repeats, device)
        rows.append(dict(mix=name, per_row_ms=round(before, 2), batched_ms=round(after, 2),
                         speedup=round(before / after, 2)))
        print(f"{name:<24} per-row {before:9.2f} ms   batched {after:9.2f} ms   x{before / after:.2f}", flush=True)
    result = dict(rows=args.rows, vocab=args.vocab, device=str(device), threads=torch.get_num_threads(),
                  torch=torch.__version__, results=rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
