"""The results of ``zipage eval`` as a Markdown table and a chart (accuracy and tokens/s against budget)."""

from __future__ import annotations

import math
import pathlib
import sys
from typing import Any


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    scored = {r.get("problems_scored") for r in result["configurations"]} - {None}
    over = "problems" if scored <= {0, result["problems"]} else \
        f"the {'/'.join(map(str, sorted(scored)))} problems with a reference answer"
    lines = [
        f"# zipage eval: {result['model']} on {s['dataset']}",
        "",
        f"{result['problems']} problems x {s['n']} samples (temperature {s['temperature']}, top_p {s['top_p']}, "
        f"max_tokens {s['max_tokens']}), {result['device']}. pass@1: the share of right samples, averaged over "
        f"{over} (± its standard error over them).",
        "",
        "| configuration | budget | pass@1 | ± | mean output tokens | cut at max_tokens | tokens/s | wall s "
        "| compressions | preemptions |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["configurations"]:
        se = r["stderr"]
        lines.append(
            f"| {r['label']} | {r['budget'] if r['budget'] is not None else 'full'} | {_pct(r['pass@1'])} | "
            f"{'-' if se is None or math.isnan(se) else f'{100 * se:.1f}'} | {r['mean_output_tokens']:.0f} | "
            f"{_pct(r['cut_at_max_tokens'])} | {_rate(r['tokens_per_s'])} | {r['wall_s']:.1f} | "
            f"{r['engine']['compressions']} | {r['engine']['preemptions']} |")
    if result.get("incomplete"):
        lines += ["", f"**Incomplete run**: {result['incomplete']} finished (interrupted, or still running)."]
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def _rate(x: float) -> str:
    """Tokens/s: whole numbers from 100 up, a decimal below (a CPU's 1.0 and 1.5 must not both read 1)."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def plot(result: dict[str, Any], path: pathlib.Path) -> bool:
    """Two panels against the budget (log scale): pass@1 and tokens/s, one line per scorer; full KV is
    a dashed line across. Without matplotlib, says so on stderr and draws nothing (returns False)."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no chart {path.name} (pip install matplotlib; then --replot the .json)",
              file=sys.stderr)
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["configurations"]
    full = [r for r in rows if r["budget"] is None]
    by_scorer: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["budget"] is not None:
            by_scorer.setdefault(r["label"].split("@")[0], []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    panels = (("pass@1", "pass@1 (%)", 100), ("tokens_per_s", "output tokens/s", 1))
    for ax, (key, title, scale) in zip(axes, panels):
        for name, points in by_scorer.items():
            points = sorted((p for p in points if p[key] is not None), key=lambda p: p["budget"])
            if points:
                ax.plot([p["budget"] for p in points], [scale * p[key] for p in points], marker="o", label=name)
        for r in full:
            if r[key] is not None:
                ax.axhline(scale * r[key], color="black", linestyle="--", linewidth=1, label="full KV")
        budgets = sorted({r["budget"] for r in rows if r["budget"] is not None})
        if budgets:
            ax.set_xscale("log", base=2)
            ax.set_xticks(budgets, [str(b) for b in budgets])
            ax.minorticks_off()
        values = [scale * r[key] for r in rows if r[key] is not None]
        ax.set_ylim(0, 1.12 * max(values) if values and max(values) > 0 else 1)
        ax.set_xlabel("KV budget (tokens per sequence)")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{result['model']} on {result['settings']['dataset']} "
                 f"({result['problems']} problems x {result['settings']['n']} samples)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
