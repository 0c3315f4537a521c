"""generate() speed and peak memory: zipage against DynamicCache for the same tokens.

    python benchmarks/generate_speed.py cpu                    # SmolLM2-135M on the CPU (minutes on 2 cores)
    python benchmarks/generate_speed.py cpu --long             # the same, 1,024 new tokens past a budget of 128
    python benchmarks/generate_speed.py gpu --time-budget 420  # random-weight Qwen3-0.6B / -8B shapes, one GPU

Every variant generates the same number of new tokens (``min_new_tokens = max_new_tokens``) from
the same prompts with ``DynamicCache`` ("full") and with ``cache_implementation="zipage"`` at each
budget, the caches interleaved, best of ``--repeats``.

- Speed: new tokens per second of the whole ``generate()`` call (prefill included). On the CPU
  also from the process's CPU time, which a shared machine disturbs far less than wall time.
- Peak memory: on the GPU ``torch.cuda.max_memory_allocated`` above what was allocated before the
  call (weights), and beside it the peak of the bytes the tensors requested (``peak_requested_bytes``:
  the allocator may hand a tensor a block up to 1 MiB larger, which the first counts); on the CPU the
  peak of the tensor storage the call allocates (``StoragePeak``, deterministic; in a separate, untimed run).

The GPU plan runs variants in order and skips (and records) those its time estimate says will not
fit in ``--time-budget`` seconds, so one call fits a fixed window. Results go to
``benchmarks/results/generate_speed_<device>.json``; a short table is printed last.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

try:
    from .storage_peak import StoragePeak
except ImportError:  # run as a script (also against an older zipage, for before/after runs)
    from storage_peak import StoragePeak

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Variant:
    model: str
    batch: int
    prompt: int
    new_tokens: int
    budgets: tuple = (None,)  # None: DynamicCache (full KV)
    cache_config: dict = field(default_factory=dict)  # zipage fields besides the budget


CPU_PLAN = [  # short: the CI machine has 2 cores (budget 4096 never evicts; 64 keeps 80 of up to 240 tokens)
    Variant("smollm2", 1, 112, 128, (None, 4096, 64), {"page_size": 16, "buffer": 16}),
]
CPU_LONG_PLAN = [  # --long: past the budget for most of the run (128 + 64 stored of up to 1,136 tokens)
    Variant("smollm2", 1, 112, 1024, (None, 4096, 128), {"page_size": 16, "buffer": 64}),
]
GPU_PLAN = [  # in order of priority: what does not fit in --time-budget is skipped (and recorded)
    Variant("qwen3-0.6b", 16, 200, 1024, (None, 512, 2048)),
    Variant("qwen3-8b", 16, 200, 1024, (None, 512, 2048)),
    Variant("qwen3-0.6b", 1, 200, 1024, (None, 512, 2048)),
    Variant("qwen3-8b", 1, 200, 1024, (None, 512, 2048)),
    Variant("qwen3-0.6b", 16, 200, 4096, (None, 512)),
    Variant("qwen3-8b", 16, 200, 4096, (None, 2048)),
    Variant("qwen3-0.6b", 1, 200, 16384, (None, 512)),
    Variant("qwen3-8b", 16, 200, 16384, (None, 2048)),
]

QWEN3 = {  # public architecture shapes; the weights are random
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}


def load(name: str, device: str):
    if name == "smollm2":
        from zipage.models import load_smollm2

        return load_smollm2()[0]
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=151936, max_position_embeddings=40960, rope_theta=1e6, **QWEN3[name])
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    return model.eval()


def run_once(model, ids, variant: Variant, budget, measure_memory: bool) -> dict:
    kw = dict(max_new_tokens=variant.new_tokens, min_new_tokens=variant.new_tokens, do_sample=False,
              pad_token_id=0, attention_mask=torch.ones_like(ids), return_dict_in_generate=True)
    if budget is not None:
        kw.update(cache_implementation="zipage", cache_config={"budget": budget, **variant.cache_config})
    cuda = ids.is_cuda
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        requested = torch.cuda.memory_stats().get("requested_bytes.all.current", 0)
    tracker = StoragePeak() if measure_memory and not cuda else None
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        if tracker is not None:
            with tracker:
                out = model.generate(ids, **kw)
        else:
            out = model.generate(ids, **kw)
    if cuda:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    row = {"seconds": wall, "cpu_seconds": cpu, "new_tokens": out.sequences.shape[1] - ids.shape[1]}
    if cuda:
        row["peak_bytes"] = torch.cuda.max_memory_allocated() - base
        # The bytes the tensors asked for: the allocator's block sizes above (what max_memory_allocated counts)
        # can exceed them by up to 1 MiB per block, a block it hands out whole when what is left would be smaller
        # (benchmarks/results/issue15/s28/call4: zipage's rows, regrown every few steps, land in such blocks)
        stats = torch.cuda.memory_stats()
        if "requested_bytes.all.peak" in stats:
            row["peak_requested_bytes"] = stats["requested_bytes.all.peak"] - requested
    elif tracker is not None:
        row["peak_bytes"] = tracker.peak
    cache = out.cache if hasattr(out, "cache") else out.past_key_values  # (transformers 5.24 renamed the field)
    row["stored"] = cache.get_seq_length() if budget is None else cache.stored_length()
    row["compressions"] = getattr(cache, "num_compressions", 0)
    del out, cache
    return row


def run_variant(model, variant: Variant, device: str, repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 20000, (variant.batch, variant.prompt), generator=g).to(device)
    rows = {b: None for b in variant.budgets}
    for _ in range(repeats):  # interleaved, so a slow spell of a shared machine hits every cache alike
        for budget in variant.budgets:
            r = run_once(model, ids, variant, budget, measure_memory=False)
            best = rows[budget]
            if best is None or r["cpu_seconds" if device == "cpu" else "seconds"] < best[
                    "cpu_seconds" if device == "cpu" else "seconds"]:
                rows[budget] = r
    if device == "cpu":  # memory in its own (untimed) run: the tracker slows every op
        for budget in variant.budgets:
            rows[budget]["peak_bytes"] = run_once(model, ids, variant, budget, measure_memory=True)["peak_bytes"]
    out = []
    for budget, r in rows.items():
        tokens = variant.batch * variant.new_tokens
        r.update(model=variant.model, batch=variant.batch, prompt=variant.prompt, budget=budget,
                 cache="full" if budget is None else f"zipage-{budget}", tokens_per_s=tokens / r["seconds"],
                 cpu_tokens_per_s=tokens / r["cpu_seconds"], cache_config=variant.cache_config)
        out.append(r)
    return out


# Before a variant of that model and batch has run: DynamicCache's step on the H200 with every length warmed
# (generate()'s Python and launch overhead sets it at these sizes: 20-22 ms for Qwen3-0.6B shapes and 28-33 ms
# for Qwen3-8B at batch 16, benchmarks/results/issue15/s24), with room for the runs that are slower.
GUESS_MS_PER_STEP = {"qwen3-0.6b": 30.0, "qwen3-8b": 40.0}


def estimate_seconds(variant: Variant, ms_per_step: dict, warmup: int = 0) -> float | None:
    known = ms_per_step.get((variant.model, variant.batch), GUESS_MS_PER_STEP.get(variant.model))
    if known is None:
        return None
    # DynamicCache slows as its context grows; a generous factor for the longer runs.
    longer = max(1.0, variant.new_tokens / 1024)
    steps = variant.new_tokens * (1 + 0.15 * longer) + min(warmup, variant.new_tokens)
    return steps * known / 1000 * len(variant.budgets)


def _out_path(args) -> Path:
    return Path(args.out) if args.out else RESULTS / f"generate_speed_{args.device}.json"


def write(args, argv, device: str, repeats: int, start: float, rows: list, skipped: list) -> None:
    import transformers

    import zipage

    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
            "command": " ".join(["python benchmarks/generate_speed.py", *(sys.argv[1:] if argv is None else argv)]),
            "zipage": getattr(zipage, "__version__", "?"), "label": args.label, "repeats": repeats,
            "seconds": time.perf_counter() - start}
    out = Path(args.out) if args.out else RESULTS / f"generate_speed_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows, "skipped": skipped}, indent=1) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("device", choices=("cpu", "gpu"))
    parser.add_argument("--repeats", type=int, default=None, help="runs per cache (default 2 on the CPU, 1 on the GPU)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: steadier on a shared machine)")
    parser.add_argument("--time-budget", type=float, default=420.0, help="GPU: seconds the variants may take")
    parser.add_argument("--warmup", type=int, default=128, help="gpu: new tokens of an untimed run of every cache "
                        "before each variant (0: none)")
    parser.add_argument("--long", action="store_true", help="cpu: 1,024 new tokens, mostly past the budget (minutes)")
    parser.add_argument("--only", default=None, help="run only the variants whose model name contains this")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="cap every variant's new tokens")
    parser.add_argument("--batch", type=int, default=None, help="run only the variants of this batch size")
    parser.add_argument("--min-new-tokens", type=int, default=None,
                        help="run only the variants of at least this many new tokens (after --max-new-tokens)")
    parser.add_argument("--budgets", default=None,
                        help="run only these caches, comma-separated: none (DynamicCache) and zipage budgets")
    parser.add_argument("--label", default="", help="a tag stored with the results (e.g. before / after)")
    parser.add_argument("--out", default=None, help="results JSON (default benchmarks/results/generate_speed_<device>.json)")
    args = parser.parse_args(argv)
    device = "cuda" if args.device == "gpu" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("gpu: CUDA is not available")
    if device == "cpu":
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if device == "cpu" else 1)
    import transformers

    import zipage

    plan = (CPU_LONG_PLAN if args.long else CPU_PLAN) if device == "cpu" else GPU_PLAN
    if args.only:
        plan = [v for v in plan if args.only in v.model]
    if args.batch:
        plan = [v for v in plan if v.batch == args.batch]
    if args.max_new_tokens:
        plan = [Variant(**{**asdict(v), "new_tokens": min(v.new_tokens, args.max_new_tokens)}) for v in plan]
    if args.min_new_tokens:
        plan = [v for v in plan if v.new_tokens >= args.min_new_tokens]
    if args.budgets:
        try:
            keep = [None if b.strip() == "none" else int(b) for b in args.budgets.split(",")]
        except ValueError:
            parser.error(f"--budgets {args.budgets!r}: expected none and/or integers, comma-separated")
        plan = [Variant(**{**asdict(v), "budgets": tuple(b for b in v.budgets if b in keep)}) for v in plan]
        plan = [v for v in plan if v.budgets]
        if not plan:
            parser.error(f"--budgets {args.budgets!r}: no variant left (their caches: none and zipage budgets "
                         "of the plan, after the other filters)")
    start = time.perf_counter()
    rows, skipped, ms_per_step, models = [], [], {}, {}
    for v in plan:
        left = args.time_budget - (time.perf_counter() - start)
        guess = estimate_seconds(v, ms_per_step, args.warmup if device == "cuda" else 0)
        if device == "cuda" and (left < 20 or (guess is not None and guess > left)):
            skipped.append({**asdict(v), "reason": f"estimated {guess or 0:.0f} s, {left:.0f} s left"})
            print(f"skip {v.model} batch {v.batch} {v.new_tokens} new tokens ({skipped[-1]['reason']})", flush=True)
            continue
        if v.model not in models:  # both GPU models fit at once (peaks are taken above what is allocated)
            models[v.model] = load(v.model, device)
            warm = Variant(v.model, 2, 64, 48, (None, 32), {"page_size": 16, "buffer": 16})
            run_variant(models[v.model], warm, device, 1)  # compiles the kernels, fills the allocator
        if device == "cuda" and args.warmup:  # every cache once at this variant's batch and prompt, untimed:
            # a cache's first run at new sizes pays for kernels and allocator segments the later ones reuse
            run_variant(models[v.model], Variant(**{**asdict(v), "new_tokens": min(v.new_tokens, args.warmup)}),
                        device, 1)
        got = run_variant(models[v.model], v, device, repeats)
        full = [r for r in got if r["budget"] is None]
        if full:
            ms_per_step[(v.model, v.batch)] = 1000 * full[0]["seconds"] / v.new_tokens
        for r in got:
            print(f"{r['model']:11s} b{r['batch']:<3d} {v.new_tokens:6d} new  {r['cache']:12s} "
                  f"{r['tokens_per_s']:9.1f} tok/s  peak {r.get('peak_bytes', 0) / 2**20:9.1f} MiB", flush=True)
        rows.extend(got)
        write(args, argv, device, repeats, start, rows, skipped)  # after every variant: a timeout loses nothing
    write(args, argv, device, repeats, start, rows, skipped)
    print(f"\nwrote {_out_path(args)}")
    print(table(rows, device))
    return 0


def table(rows: list[dict], device: str) -> str:
    """Markdown: every cache against the full cache of the same variant (the nearest one before it: a plan
    whose variants repeat the same settings, e.g. capped by ``--max-new-tokens``, compares within each run)."""
    speed = "cpu_tokens_per_s" if device == "cpu" else "tokens_per_s"
    lines = ["| model | batch | new tokens | cache | tok/s | vs full | peak MiB | vs full |",
             "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        full = next((f for f in reversed(rows[: i + 1]) if f["budget"] is None and all(
            f[k] == r[k] for k in ("model", "batch", "prompt", "new_tokens"))), None)
        fast = f"{r[speed] / full[speed]:.2f}x" if full else "-"
        mem = f"{r['peak_bytes'] / full['peak_bytes']:.2f}x" if full and full.get("peak_bytes") else "-"
        lines.append(f"| {r['model']} | {r['batch']} | {r['new_tokens']} | {r['cache']} | {r[speed]:.1f} | {fast} | "
                     f"{r.get('peak_bytes', 0) / 2**20:.1f} | {mem} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
