"""Throughput of zipage against full-KV systems, same model, same GPU, same run.

Reasoning-shaped workload: short prompts (100-300 tokens, every fourth sharing a 128-token
prefix) and long forced outputs (EOS ignored), on a random-weight model built from a real
config. Systems: zipage at two budgets, zipage's own full-KV paged engine (budget=None),
transformers' continuous batching (``generate_batch``) and plain ``generate`` with a
DynamicCache at the largest batch that fits (one batch, timed).

    python benchmarks/throughput.py --model qwen3-8b --requests 256 --max-tokens 4096
    python benchmarks/throughput.py --model qwen3-0.6b --requests 64 --max-tokens 1024   # quick
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time

import torch
from engine_run import build, workload

import zipage


def copy_bandwidth() -> float:
    n = 1 << 29
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * n * 2 * 20 / (time.perf_counter() - t) / 1e9


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes_per_token(model) -> int:
    c = model.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2


def run_engine(model, prompts, max_tokens, budget, bw, **kw) -> dict:
    llm = zipage.LLM(model, budget=budget, page_size=256, **kw)
    compress_s = [0.0]
    inner = llm.runner.compress

    def timed(*a, **k):  # compression time on its own stream/timeline (host-side launch + sync)
        t = time.perf_counter()
        inner(*a, **k)
        torch.cuda.synchronize()
        compress_s[0] += time.perf_counter() - t

    # warm-up outside the timing: kernel compilation and CUDA-graph capture (a compression included)
    warm = zipage.SamplingParams(max_tokens=min(max_tokens, (budget or 256) + 300), temperature=0, ignore_eos=True)
    llm.generate(prompts[:2], warm, use_tqdm=False)
    llm.scheduler.compressions = 0
    llm.runner.compress = timed
    params = zipage.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    ids = [llm.add_request(p, params) for p in prompts]
    torch.cuda.reset_peak_memory_stats()
    running, steps, decode_ms, stored = [], 0, [], []
    start = last = time.perf_counter()
    while llm.has_unfinished():
        llm.step()
        torch.cuda.synchronize()
        now = time.perf_counter()
        r = llm.scheduler.running
        running.append(len(r))
        if r and all(not s.in_prefill for s in r):
            decode_ms.append((now - last) * 1000)
            stored.append(sum(s.stored for s in r))
        last = now
        steps += 1
    wall = time.perf_counter() - start
    outs = [llm.requests.pop(i).output() for i in ids]
    assert all(len(o.token_ids) == max_tokens for o in outs)
    stats = llm.stats()
    assert stats["free_pages"] == stats["total_pages"]
    med = sorted(decode_ms)[len(decode_ms) // 2] if decode_ms else math.nan
    med_stored = sorted(stored)[len(stored) // 2] if stored else 0
    floor_ms = (weight_bytes(model) + med_stored * kv_bytes_per_token(model)) / (bw * 1e9) * 1000
    res = dict(tokens_per_s=len(prompts) * max_tokens / wall, wall_s=wall, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
               mean_running=sum(running) / len(running), max_running=max(running), median_decode_step_ms=med,
               decode_floor_ms=floor_ms, step_over_floor=med / floor_ms if decode_ms else math.nan,
               compression_share=compress_s[0] / wall, preemptions=stats["preemptions"],
               compressions=stats["compressions"], total_pages=stats["total_pages"])
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return res


def run_generate_batch(model, prompts, max_tokens) -> dict:
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=model.config.vocab_size + 1,
                           pad_token_id=0)
    model.config._attn_implementation = "sdpa"
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = model.generate_batch(inputs=prompts, generation_config=cfg, progress_bar=False)
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    tokens = sum(len(o.generated_tokens) for o in out.values())
    return dict(tokens_per_s=tokens / wall, wall_s=wall, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                output_tokens=tokens)


def run_generate(model, prompts, max_tokens) -> dict:
    """Plain generate() with a DynamicCache: the largest batch whose full KV fits, one batch timed."""
    free = torch.cuda.mem_get_info()[0] * 0.85
    per_seq = (300 + max_tokens) * kv_bytes_per_token(model) * 1.3  # KV plus activation slack
    batch = max(1, min(len(prompts), int(free // per_seq)))
    width = max(len(p) for p in prompts[:batch])
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for i, p in enumerate(prompts[:batch]):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                   do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return dict(tokens_per_s=batch * max_tokens / wall, wall_s=wall, batch=batch,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3-8b")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--systems", default="zipage-2048,zipage-1024,zipage-fullkv,hf-generate_batch,hf-generate")
    ap.add_argument("--out", default="benchmarks/results/throughput.json")
    args = ap.parse_args()
    model = build(args.model)
    prompts = workload(args.requests, model.config.vocab_size)
    bw = copy_bandwidth()
    results = {}
    for name in args.systems.split(","):
        t = time.perf_counter()
        try:
            if name.startswith("zipage-"):
                budget = None if name.endswith("fullkv") else int(name.split("-")[1])
                results[name] = run_engine(model, prompts, args.max_tokens, budget, bw,
                                           async_compression=budget is not None)
            elif name == "hf-generate_batch":
                results[name] = run_generate_batch(model, prompts, args.max_tokens)
            elif name == "hf-generate":
                results[name] = run_generate(model, prompts, args.max_tokens)
        except Exception as err:  # a peer that fails is reported, not fatal
            results[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
        print(f"{name}: {time.perf_counter() - t:.0f} s {results[name]}", flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    summary = dict(model=args.model, requests=args.requests, max_tokens=args.max_tokens, copy_bandwidth_gbps=bw,
                   device=torch.cuda.get_device_name(), torch=torch.__version__, systems=results)
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\n{'system':20s} {'tok/s':>9s} {'peak GiB':>9s} {'conc':>6s} {'step ms':>8s} {'floor':>7s} {'x':>5s}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:20s} {r['error'][:80]}")
            continue
        print(f"{name:20s} {r['tokens_per_s']:9.0f} {r['peak_gib']:9.1f} {r.get('mean_running', r.get('batch', 0)):6.0f} "
              f"{r.get('median_decode_step_ms', math.nan):8.1f} {r.get('decode_floor_ms', math.nan):7.1f} "
              f"{r.get('step_over_floor', math.nan):5.2f}")


if __name__ == "__main__":
    main()
