"""The prefill section of the benchmarks page, from ``benchmarks/prefill_tune.py``'s JSON
(``benchmarks/results/prefill/prefill_tune.json``)."""

from __future__ import annotations

import json
from pathlib import Path


def prefill_section(results: Path) -> str:
    path = results / "prefill" / "prefill_tune.json"
    if not path.exists():
        return ""
    d = json.loads(path.read_text())
    s = d["summary"]
    lines = ["## Prefill attention over paged KV", "",
             f"{s['device']}, torch {s['torch']}, triton {s['triton']}; Qwen3-8B heads ({s['heads'][0]} query, "
             f"{s['heads'][1]} KV, head dim {s['head_dim']}), {s['page']}-token pages, bf16 "
             f"(`python benchmarks/prefill_tune.py`, `{path.relative_to(results.parent.parent)}`). The baseline gathers "
             "the pages into contiguous keys and values and calls SDPA (its fastest formulation; gather "
             "included). `v1` is the first prefill kernel, the others `kernels/paged_prefill.py`'s "
             "(`ZIPAGE_PREFILL_KERNEL=v2:<name>`; the engine's default launch follows this sweep); a ratio above 1 is faster than the baseline. The chunked step "
             "is timed as the engine runs it: the chunk through the prefill kernel, the 64 single-query rows "
             "through the decode kernel.", "",
             "| case | baseline ms | v1 | fastest v2 | v2 / v1 |", "|---|---|---|---|---|"]
    for r in d["rows"]:
        base = r.get("best_baseline_ms", r["baseline_ms"])
        k = r["kernels"]
        # the chunked step: what the engine runs (the chunk through a prefill kernel, the single-query
        # rows through the decode kernel) when the benchmark timed it
        engine = "v1-prefill+decode" in k
        v1 = k.get("v1-prefill+decode" if engine else "v1", {})
        done = {n: v for n, v in k.items() if "ms" in v and v.get("ok") and not n.startswith("v1")
                and ("+" in n) == engine}
        if not done or "ms" not in v1:
            continue
        best = min(done, key=lambda n: done[n]["ms"])
        # (this sweep predates the prefill's dequantization of 8-bit pages: its FP8 launches read codes)
        note = " (codes in the kernel; dequantized first, the default since: below)" if r["case"].startswith("fp8") else ""
        lines.append(f"| {r['case']} | {base:.3f} | {base / v1['ms']:.2f}x | {best}: {base / done[best]['ms']:.2f}x "
                     f"({done[best]['ms']:.3f} ms){note} | {v1['ms'] / done[best]['ms']:.2f}x |")
    return "\n".join(lines + [""] + torch_rows(results) + engine_rows(results) + fp8_rows(results))


def _best(kernel: dict) -> float:
    """A kernel's speed against the baseline's fastest formulation (``ratio_best``), as the first table's; a
    sweep that recorded only the ratio to the explicit-mask formulation gives that."""
    return kernel.get("ratio_best", kernel["ratio"])


TORCH_RUN = "issue15/s24/call2/prefill_tune.json"  # the sweep run with PyTorch's own attention beside the kernel


def torch_rows(results: Path) -> list[str]:
    """Whole prompts through PyTorch's own attention over the step's keys and values (no gather):
    what a prefill with nothing stored before it could call instead of the paged kernel."""
    path = results / TORCH_RUN
    if not path.exists():
        return []
    rows = [r for r in json.loads(path.read_text())["rows"] if "sdpa-fresh" in r["kernels"]]
    names = ("m64n64w4s3-tma", "flash-fresh", "sdpa-fresh", "cudnn-varlen")
    label = {"m64n64w4s3-tma": "Triton kernel (m64n64w4s3-tma)", "flash-fresh": "FlashAttention, variable length",
             "sdpa-fresh": "SDPA per sequence", "cudnn-varlen": "cuDNN, ragged"}
    lines = ["### PyTorch's own attention on whole prompts", "",
             f"The same baseline, from a later run of the sweep (`{path.relative_to(results.parent.parent)}`): "
             "PyTorch's own attention over the step's keys and values as the engine holds them (no gather), "
             "which a prefill with nothing stored before it could call instead of reading the pool. None "
             "reaches the baseline, whose SDPA takes each case's equal-length prompts in one cuDNN call. "
             "FlashAttention stays below the Triton kernel. SDPA per sequence (cuDNN) beats the kernel at 2K-4K "
             "here only because each case repeats one length, so its plans are built once: cuDNN builds a plan "
             "for every new shape (34-49 ms of host time, the ragged column and `benchmarks/sdpa_host.py`), "
             "which an engine's prompts, each of its own length, would pay every time. "
             "The engine keeps the Triton kernel.", "",
             "| case | " + " | ".join(label[n] for n in names) + " |", "|---|" + "---|" * len(names)]
    for r in rows:
        cells = []
        for n in names:
            k = r["kernels"].get(n, {})
            cells.append(f"{_best(k):.2f}x ({k['ms']:.3f} ms)" if "ms" in k else "-")
        lines.append(f"| {r['case']} | " + " | ".join(cells) + " |")
    return lines + [""]


