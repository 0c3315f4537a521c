"""Where an engine decode step spends its time (host vs device), on a random-weight model.

    python benchmarks/profile_step.py --requests 32
"""

from __future__ import annotations

import argparse
import time

import torch
from engine_run import build, workload

import zipage


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3-8b")
    ap.add_argument("--requests", type=int, default=32)
    args = ap.parse_args()
    model = build(args.model)
    llm = zipage.LLM(model, budget=2048, page_size=256)
    params = zipage.SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    for p in workload(args.requests, model.config.vocab_size):
        llm.add_request(p, params)
    for _ in range(30):
        llm.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    n = 20
    for _ in range(n):
        llm.step()
    torch.cuda.synchronize()
    print(f"engine step: {(time.perf_counter() - t) / n * 1000:.2f} ms with {len(llm.scheduler.running)} running")
    # the HF forward alone on the same packed shapes, plain sdpa without a cache (device-bound reference)
    ids = torch.randint(1000, 2000, (1, args.requests), device="cuda")
    pos = torch.arange(args.requests, device="cuda")[None] + 500
    with torch.inference_mode():
        for _ in range(3):
            model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
    print(f"HF forward, {args.requests} tokens, no KV: {(time.perf_counter() - t) / n * 1000:.2f} ms")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            llm.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
