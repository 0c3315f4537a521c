"""The serving benchmark's report: the highest sustained rates, the JSON, a plot and a Markdown table,
and the merge of several runs (one system or one rate each) into one report."""

from __future__ import annotations

import json
from pathlib import Path


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for system, rows in report["systems"].items():
        rates = [r["rate"] for r in rows]
        axes[0].plot(rates, [r["throughput_tok_s"] for r in rows], "o-", label=system)
        axes[1].plot(rates, [r["itl_p99_ms"] for r in rows], "o-", label=system)
        axes[2].plot(rates, [r["ttft_p99_ms"] for r in rows], "o-", label=system)
    axes[1].axhline(report["itl_slo_ms"], color="gray", ls="--", lw=1, label=f"SLO {report['itl_slo_ms']:g} ms")
    for ax, title in zip(axes, ("output tokens/s", "p99 inter-token latency (ms)", "p99 time to first token (ms)")):
        ax.set_xlabel("request rate (requests/s)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    fig.suptitle(f"{report['model']}: input {report['input_len'][0]}-{report['input_len'][1]} tokens, "
                 f"output {report['output_len']} forced, same KV memory")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def table(report: dict) -> str:
    lines = ["| system | rate (req/s) | tok/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | started / arrived | sustained |",
             "|---|---|---|---|---|---|---|"]
    for system, rows in report["systems"].items():
        for r in rows:
            lines.append(f"| {system} | {r['rate']:g} | {r['throughput_tok_s']:.0f} | {r['ttft_p50_ms']} / "
                         f"{r['ttft_p99_ms']} | {r['itl_p50_ms']} / {r['itl_p99_ms']} | {r['started']} / "
                         f"{r['requests']} | {'yes' if r['sustained'] else 'no'} |")
    best = report["highest_sustained_rate"]
    lines.append("")
    lines.append("Highest rate sustained with p99 ITL < {:g} ms: ".format(report["itl_slo_ms"])
                 + ", ".join(f"{s} {best[s] if best[s] is not None else 'none'}" for s in best))
    return "\n".join(lines)


def finish(report: dict, out: Path, plot_path: Path | None) -> None:
    """The highest sustained rates, the JSON, the plot and the table."""
    report["highest_sustained_rate"] = {}
    for system, rows in report["systems"].items():
        rows.sort(key=lambda r: r["rate"])
        ok = [r["rate"] for r in rows if r["sustained"]]
        report["highest_sustained_rate"][system] = max(ok) if ok else None
    best = report["highest_sustained_rate"]
    if best.get("zipage") and best.get("full"):
        report["sustained_rate_ratio"] = round(best["zipage"] / best["full"], 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, plot_path or out.with_suffix(".png"))
    print(table(report))


def combine(paths: list[str]) -> dict:
    """One report from several runs of the same setup (e.g. one system or one rate per run)."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    merged = {k: v for k, v in reports[0].items() if k not in ("systems", "highest_sustained_rate")}
    merged["rates"] = sorted({r for rep in reports for r in rep["rates"]})
    merged["systems"] = {}
    for rep in reports:
        for system, rows in rep["systems"].items():
            merged["systems"].setdefault(system, []).extend(rows)
    return merged
