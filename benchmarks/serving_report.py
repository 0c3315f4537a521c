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
    plt.close(fig)
    if report.get("timeline"):
        timeline_plot(report, path.with_name(path.stem + "_timeline.png"))


def timeline_plot(report: dict, path: Path) -> None:
    """The server's running and waiting requests and KV use over a staircase run, per system."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    for system, samples in report["timeline"].items():
        t = [s[0] for s in samples]
        line, = axes[0].plot(t, [s[1] for s in samples], label=f"{system}: running")
        axes[0].plot(t, [s[2] for s in samples], ls="--", color=line.get_color(), label=f"{system}: waiting")
        axes[1].plot(t, [100 * (s[3] or 0) for s in samples], color=line.get_color(), label=system)
    # each system's own stages (a combined report holds systems run with different rates)
    stages = {system: [r["rate"] for r in rows] for system, rows in report["systems"].items()}
    same = len({tuple(v) for v in stages.values()}) <= 1
    for ax in axes:
        for system, rates in stages.items():
            if system not in report["timeline"]:
                continue
            color = next(ln.get_color() for ln in ax.get_lines() if ln.get_label().split(":")[0] == system)
            for k in range(1, len(rates)):
                ax.axvline(k * report["duration_s"], color="gray" if same else color, lw=0.6, alpha=0.5, ls=":")
        label = "; ".join(f"{s}: " + ", ".join(f"{r:g}" for r in rates) for s, rates in stages.items()
                          if s in report["timeline"])
        ax.set_xlabel(f"seconds (rate steps every {report['duration_s']:g} s, req/s: {label})", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("requests in the server")
    axes[1].set_title("KV pages in use (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(report: dict) -> str:
    slo = report.get("ttft_slo_s")
    started = f"started in {slo:g} s / arrived" if slo else "started / arrived"
    lines = [f"| system | rate (req/s) | tok/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | {started} | running (mean) "
             "| sustained |", "|---|---|---|---|---|---|---|---|"]
    for system, rows in report["systems"].items():
        for r in rows:
            lines.append(f"| {system} | {r['rate']:g} | {r['throughput_tok_s']:.0f} | {r['ttft_p50_ms']} / "
                         f"{r['ttft_p99_ms']} | {r['itl_p50_ms']} / {r['itl_p99_ms']} | "
                         f"{r.get('started_in_time', r['started'])} / {r['requests']} | {r.get('mean_running', '')} | "
                         f"{'yes' if r['sustained'] else 'no'} |")
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
    merged["systems"], merged["timeline"] = {}, {}
    for rep in reports:
        for system, rows in rep["systems"].items():
            merged["systems"].setdefault(system, []).extend(rows)
        for system, samples in rep.get("timeline", {}).items():
            merged["timeline"][system] = samples
    return merged
