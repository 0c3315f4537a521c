"""Where a generate() decode step spends its time: zipage against DynamicCache, under torch.profiler.

    python benchmarks/profile_generate.py                          # SmolLM2-135M shapes on the CPU
    python benchmarks/profile_generate.py --model qwen3-8b --batch 16  # random-weight Qwen3 shapes, on CUDA

Each cache first runs untimed at the same sizes (kernels compiled, allocator filled), then runs
``--new-tokens`` tokens twice, interleaved, and the faster run's wall time per step is reported; then one
more short run of each is profiled (host activity only) and the ops that take the most host (CPU) time are
listed, with the number of calls per decode step, then the Python functions with the most own time
(cProfile): at the sizes generate() is used, a decode step on the GPU is bound by the host
work of launching it, so the host time per op is where a difference between caches shows.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

try:
    from .generate_speed import QWEN3
except ImportError:  # run as a script
    from generate_speed import QWEN3


def build(name: str, device: str):
    if name == "smollm2":
        from zipage.models import load_smollm2

        return load_smollm2()[0].to(device)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=151936, max_position_embeddings=40960, rope_theta=1e6, **QWEN3[name])
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        return Qwen3ForCausalLM._from_config(cfg, dtype=torch.bfloat16).eval()


def generate(model, ids, new_tokens: int, budget: str | None):
    """``budget``: None (DynamicCache), ``"N"`` (zipage, budget N) or ``"Nd"`` (zipage, budget N, its rows kept
    head-major and attended densely by the model's own attention, as on the CPU, instead of by the paged kernel);
    a ``c`` (``Nc``, ``Ndc``) lets the model's SDPA pick cuDNN on dense decode steps (``ZIPAGE_DENSE_CUDNN=1``)."""
    import zipage.cache as cache_mod

    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(ids))
    if budget is not None:
        kw.update(cache_implementation="zipage", cache_config={"budget": int(budget.rstrip("dc"))})
    real = cache_mod.use_triton
    if budget is not None and "d" in budget:
        cache_mod.use_triton = lambda *tensors: False  # only the cache's layout choice reads it
    old = os.environ.get("ZIPAGE_DENSE_CUDNN")
    if budget is not None and "c" in budget:  # the model's SDPA may pick cuDNN on dense steps (as before)
        os.environ["ZIPAGE_DENSE_CUDNN"] = "1"
    try:
        with torch.inference_mode():
            out = model.generate(ids, **kw)
    finally:
        cache_mod.use_triton = real
        if old is None:
            os.environ.pop("ZIPAGE_DENSE_CUDNN", None)
        else:
            os.environ["ZIPAGE_DENSE_CUDNN"] = old
    if ids.is_cuda:
        torch.cuda.synchronize()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", choices=["smollm2", *QWEN3])
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=200)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--budgets", default="none,2048", help="comma list: none (DynamicCache), zipage budgets, or "
                   "budgets with a 'd' (e.g. 2048d: zipage attended densely, without the paged kernel)")
    p.add_argument("--top", type=int, default=25, help="ops listed per cache")
    p.add_argument("--profile-tokens", type=int, default=24, help="new tokens of each profiled run")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = build(args.model, device)
    ids = torch.randint(100, 20000, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0)).to(device)
    budgets = [None if b.strip() == "none" else b.strip() for b in args.budgets.split(",")]
    def name(b):
        if b is None:
            return "DynamicCache"
        return f"zipage-{b.rstrip('dc')}" + (" dense" if "d" in b else "") + (" cudnn" if "c" in b else "")
    for b in budgets:  # untimed, at these sizes
        generate(model, ids, min(args.new_tokens, 64), b)
    best = {}
    for _ in range(2):
        for b in budgets:
            t = time.perf_counter()
            generate(model, ids, args.new_tokens, b)
            best[b] = min(best.get(b, float("inf")), time.perf_counter() - t)
    print(f"{args.model} on {device}, batch {args.batch}, prompt {args.prompt}, {args.new_tokens} new tokens "
          "(best of 2, prefill included):")
    for b in budgets:
        print(f"  {name(b):14s} {1000 * best[b] / args.new_tokens:8.2f} ms/token step"
              f"  ({best[b] / best[budgets[0]]:.2f}x the first)")
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    n = args.profile_tokens
    for b in budgets:  # host work only (tracing the device makes a run of these sizes take minutes)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            generate(model, ids, n, b)
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        events.sort(key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events)
        print(f"\n{name(b)}: aten host time {total / 1000 / n:.2f} ms per step under the profiler; "
              f"top {args.top} ops by self host time (per step: ms, calls)")
        for e in events[: args.top]:
            print(f"  {e.self_cpu_time_total / 1000 / n:8.3f} ms {e.count / n:8.1f}  {e.key[:90]}")
        pr = cProfile.Profile()
        pr.enable()
        generate(model, ids, n, b)
        pr.disable()
        st = pstats.Stats(pr)
        rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[: args.top]  # by own (tottime) Python time
        print(f"{name(b)}: Python functions by own time under cProfile (per step: ms own, ms with callees, calls)")
        for (file, line, fn), (cc, nc, tt, ct, _) in rows:
            where = "/".join(file.split("/")[-2:])
            print(f"  {1000 * tt / n:8.3f} {1000 * ct / n:8.3f} {nc / n:8.1f}  {where}:{line} {fn}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
