"""Throughput of zipage against full-KV systems, same model, same GPU, same KV memory, same run.

Reasoning-shaped workload: short prompts (100-300 tokens, every fourth sharing a 128-token
prefix) and long forced outputs (EOS ignored), on a random-weight model built from a real
config. Systems: zipage at two budgets, zipage's own full-KV paged engine (budget=None),
transformers' continuous batching (``generate_batch``) and plain ``generate`` with a
DynamicCache at the largest batch whose full KV fits the same memory (one batch, timed).
Any engine system takes ``-fp8`` (``zipage-2048-fp8``, ``zipage-fullkv-fp8``): FP8 KV pages, so
the same memory holds about twice the pages.

Every system gets the same KV memory (``--kv-gib``, pages and state included). The workload is
chosen so that full KV cannot hold every request at once while zipage can: with ``--kv-gib 8``
on Qwen3-8B a zipage request at budget 2048 needs at most 9 pages of 256 tokens (25 requests in
8 GiB), a full-KV one grows to 65 pages (3 at the end). The transformers peers are an order of
magnitude slower, so they run the same prompts for ``--peer-max-tokens`` tokens only: their
tokens/s at that shorter length is an upper bound on theirs at the full length.

    python benchmarks/throughput.py --model qwen3-8b --requests 24 --max-tokens 16384 --kv-gib 8
    python benchmarks/throughput.py --model qwen3-0.6b --requests 64 --max-tokens 1024   # quick
    python benchmarks/throughput.py --requests 512 --max-num-seqs 512 --max-tokens 4096 --kv-gib 24 \
        --systems zipage-2048,zipage-2048-fp8,zipage-fullkv,zipage-fullkv-fp8   # FP8 against bf16
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import sys
import time

import torch
import transformers

try:  # run as a script (python benchmarks/throughput.py) or imported as a module
    from engine_run import MODELS, build, workload
except ImportError:
    from .engine_run import MODELS, build, workload

import zipage
from zipage_cli import HelpFormatter


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


def kv_bytes_per_token(model, kv_cache_dtype: str = "auto") -> int:
    """Bytes one token's keys and values take over all layers (FP8: codes and a float32 scale per head)."""
    c = model.config
    row = c.head_dim * 2 if kv_cache_dtype == "auto" else c.head_dim + 4
    return 2 * c.num_hidden_layers * c.num_key_value_heads * row


