"""Where an engine decode step spends its time (host vs device), on a random-weight model.

Times the decode step (mean over 20 steps, no compression among them) with the fused ops off and
on (without and with the merged q/k/v and gate/up GEMMs), and with synchronous and asynchronous
scheduling, then profiles the last variant.

    python benchmarks/profile_step.py --requests 32
    python benchmarks/profile_step.py --requests 15 --prompt-tokens 2000   # contexts like the throughput run
    python benchmarks/profile_step.py --requests 490 --prompt-tokens 1024 --kv-cache-dtype fp8 --default-only
    python benchmarks/profile_step.py --requests 490 --prompt-tokens 1024 --kv-cache-dtype fp8 --exact-tail 16 \
        --default-only   # (ZIPAGE_EXACT_TAIL_KERNEL=torch: the merge in PyTorch ops instead of its kernel)
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import torch
from engine_run import build, workload

import zipage


def step_ms(model, requests: int, fuse_ops: bool, async_scheduling: bool, prompt_tokens: int | None, n: int = 20,
            merge: bool = True, kv_cache_dtype: str = "auto", max_num_seqs: int | None = None, exact_tail: int = 0):
    llm = zipage.LLM(model, budget=2048, page_size=256, fuse_ops=fuse_ops, async_scheduling=async_scheduling,
                     kv_cache_dtype=kv_cache_dtype, max_num_seqs=max_num_seqs or max(requests, 256),
                     exact_tail=exact_tail)
    if not merge:  # norms and RoPE fused, projections as the model runs them (graphs are captured later)
        llm.runner.fusion.merged = []
    params = zipage.SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    if prompt_tokens is None:
        prompts = workload(requests, model.config.vocab_size)
    else:  # long prompts: decode steps read contexts of about that length (below budget + buffer)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(10, model.config.vocab_size, (prompt_tokens,), generator=g).tolist()
                   for _ in range(requests)]
    for p in prompts:
        llm.add_request(p, params)
    for _ in range(30):
        llm.step()
    for _ in range(400):  # many long prompts: step until every admitted one has been prefilled (decode steps only)
        if not llm.scheduler.waiting and not any(seq.in_prefill for seq in llm.scheduler.running):
            break
        llm.step()
    for _ in range(5):  # decode steps only from here: the first of them may capture the step's CUDA graphs
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
    ap.add_argument("--prompt-tokens", type=int, default=None, help="random prompts of this length instead of the workload")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "int8"])
    ap.add_argument("--exact-tail", default="0",
                    help="exact tails of this many tokens (8-bit pages); a comma list runs the engine's defaults once "
                         "for each, in one process (with --default-only)")
    ap.add_argument("--default-only", action="store_true", help="time and profile the engine's defaults only")
    ap.add_argument("--out", default=None, help="timings and profiled kernels (JSON)")
    ap.add_argument("--max-num-seqs", type=int, default=None,
                    help="the engine's (default: max(requests, 256)); above --requests, steps run the smallest "
                         "captured graph that holds them, padded, as in a throughput run")
    args = ap.parse_args()
    try:
        tails = [int(t) for t in str(args.exact_tail).split(",")]
    except ValueError:
        ap.error(f"--exact-tail {args.exact_tail!r}: expected an int or a comma list of ints")
    if len(tails) > 1 and not args.default_only:
        ap.error("several --exact-tail values need --default-only")
    args.exact_tail = tails[0] if len(tails) == 1 else tails
    record = dict(model=args.model, requests=args.requests, prompt_tokens=args.prompt_tokens,
                  kv_cache_dtype=args.kv_cache_dtype, exact_tail=args.exact_tail, max_num_seqs=args.max_num_seqs,
                  exact_tail_kernel=os.environ.get("ZIPAGE_EXACT_TAIL_KERNEL", "triton"), variants=[])
    model = build(args.model)
    # (fuse_ops, merged projections, async_scheduling)
    variants = [(False, False, False), (True, False, False), (True, True, False), (True, False, True), (True, True, True)]
    if args.default_only:
        variants = [variants[-1] + (tail,) for tail in tails]
    else:
        variants = [v + (tails[0],) for v in variants]
    for fuse, merge, overlap, tail in variants:
        ms, llm = step_ms(model, args.requests, fuse, overlap, args.prompt_tokens, merge=merge,
                          kv_cache_dtype=args.kv_cache_dtype, max_num_seqs=args.max_num_seqs,
                          exact_tail=tail)
        ctx = sum(s.stored for s in llm.scheduler.running) / max(len(llm.scheduler.running), 1)
        record["variants"].append(dict(fuse_ops=fuse, merged=merge and fuse, async_scheduling=overlap,
                                       exact_tail=tail, step_ms=round(ms, 3), running=len(llm.scheduler.running),
                                       mean_context=ctx))
        print(f"engine step, fuse_ops={fuse}, merged GEMMs={merge and fuse}, async_scheduling={overlap}, "
              f"exact_tail={tail}: {ms:.2f} ms with {len(llm.scheduler.running)} running, mean context {ctx:.0f}",
              flush=True)
        if (args.default_only or (fuse, merge, overlap, tail) == variants[-1]) and not args.no_profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    llm.step()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
            kernels = sorted(((e.key, e.self_device_time_total / 5 / 1000, e.count // 5) for e in prof.key_averages()
                              if e.self_device_time_total > 0 and str(getattr(e, "device_type", "")).endswith("CUDA")),
                             key=lambda x: -x[1])
            device_ms = sum(k[1] for k in kernels)
            print(f"device time a step: {device_ms:.2f} ms (the profile's 5 steps)")
            record["variants"][-1].update(device_ms_per_step=round(device_ms, 3), kernels=[
                dict(name=n[:80], ms_per_step=round(m, 4), calls_per_step=c) for n, m, c in kernels[:30]])
        del llm
        prof = None
        gc.collect()  # (the engine holds reference cycles: the next one sizes its pool from the free memory)
        torch.cuda.empty_cache()
    if args.out:
        import json

        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
