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
             "included). `v1` is the engine's prefill kernel, the others `kernels/paged_prefill.py`'s "
             "(`ZIPAGE_PREFILL_KERNEL=v2:<name>`); a ratio above 1 is faster than the baseline. The chunked step "
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
        lines.append(f"| {r['case']} | {base:.3f} | {base / v1['ms']:.2f}x | {best}: {base / done[best]['ms']:.2f}x "
                     f"({done[best]['ms']:.3f} ms) | {v1['ms'] / done[best]['ms']:.2f}x |")
    return "\n".join(lines + [""])
