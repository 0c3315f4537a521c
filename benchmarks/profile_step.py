"""Where an engine decode step spends its time (host vs device), on a random-weight model.

    python benchmarks/profile_step.py --requests 32
"""

from __future__ import annotations

import argparse
import time

import torch
from engine_run import build, workload

import zipage


def step_ms(model, requests: int, fuse_ops: bool, n: int = 20):
    llm = zipage.LLM(model, budget=2048, page_size=256, fuse_ops=fuse_ops)
    params = zipage.SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    for p in workload(requests, model.config.vocab_size):
        llm.add_request(p, params)
    for _ in range(30):
        llm.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        llm.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1000, llm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3-8b")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    model = build(args.model)
    for fuse in (False, True):
        ms, llm = step_ms(model, args.requests, fuse)
        print(f"engine step, fuse_ops={fuse}: {ms:.2f} ms with {len(llm.scheduler.running)} running", flush=True)
        if fuse and not args.no_profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    llm.step()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
        del llm
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