def kv_pages(model, kv_gib: float, page_size: int, stateful: bool, kv_cache_dtype: str = "auto") -> int:
    from zipage.engine.runner import ModelRunner

    page = ModelRunner.bytes_per_page(model.config, page_size, model.dtype, stateful, kv_cache_dtype)
    return int(kv_gib * 2**30 // page)


def run_engine(model, prompts, max_tokens, budget, bw, kv_gib, page_size=256, max_num_seqs=256, time_limit=None,
               kv_cache_dtype: str = "auto", **kw) -> dict:
    cfg = zipage.ZipageConfig(budget=budget) if budget is not None else None
    stateful = cfg is not None and zipage.get_scorer(cfg.scorer, cfg).stateful
    num_pages = kv_pages(model, kv_gib, page_size, stateful, kv_cache_dtype)
    llm = zipage.LLM(model, budget=budget, page_size=page_size, num_pages=num_pages, max_num_seqs=max_num_seqs,
                     kv_cache_dtype=kv_cache_dtype, **kw)
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    inner = llm.runner.compress

    def timed(*a, **k):  # GPU time of each compression, on whichever stream launches it
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        inner(*a, **k)
        e.record()
        events.append((s, e))

    # warm-up outside the timing: kernel compilation and CUDA-graph capture (a compression included)
    warm = zipage.SamplingParams(max_tokens=min(max_tokens, (budget or 256) + 300), temperature=0, ignore_eos=True)
    llm.generate(prompts[:2], warm, use_tqdm=False)
    llm.scheduler.compressions = 0
    llm.scheduler.preemptions = 0
    llm.runner.compress = timed
    params = zipage.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    ids = [llm.add_request(p, params) for p in prompts]
    torch.cuda.reset_peak_memory_stats()
    running, steps, decode_ms, stored = [], 0, [], []
    first_token = llm.generated_tokens
    start = last = report = time.perf_counter()
    truncated = False
    while llm.has_unfinished():
        if time_limit is not None and last - start > time_limit:
            truncated = True  # out of time: tokens/s over the part that ran, the rest cancelled
            break
        llm.step()  # (no device sync here: with async scheduling the next step's host work overlaps this one's GPU work)
        now = time.perf_counter()
        r = llm.scheduler.running
        running.append(len(r))
        if r and all(not s.in_prefill for s in r):
            decode_ms.append((now - last) * 1000)
            stored.append(sum(s.stored for s in r))
        last = now
        steps += 1
        if now - report > 60:
            report = now
            print(f"  {now - start:5.0f} s: {llm.generated_tokens} tokens, {len(r)} running, "
                  f"{len(llm.scheduler.waiting)} waiting", flush=True)
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    produced = llm.generated_tokens - first_token
    if truncated:
        for i in ids:
            if not llm.requests[i].finished:
                llm.cancel(i)
        llm.core.compressions.collect(block=True)
    else:
        outs = [llm.requests.pop(i).output() for i in ids]
        assert all(len(o.token_ids) == max_tokens for o in outs)
        assert produced == len(prompts) * max_tokens
    stats = llm.stats()
    assert stats["free_pages"] == stats["total_pages"], "pages lost"
    compress_ms = sum(s.elapsed_time(e) for s, e in events)
    med = sorted(decode_ms)[len(decode_ms) // 2] if decode_ms else math.nan
    med_stored = sorted(stored)[len(stored) // 2] if stored else 0
    floor_ms = (weight_bytes(model) + med_stored * kv_bytes_per_token(model, kv_cache_dtype)) / (bw * 1e9) * 1000
    res = dict(tokens_per_s=produced / wall, wall_s=wall, output_tokens=produced, truncated=truncated, requests=len(prompts), max_tokens=max_tokens,
               kv_pages=num_pages, page_size=page_size, kv_cache_dtype=kv_cache_dtype, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
               mean_running=sum(running) / len(running), max_running=max(running), steps=steps,
               median_decode_step_ms=med, median_decode_kv_tokens=med_stored,
               decode_floor_ms=floor_ms, step_over_floor=med / floor_ms if decode_ms else math.nan,
               compression_share=compress_ms / 1000 / wall, compression_gpu_s=compress_ms / 1000,
               preemptions=stats["preemptions"], compressions=stats["compressions"],
               async_compression=llm.async_compression, async_scheduling=llm.async_scheduling,
               zipage_config=None if llm.zipage_config is None else dataclasses.asdict(llm.zipage_config),
               fused_ops=bool(llm.runner.fusion.norms) or llm.runner.fusion.rope_module is not None)
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return res


def run_generate_batch(model, prompts, max_tokens, kv_gib) -> dict:
    """transformers' continuous batching (paged, full KV) with the same KV memory."""

    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    page = 256
    blocks = int(kv_gib * 2**30 // (page * kv_bytes_per_token(model)))
    cb = dict(num_blocks=blocks)
    cb["page_size" if "page_size" in fields else "block_size"] = page
    cfg = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=model.config.vocab_size + 1,
                           pad_token_id=0)
    model.config._attn_implementation = "sdpa"
    # warm-up (graph capture, allocation) outside the timing
    model.generate_batch(inputs=prompts[:2], generation_config=GenerationConfig(
        max_new_tokens=16, do_sample=False, eos_token_id=model.config.vocab_size + 1, pad_token_id=0),
        continuous_batching_config=ContinuousBatchingConfig(**cb), progress_bar=False)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = model.generate_batch(inputs=prompts, generation_config=cfg,
                               continuous_batching_config=ContinuousBatchingConfig(**cb), progress_bar=False)
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    tokens = sum(len(o.generated_tokens) for o in out.values())
    return dict(tokens_per_s=tokens / wall, wall_s=wall, requests=len(prompts), max_tokens=max_tokens,
                kv_blocks=blocks, page_size=page, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                output_tokens=tokens)


def run_generate(model, prompts, max_tokens, kv_gib, full_tokens) -> dict:
    """Plain generate() with a DynamicCache: the largest batch whose full KV at the full output
    length (``full_tokens``) fits the KV memory, timed over ``max_tokens``."""
    per_seq = (max(len(p) for p in prompts) + full_tokens) * kv_bytes_per_token(model)
    batch = max(1, min(len(prompts), int(kv_gib * 2**30 // per_seq)))
    width = max(len(p) for p in prompts[:batch])
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for i, p in enumerate(prompts[:batch]):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.cuda(), mask.cuda()
    model.config._attn_implementation = "sdpa"
    model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                   do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return dict(tokens_per_s=batch * max_tokens / wall, wall_s=wall, batch=batch, requests=batch, max_tokens=max_tokens,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="zipage bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--model", default="qwen3-8b", choices=sorted(MODELS),
                    help="model shapes: a real config with random weights")
    ap.add_argument("--requests", type=int, default=24, help="requests in the workload, all submitted at once")
    ap.add_argument("--max-tokens", type=int, default=16384, help="output tokens per request (EOS ignored)")
    ap.add_argument("--kv-gib", type=float, default=8.0, help="KV memory every system gets (GiB)")
    ap.add_argument("--peer-max-tokens", type=int, default=2048,
                    help="output tokens per request for the transformers peers (they are much slower)")
    ap.add_argument("--systems", default="zipage-2048,zipage-1024,zipage-fullkv,hf-generate_batch,hf-generate",
                    help="comma list: zipage-<budget>, zipage-fullkv (add -sync for async_scheduling=False, -fp8 "
                         "for FP8 KV pages), hf-generate_batch, hf-generate")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                    help="KV pages of every engine system (a system's -fp8 suffix asks for fp8 on its own)")
    ap.add_argument("--max-num-seqs", type=int, default=256,
                    help="most requests an engine runs at once (FP8 pages fit about twice as many)")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="stop an engine run after this many seconds (tokens/s over the part that ran; marked "
                         "truncated; default: no limit)")
    ap.add_argument("--sync-compression", action="store_true", help="compress on the main stream")
    ap.add_argument("--out", default="benchmarks/results/throughput.json", help="where the results JSON goes")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the throughput benchmark needs a CUDA GPU (it builds random-weight models on it)")
    model = build(args.model)
    prompts = workload(args.requests, model.config.vocab_size)
    bw = copy_bandwidth()
    summary = dict(model=args.model, requests=args.requests, max_tokens=args.max_tokens, kv_gib=args.kv_gib,
                   peer_max_tokens=args.peer_max_tokens, copy_bandwidth_gbps=bw, weight_gib=weight_bytes(model) / 2**30,
                   kv_bytes_per_token=kv_bytes_per_token(model), device=torch.cuda.get_device_name(),
                   torch=torch.__version__, transformers=transformers.__version__,
                   command="python benchmarks/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv), systems={})
    results = summary["systems"]
    for name in args.systems.split(","):
        t = time.perf_counter()
        try:
            if name.startswith("zipage-"):
                parts = name.split("-")  # zipage-<budget|fullkv>[-sync][-fp8]
                budget = None if parts[1] == "fullkv" else int(parts[1])
                unknown = set(parts[2:]) - {"sync", "fp8"}
                if unknown:
                    raise ValueError(f"unknown system flag(s) {sorted(unknown)} in {name!r}: expected -sync, -fp8")
                results[name] = run_engine(model, prompts, args.max_tokens, budget, bw, args.kv_gib,
                                           max_num_seqs=args.max_num_seqs,
                                           kv_cache_dtype="fp8" if "fp8" in parts[2:] else args.kv_cache_dtype,
                                           async_compression=budget is not None and not args.sync_compression,
                                           async_scheduling="sync" not in parts[2:], time_limit=args.time_limit)
            elif name == "hf-generate_batch":
                results[name] = run_generate_batch(model, prompts, min(args.peer_max_tokens, args.max_tokens), args.kv_gib)
            elif name == "hf-generate":
                results[name] = run_generate(model, prompts, min(args.peer_max_tokens, args.max_tokens), args.kv_gib,
                                             args.max_tokens)
            else:
                raise ValueError(f"unknown system {name!r}")
        except Exception as err:  # a peer that fails is reported, not fatal
            results[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
        print(f"{name}: {time.perf_counter() - t:.0f} s {results[name]}", flush=True)
        gc.collect()
        torch.cuda.empty_cache()
        with open(args.out, "w") as f:  # after every system: a run cut short keeps what it measured
            json.dump(summary, f, indent=1)
    print(table(summary))
    return 0


def table(summary: dict) -> str:
    lines = [f"{'system':18s} {'req x tok':>11s} {'tok/s':>8s} {'peak GiB':>8s} {'conc':>5s} {'max':>4s} "
             f"{'step ms':>8s} {'floor':>6s} {'x':>5s} {'compr%':>6s} {'preempt':>7s}"]
    for name, r in summary["systems"].items():
        if "error" in r:
            lines.append(f"{name:18s} {r['error'][:100]}")
            continue
        lines.append(
            f"{name:18s} {str(r['requests']) + 'x' + str(r['max_tokens']):>11s} {r['tokens_per_s']:8.0f} "
            f"{r['peak_gib']:8.1f} {r.get('mean_running', r.get('batch', 0)):5.1f} {r.get('max_running', r.get('batch', 0)):4d} "
            f"{r.get('median_decode_step_ms', math.nan):8.1f} {r.get('decode_floor_ms', math.nan):6.1f} "
            f"{r.get('step_over_floor', math.nan):5.2f} {100 * r.get('compression_share', 0):6.1f} "
            f"{r.get('preemptions', 0):7d}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
