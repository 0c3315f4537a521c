"""Render docs/benchmarks.md from the committed JSON results (run after a benchmark).

    python benchmarks/report.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def kernels_section(path: Path) -> str:
    d = json.loads(path.read_text())
    s = d["summary"]
    out = [
        "## Kernels",
        "",
        f"{s['device']}, torch {s['torch']}, triton {s['triton']}; device-to-device copy bandwidth measured in the "
        f"same run: **{s['copy_bandwidth_gbps']:.0f} GB/s** (bytes read + written). Qwen3-8B head shapes "
        "(32 query heads, 8 KV heads, head dim 128), bf16, medians of `triton.testing.do_bench`.",
        "",
        "```bash",
        "bash benchmarks/gpu_check.sh   # GPU tests, then python benchmarks/kernels.py",
        "```",
        "",
        "![kernel benchmark](assets/kernels.png)",
        "",
        "### Paged decode attention vs gathered KV + SDPA (page size 64)",
        "",
        "| batch | context | zipage ms | gathered SDPA ms | speed-up | GB/s | % of copy BW |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in d["rows"]:
        if r["kernel"] == "decode_attention" and r["page"] == 64:
            out.append(f"| {r['batch']} | {r['context']} | {r['ms']:.3f} | {r['baseline_ms']:.3f} | "
                       f"{r['speedup']:.2f}x | {r['gbps']:.0f} | {100 * r['frac_copy_bw']:.1f}% |")
    out += ["", "### Other kernels vs their PyTorch reference", "",
            "| kernel | size | Triton ms | PyTorch ms | speed-up | % of copy BW |", "|---|---|---:|---:|---:|---:|"]
    for r in d["rows"]:
        if r["kernel"] == "decode_attention" and r["page"] == 64:
            continue
        size = ", ".join(f"{k}={r[k]}" for k in ("batch", "tokens", "context", "page", "layer_stride") if k in r)
        bw = f"{100 * r['frac_copy_bw']:.1f}%" if "frac_copy_bw" in r else ""
        out.append(f"| {r['kernel']} | {size} | {r['ms']:.3f} | {r['baseline_ms']:.3f} | {r['speedup']:.2f}x | {bw} |")
    if "compression_one_sequence_ms" in s:
        out += ["", f"Compression of one sequence at budget 2048 (all 36 layers, {s['compression_one_sequence_ms']:.2f} ms "
                f"with 8 layers per batch) against one decode step of a 128-sequence batch: attention alone "
                f"{s['decode_step_attention_ms_b128']:.1f} ms, attention + weights floor "
                f"{s['decode_step_floor_ms_b128']:.1f} ms."]
    return "\n".join(out) + "\n"


def main() -> None:
    parts = ["# Benchmarks", "",
             "Every number on this page comes from a committed script and its committed JSON under "
             "`benchmarks/results/`; `python benchmarks/report.py` rewrites this page from them.", ""]
    kernels = ROOT / "benchmarks" / "results" / "kernels.json"
    if kernels.exists():
        parts.append(kernels_section(kernels))
        (ROOT / "docs" / "assets").mkdir(exist_ok=True)
        shutil.copy(kernels.with_suffix(".png"), ROOT / "docs" / "assets" / "kernels.png")
    (ROOT / "docs" / "benchmarks.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