def engine_rows(results: Path) -> list[str]:
    """The engine with each prefill kernel on the long-prompt workload (``benchmarks/throughput.py
    --workload long-prompt``, one GPU call, ``ZIPAGE_PREFILL_KERNEL`` set per run)."""
    folder = results / "prefill" / "engine_longprompt"
    runs = []
    for name in ("v1", "v2", "v1_warm", "v2_warm"):
        path = folder / f"longprompt_{name}.json"
        if path.exists():
            d = json.loads(path.read_text())
            runs.append((name, d, d["systems"][0] if isinstance(d["systems"], list) else next(iter(d["systems"].values()))))
    if not runs:
        return []
    d0 = runs[0][1]
    lines = ["### The engine's prefill kernel on long prompts", "",
             f"{d0['device']}, random-weight {d0['model']}, {d0['requests']} requests of "
             f"{d0['prompt_len'][0]:,}-{d0['prompt_len'][1]:,}-token prompts (mean {d0['mean_prompt_tokens']:,.0f}) "
             f"and {d0['max_tokens']} new tokens, budget 2048 (`{folder.relative_to(results.parent.parent)}`). "
             "The pairs ran one after the other in two GPU calls on the same machine: in the first pair the v1 run "
             "also paid for compiling the kernels both runs share, so the second pair (every kernel compiled) is "
             "the comparison. TTFT includes the wait behind other requests' prefills.", "",
             "| run | prefill kernel | TTFT mean / p50 / p99 (s) | tok/s | wall (s) |", "|---|---|---|---|---|"]
    for name, d, r in runs:
        lines.append(f"| {'second' if name.endswith('warm') else 'first'} | {d['prefill_kernel']} | "
                     f"{r['ttft_mean_s']:.2f} / {r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {r['wall_s']:.1f} |")
    return lines + [""]


FP8_RUN = "issue15/s29/call3"  # the prefill over 8-bit pages dequantized first against the kernel reading codes
FP8_ORDER = ("longprompt_fp8_m128n64w8s3-tma-codes_1", "longprompt_fp8_v2_1", "longprompt_fp8_m128n64w8s3-tma-codes_2",
             "longprompt_fp8_v2_2", "longprompt_bf16")  # the order they ran in


def fp8_rows(results: Path) -> list[str]:
    """8-bit pages: the step's pages dequantized into a 16-bit scratch pool first (the default) against the kernel
    reading the codes (``-codes``): the sweep's FP8 case, then the engine's long-prompt TTFT in run order."""
    folder = results / FP8_RUN
    tune = folder / "prefill_tune.json"
    if not tune.exists():
        return []
    rows = [r for r in json.loads(tune.read_text())["rows"] if r["case"].startswith("fp8")]
    lines = ["### Prefill over FP8 pages: dequantized first, or read as codes by the kernel", "",
             "By default a prefill over 8-bit pages (FP8, INT8) with 16-bit queries first dequantizes the pages the "
             "step reads into a 16-bit scratch pool (one pass, `dequantize_pages` in `kernels/paged_prefill.py`), "
             "then runs the 16-bit kernel and launch on it; `-codes` launches read the codes in the kernel, "
             "converting each key and value tile for every block of queries that reads it. Same baseline as above "
             f"(gather + SDPA on bf16 pages), same machine and call (`{folder.relative_to(results.parent.parent)}`).",
             "", "| case | launch | ms | against the baseline |", "|---|---|---|---|"]
    for r in rows:
        for name, k in r["kernels"].items():
            if "ms" in k and name != "v1":
                kind = "codes in the kernel" if name.endswith("-codes") else "dequantized first"
                lines.append(f"| {r['case']} | {name} ({kind}) | {k['ms']:.3f} | {_best(k):.2f}x |")
    runs = []
    for name in FP8_ORDER:
        path = folder / f"{name}.json"
        if path.exists():
            d = json.loads(path.read_text())
            runs.append((name, d, next(iter(d["systems"].items()))))
    if runs:
        d0 = runs[0][1]
        lines += ["", f"The engine on the long-prompt workload ({d0['device']}, random-weight {d0['model']}, "
                  f"{d0['requests']} requests of {d0['prompt_len'][0]:,}-{d0['prompt_len'][1]:,}-token prompts, "
                  f"{d0['max_tokens']} new tokens, {d0['kv_gib']} GiB of KV), in the order the runs went; the first "
                  "run also compiled the kernels:", "",
                  "| run | system | prefill over 8-bit pages | TTFT mean / p50 / p99 (s) | tok/s | wall (s) |",
                  "|---|---|---|---|---|---|"]
        for i, (name, d, (system, r)) in enumerate(runs, 1):
            how = "-" if "fp8" not in system else ("codes in the kernel" if "codes" in name else "dequantized first")
            lines.append(f"| {i} | {system} | {how} | {r['ttft_mean_s']:.2f} / {r['ttft_p50_s']:.2f} / "
                         f"{r['ttft_p99_s']:.2f} | {r['tokens_per_s']:.0f} | {r['wall_s']:.1f} |")
    return lines + [""]
