"""Tensor parallelism on two GPUs: TP=2 against TP=1, and a 32B-shaped model on two GPUs. NOT YET RUN.

Random-weight models of Qwen3-8B's and Qwen3-32B's shapes (bf16), the throughput benchmark's
workload (short prompts, every fourth sharing a prefix, forced output lengths), budget 2048. Each
configuration runs in a process of its own (an engine with several ranks owns torch.distributed):

* ``qwen3-8b`` TP=1 and TP=2 with the same KV memory per GPU (``--kv-gib``): tokens/s, decode
  step time, pages and concurrency;
* the all-reduce share of a decode step: a few eager decode steps of ``--profile-batch`` requests
  under ``torch.profiler`` on rank 0 (NCCL kernel time over the step's wall time);
* ``qwen3-32b`` TP=2 (its bf16 weights take 65 GB: with one GPU's memory the KV pool is small),
  and TP=1 for comparison when it fits.

    NCCL_NVLS_ENABLE=0 python -m zipage.bench.tensor_parallel --out benchmarks/results/tensor_parallel.json
    python benchmarks/tensor_parallel.py --one qwen3-8b --tp 2 --requests 16 --max-tokens 1024   # one config

Written for a machine with two H200s and not run yet (none was lent): expect to fix details.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

try:  # run as a script or imported as a module
    from engine_run import MODELS, workload
except ImportError:
    from .engine_run import MODELS, workload

# Qwen3-32B's published shapes (config.json of Qwen/Qwen3-32B); weights are random.
QWEN3_32B = dict(
    vocab_size=151936, hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False, use_sliding_window=False,
)
SHAPES = {**MODELS, "qwen3-32b": QWEN3_32B}
RUNS = [("qwen3-8b", 1), ("qwen3-8b", 2), ("qwen3-32b", 2), ("qwen3-32b", 1)]


def build(name: str):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**SHAPES[name])
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda:0"):
        model = Qwen3ForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    return model.eval()


def pages_for(model, kv_gib: float, page_size: int, tp: int) -> int:
    from zipage.engine.runner import ModelRunner

    per_page = ModelRunner.bytes_per_page(model.config, page_size, torch.bfloat16, stateful=False, tp_size=tp)
    return int(kv_gib * 2**30 // per_page)


def one(args: argparse.Namespace) -> dict:
    """One configuration, in this process: throughput, then the all-reduce share from a profile."""
    import zipage

    model = build(args.one)
    prompts = workload(args.requests, model.config.vocab_size)
    pages = pages_for(model, args.kv_gib, args.page_size, args.tp)
    t0 = time.perf_counter()
    llm = zipage.LLM(model, budget=args.budget, page_size=args.page_size, num_pages=pages,
                     tensor_parallel_size=args.tp, enforce_eager=args.profile_only)
    setup = time.perf_counter() - t0
    out = {"model": args.one, "tp": args.tp, "kv_gib_per_gpu": args.kv_gib, "pages": pages, "setup_s": setup,
           "max_concurrency": llm.stats()["max_concurrency"],
           "gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count()}
    params = zipage.SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, temperature=0)
    if not args.profile_only:
        steps: list[float] = []
        step = llm.step

        def timed() -> list:
            t = time.perf_counter()
            result = step()
            steps.append(time.perf_counter() - t)
            return result

        llm.step = timed
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t
        llm.step = step
        tokens = sum(len(o.token_ids) for o in outs)
        assert all(len(o.token_ids) == args.max_tokens for o in outs), "a request lost tokens"
        steps.sort()
        out.update(tokens=tokens, wall_s=wall, tokens_per_s=tokens / wall, median_step_ms=steps[len(steps) // 2] * 1e3,
                   compressions=llm.stats()["compressions"], preemptions=llm.stats()["preemptions"])
        stats = llm.stats()
        assert stats["free_pages"] == stats["total_pages"], "pages were lost"
    else:
        out.update(allreduce(llm, prompts[: args.profile_batch], args))
    llm.close()
    return out


def allreduce(llm, prompts, args) -> dict:
    """NCCL kernel time over the wall time of a few eager decode steps of ``len(prompts)`` requests."""
    import zipage
    from torch.profiler import ProfilerActivity, profile

    for p in prompts:
        llm.add_request(p, zipage.SamplingParams(max_tokens=4096, ignore_eos=True))
    while llm.scheduler.waiting or any(s.num_computed < len(s.prompt_token_ids) for s in llm.scheduler.running):
        llm.step()
    for _ in range(5):
        llm.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(args.profile_steps):
            llm.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    gpu = nccl = 0.0
    for e in prof.key_averages():
        cuda_us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if e.device_type is not None and "cuda" in str(e.device_type).lower():
            gpu += cuda_us
            if "nccl" in e.key.lower():
                nccl += cuda_us
    steps = args.profile_steps
    return {"profile_batch": len(prompts), "eager_step_ms": wall / steps * 1e3,
            "gpu_kernel_ms_per_step": gpu / steps / 1e3, "allreduce_ms_per_step": nccl / steps / 1e3,
            "allreduce_share_of_step": (nccl / 1e6) / wall if wall else None}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--one", choices=sorted(SHAPES), default=None, help="run one configuration in this process")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--page-size", type=int, default=256)
    p.add_argument("--kv-gib", type=float, default=16.0, help="KV memory per GPU")
    p.add_argument("--profile-only", action="store_true", help="eager engine: only the all-reduce profile")
    p.add_argument("--profile-batch", type=int, default=64)
    p.add_argument("--profile-steps", type=int, default=20)
    p.add_argument("--out", default="benchmarks/results/tensor_parallel.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        print("tensor_parallel.py needs two CUDA GPUs", file=sys.stderr)
        return 2
    if args.one is not None:
        print("RESULT " + json.dumps(one(args)))
        return 0
    results = []
    common = ["--requests", str(args.requests), "--max-tokens", str(args.max_tokens), "--budget", str(args.budget),
              "--page-size", str(args.page_size), "--kv-gib", str(args.kv_gib)]
    for name, tp in RUNS:
        for extra in ([], ["--profile-only", "--profile-batch", str(args.profile_batch),
                           "--profile-steps", str(args.profile_steps)]):
            cmd = [sys.executable, "-m", "zipage.bench.tensor_parallel", "--one", name, "--tp", str(tp),
                   *common, *extra]
            run = subprocess.run(cmd, capture_output=True, text=True)
            lines = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
            result = json.loads(lines[-1][7:]) if lines else {"model": name, "tp": tp, "error": run.stderr[-2000:]}
            result["mode"] = "profile" if extra else "throughput"
            results.append(result)
            print(json.dumps(result), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
