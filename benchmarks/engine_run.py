"""The engine on one GPU: many long forced-length requests on a random-weight model from a real config.

    python benchmarks/engine_run.py --requests 128 --max-tokens 8192 --budget 2048

Checks that every request gets exactly its tokens and that every page is back in the pool, and
reports tokens/s, step times, concurrency, compressions and preemptions (JSON under --out). An untimed
warm-up first (kernel compilation, CUDA-graph capture, a compression) on prompts that share no page with
the timed ones; the peak memory and the engine's counters are those of the timed run.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

# Qwen3-8B's published shapes (config.json of Qwen/Qwen3-8B); weights are random.
QWEN3_8B = dict(
    vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False, use_sliding_window=False,
)
QWEN3_0_6B = dict(
    vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True, use_sliding_window=False,
)
MODELS = {"qwen3-8b": QWEN3_8B, "qwen3-0.6b": QWEN3_0_6B}


def build(name: str):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**MODELS[name])
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3ForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():  # keep activations tame with random weights
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    return model.eval()


def workload(n: int, vocab: int, seed: int = 0, shared_prefix: int = 128) -> list[list[int]]:
    """Short prompts (100-300 tokens); every fourth one starts with the same ``shared_prefix`` tokens (and is at
    least that long). The prefix cache serves whole pages only, so the default 128-token prefix is served from it
    with pages of at most 64 tokens (the last page-aligned part of a prompt is recomputed): at the benchmarks'
    256-token pages no page is shared, and every prompt is computed in full. (Kept at 128, so that runs stay
    comparable with the ones recorded; ``--shared-prefix`` above a page, say 300, shares one.)"""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(1000, vocab - 1000, (shared_prefix,), generator=g).tolist()
    prompts = []
    for i in range(n):
        length = int(torch.randint(100, 301, (1,), generator=g))
        body = torch.randint(1000, vocab - 1000, (length,), generator=g).tolist()
        prompts.append(shared + body[: length - shared_prefix] if i % 4 == 0 else body)
    return prompts


def warmup(llm, prompts: list[list[int]], max_tokens: int, budget: int | None) -> None:
    """An untimed run of the first two prompts reversed (sharing no page with any timed prompt, so that the timed
    run finds none of its prompts in the prefix cache), long enough for a compression with a budget; then the
    peak memory statistics and the counters the run reports start again."""
    import zipage

    params = zipage.SamplingParams(max_tokens=min(max_tokens, (budget or 256) + 300), temperature=0,
                                   ignore_eos=True)
    llm.generate([p[::-1] for p in prompts[:2]], params, use_tqdm=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    llm.scheduler.compressions = llm.scheduler.preemptions = llm.scheduler.evicted_tokens = 0


def main() -> None:
    import zipage

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3-8b", choices=sorted(MODELS))
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--budget", type=int, default=2048, help="0 for the full-KV engine")
    ap.add_argument("--page-size", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--async-compression", action="store_true")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--shared-prefix", type=int, default=128,
                    help="tokens every fourth prompt shares (whole pages of them are served from the prefix cache)")
    ap.add_argument("--out", default="benchmarks/results/engine_run.json")
    args = ap.parse_args()

    model = build(args.model)
    prompts = workload(args.requests, model.config.vocab_size, shared_prefix=args.shared_prefix)
    budget = args.budget or None
    t0 = time.perf_counter()
    llm = zipage.LLM(model, budget=budget, page_size=args.page_size, max_num_seqs=args.max_num_seqs,
                     async_compression=args.async_compression and budget is not None,
                     enforce_eager=args.enforce_eager)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    warmup(llm, prompts, args.max_tokens, budget)
    warm_s = time.perf_counter() - t0
    before = llm.stats()  # (counters the warm-up moved: prefix-cache hits, generated tokens)
    params = zipage.SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    ids = [llm.add_request(p, params) for p in prompts]
    steps, running_hist, step_ms = 0, [], []
    torch.cuda.synchronize()
    start = time.perf_counter()
    last = start
    while llm.has_unfinished():
        llm.step()
        now = time.perf_counter()
        step_ms.append((now - last) * 1000)
        last = now
        running_hist.append(len(llm.scheduler.running))
        steps += 1
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    outs = [llm.requests[r].output() for r in ids]
    exact = all(len(o.token_ids) == args.max_tokens and o.finish_reason == "length" for o in outs)
    stats = llm.stats()
    for key in ("prefix_cache_hits", "generated_tokens"):
        stats[key] -= before[key]
    pool_back = stats["free_pages"] == stats["total_pages"]
    tokens = sum(len(o.token_ids) for o in outs)
    steady = sorted(step_ms[len(step_ms) // 10 :])
    result = dict(
        model=args.model, async_compression=llm.async_compression, cuda_graphs=llm.use_graphs,
        requests=args.requests, max_tokens=args.max_tokens, budget=budget,
        page_size=args.page_size, shared_prefix=args.shared_prefix, setup_s=setup, warmup_s=warm_s,
        wall_s=wall, steps=steps, output_tokens=tokens,
        tokens_per_s=tokens / wall, mean_running=sum(running_hist) / len(running_hist), max_running=max(running_hist),
        median_step_ms=steady[len(steady) // 2], p90_step_ms=steady[int(len(steady) * 0.9)],
        peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30, every_request_exact=exact,
        every_page_back=pool_back, **{f"engine_{k}": v for k, v in stats.items()},
        device=torch.cuda.get_device_name(), torch=torch.__version__,
    )
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    for k, v in result.items():
        print(f"{k:28s} {v:.3f}" if isinstance(v, float) else f"{k:28s} {v}")
    assert exact, "a request did not get exactly its tokens"
    assert pool_back, "pages were not all returned"


if __name__ == "__main__":
    main()
