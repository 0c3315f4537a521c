"""Draw the figures of the documentation into docs/assets/: ``python docs/figures.py``.

Diagrams of the method (pages, budget, eviction, compaction, scheduling, prefix caching, async
compression) are drawn from the rules they show; the plots read committed measurements:
``docs/assets/memory_over_time.json`` (made by ``--measure``, SmolLM2-135M-Instruct on the CPU through
integrations/space/sidebyside.py) and ``benchmarks/results/*.json`` (H100 runs).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Rectangle  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "docs" / "assets"
RESULTS = ROOT / "benchmarks" / "results"
BLUE, GREY, LIGHT, RED, GREEN, ORANGE = "#2563eb", "#6b7280", "#e5e7eb", "#dc2626", "#16a34a", "#ea580c"
REQUEST_COLORS = ["#2563eb", "#16a34a", "#ea580c", "#9333ea"]


def _box(ax, x, y, w, h, color, text="", text_color="white", fontsize=8, alpha=1.0, edge="white"):
    ax.add_patch(Rectangle((x, y), w, h, facecolor=color, edgecolor=edge, lw=1, alpha=alpha))
    if text:
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize, color=text_color)


def _canvas(w, h, xlim, ylim):
    fig, ax = plt.subplots(figsize=(w, h), dpi=110)
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_axis_off()
    return fig, ax


def _save(fig, name: str) -> None:
    fig.savefig(ASSETS / name, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    print("wrote", ASSETS / name)


# ----------------------------------------------------------------------------------------- diagrams
def pages_and_page_tables() -> None:
    """A shared pool of pages; each request's page table lists its pages, for every layer and head."""
    fig, ax = _canvas(9, 3.6, (0, 18), (-0.5, 7.4))
    owner = {0: 0, 1: 1, 2: 0, 3: 2, 4: 1, 5: None, 6: 0, 7: 2, 8: None, 9: 1, 10: None, 11: None}
    ax.text(0, 6.9, "KV pool of one layer: [num_pages, page_size, H_kv, D] for K and for V", fontsize=9)
    for page, req in owner.items():
        color = REQUEST_COLORS[req] if req is not None else LIGHT
        _box(ax, page * 1.45, 5.2, 1.35, 1.2, color, f"page {page}", "white" if req is not None else GREY)
    tables = {0: [0, 2, 6], 1: [1, 4, 9], 2: [3, 7]}
    for req, pages in tables.items():
        y = 3.6 - req * 1.4
        ax.text(0, y + 0.35, f"request {req} page table", fontsize=8, color=REQUEST_COLORS[req])
        for i, page in enumerate(pages):
            _box(ax, 4.2 + i * 1.1, y, 1.0, 0.8, REQUEST_COLORS[req], str(page))
            ax.add_patch(FancyArrowPatch((4.7 + i * 1.1, y + 0.8), (page * 1.45 + 0.67, 5.2), arrowstyle="-|>",
                                         mutation_scale=7, color=REQUEST_COLORS[req], alpha=0.35, lw=0.8))
    ax.text(8.2, 2.3, "one table per request serves every layer and every KV head:\n"
            "all heads keep the same number of tokens,\nonly which token sits in each slot differs.\n"
            "Grey pages are free for any request.", fontsize=8.5, va="center")
    _save(fig, "concept_pages.png")


def budget_and_buffer(budget=2048, buffer=256, page=256, prompt=600, steps=5000) -> None:
    """Stored length S against logical length L: S follows L, then saws between B and B + buffer."""
    logical, stored, pages, compress_at = [], [], [], []
    s = prompt
    for t in range(steps):
        q = 1
        if s > budget and s + q > budget + buffer:
            s = budget
            compress_at.append(prompt + t)
        s += q
        logical.append(prompt + t + 1)
        stored.append(s)
        pages.append(math.ceil(s / page))
    fig, ax = plt.subplots(figsize=(8, 3.4), dpi=110)
    ax.plot(logical, logical, color=GREY, lw=1.5, label="full KV: stores every token (L)")
    ax.plot(logical, stored, color=BLUE, lw=1.5, label="zipage: stored tokens S")
    ax.axhline(budget, color=GREEN, ls="--", lw=1)
    ax.axhline(budget + buffer, color=RED, ls="--", lw=1)
    ax.text(logical[-1], budget - 60, f"budget B = {budget}", ha="right", va="top", fontsize=8, color=GREEN)
    ax.text(logical[-1], budget + buffer + 40, f"B + buffer = {budget + buffer}  (N_max = {math.ceil((budget + buffer) / page)} pages)",
            ha="right", va="bottom", fontsize=8, color=RED)
    ax.plot(compress_at, [budget] * len(compress_at), "v", color=RED, ms=4, label="compression")
    ax.set_xlabel("logical length L (prompt + generated tokens)")
    ax.set_ylabel("tokens stored per layer and head")
    ax.set_ylim(0, 4000)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    ax.set_title(f"Budget and buffer (page size {page}): S never exceeds B + buffer after the prompt", fontsize=10)
    _save(fig, "concept_budget.png")


def same_count_eviction() -> None:
    """Token-wise, per (layer, KV head) selection with the same count per head."""
    import random

    rng = random.Random(3)
    S, k, window, heads = 16, 8, 3, 3
    fig, ax = _canvas(9, 3.3, (-2.6, 17.5), (-4.2, 3.9))
    ax.text(-2.6, 3.5, f"one layer, S = {S} stored tokens, budget k = {k}: each KV head keeps its own top-{k}"
            f" (the last {window} always), so every head keeps exactly {k}", fontsize=8.5)
    for h in range(heads):
        y = 2.2 - h * 1.0
        ax.text(-0.3, y + 0.4, f"head {h}", ha="right", va="center", fontsize=8)
        scores = [rng.random() for _ in range(S - window)]
        top = sorted(range(S - window), key=lambda i: -scores[i])[: k - window]
        kept = sorted(top + list(range(S - window, S)))
        for i in range(S):
            keep = i in kept
            _box(ax, i, y, 0.95, 0.8, BLUE if keep else LIGHT, str(i), "white" if keep else GREY, 7)
        for j, i in enumerate(kept):
            _box(ax, j + 0.0, -1.3 - h * 0.95, 0.95, 0.8, BLUE, str(i), "white", 7)
        ax.text(k + 0.3, -0.9 - h * 0.95, f"head {h}: slots 0..{k - 1}", fontsize=7.5, va="center")
    ax.text(-2.6, -0.55, "after compaction\n(positions kept):", fontsize=8, va="center")
    ax.text(11.5, -2.3, "same count per head\n-> one page table\n   still serves all heads", fontsize=8.5,
            va="center", color=GREEN)
    _save(fig, "concept_eviction.png")


def in_place_compaction() -> None:
    """Kept tokens move, in order, to the first slots; the write cursor never passes the read cursor."""
    page, S = 4, 12
    kept = [0, 2, 3, 6, 9, 10, 11]
    fig, ax = _canvas(9.5, 3.0, (-1.8, 15.5), (-2.8, 3.2))
    ax.text(-1.8, 2.8, "one (layer, head): kept indices [0, 2, 3, 6, 9, 10, 11] -> slots 0..6, in order, in place",
            fontsize=8.5)
    for i in range(S):
        _box(ax, i, 1.2, 0.95, 0.8, BLUE if i in kept else LIGHT, str(i), "white" if i in kept else GREY, 8)
    ax.text(-0.2, 1.6, "before", ha="right", va="center", fontsize=8)
    for j in range(S):
        if j < len(kept):
            _box(ax, j, -1.2, 0.95, 0.8, BLUE, str(kept[j]), "white", 8)
        else:
            _box(ax, j, -1.2, 0.95, 0.8, "white", "", edge=LIGHT)
    ax.text(-0.2, -0.8, "after", ha="right", va="center", fontsize=8)
    for j, i in enumerate(kept):
        if i != j:
            ax.add_patch(FancyArrowPatch((i + 0.47, 1.2), (j + 0.47, -0.4), arrowstyle="-|>", mutation_scale=8,
                                         color=GREY, lw=0.8))
    for p in range(S // page):
        x = p * page
        ax.add_patch(Rectangle((x - 0.04, -1.28), page - 0.02, 0.96, fill=False, edgecolor=ORANGE, lw=1.5))
        ax.text(x + page / 2, -1.55, f"page {p}" + (" (freed when surplus)" if p * page >= 8 else ""), ha="center",
                va="top", fontsize=7.5, color=ORANGE)
    ax.text(12.3, 0.2, "keep[j] >= j:\nslot j is written\nonly after token\nkeep[j] was read", fontsize=8,
            va="center")
    _save(fig, "concept_compaction.png")


def concurrency_from_memory(bytes_per_token=147456, budget=2048, buffer=256, page=256) -> None:
    """Requests that fit at once in a KV memory: full KV (whole context) against zipage (N_max pages)."""
    gib = [g for g in range(4, 97, 2)]
    n_max = math.ceil((budget + buffer) / page)
    page_bytes = page * bytes_per_token
    fig, ax = plt.subplots(figsize=(8, 3.4), dpi=110)
    for ctx, style in ((8192, ":"), (16384, "--"), (32768, "-.")):
        per = math.ceil(ctx / page)
        ax.plot(gib, [int(g * 2**30 // page_bytes) // per for g in gib], style, color=GREY,
                label=f"full KV, {ctx:,}-token contexts")
    ax.plot(gib, [int(g * 2**30 // page_bytes) // n_max for g in gib], color=BLUE, lw=2,
            label=f"zipage, B = {budget} (N_max = {n_max} pages, any length)")
    ax.set_xlabel("KV memory (GiB), Qwen3-8B shapes (144 KiB per token, bf16)")
    ax.set_ylabel("requests that fit at once")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title("Max concurrency from memory: M = num_pages // N_max", fontsize=10)
    _save(fig, "concept_concurrency.png")


def scheduler_timeline() -> None:
    """What the compression-aware scheduler does, step by step, in a small pool."""
    fig, ax = _canvas(9, 3.4, (0, 20), (-0.6, 6.2))
    rows = [
        ("A (compressed)", [("prefill", 0, 1, GREY), ("decode", 1, 5, BLUE), ("C", 6, 0.5, RED),
                            ("decode", 6.5, 5, BLUE), ("C", 11.5, 0.5, RED), ("decode", 12, 7, BLUE)]),
        ("B (compressed)", [("prefill", 1, 1, GREY), ("decode", 2, 6, BLUE), ("C", 8, 0.5, RED),
                            ("decode", 8.5, 10.5, BLUE)]),
        ("C (not yet)", [("prefill", 2, 1.5, GREY), ("decode", 3.5, 3.5, BLUE), ("preempted", 7, 2.5, LIGHT),
                         ("recompute", 9.5, 2, GREY), ("decode", 11.5, 7.5, BLUE)]),
        ("D (waiting)", [("waiting", 0, 4, LIGHT), ("prefill", 4, 1, GREY), ("decode", 5, 14, BLUE)]),
    ]
    for r, (name, spans) in enumerate(rows):
        y = 4.6 - r * 1.3
        ax.text(0, y + 0.95, name, fontsize=8)
        for label, x0, w, color in spans:
            dark = color not in (LIGHT,)
            _box(ax, x0, y, w, 0.8, color, label if w >= 1 else label, "white" if dark else GREY, 7)
    ax.text(0, -0.5, "C = compression (back to B tokens; surplus pages freed).  A compressed request is never "
            "preempted: when pages run out,\nthe newest uncompressed one is (its pages freed, recomputed later). "
            "Admission: at most num_pages // N_max running.", fontsize=7.8)
    _save(fig, "concept_scheduler.png")


def prefix_caching() -> None:
    """Shared prompt pages are never written: a first compression compacts into fresh pages."""
    fig, ax = _canvas(9, 3.0, (0, 18), (-0.4, 5.4))
    ax.text(0, 5.0, "two requests with the same 2-page system prompt", fontsize=8.5)
    for i, (page, color) in enumerate(((0, ORANGE), (1, ORANGE))):
        _box(ax, 1 + i * 1.6, 3.4, 1.5, 1.0, color, f"page {page}\nshared\nref 2", fontsize=7)
    _box(ax, 4.2, 3.9, 1.5, 0.8, BLUE, "page 2 (A)", fontsize=7)
    _box(ax, 4.2, 2.9, 1.5, 0.8, GREEN, "page 3 (B)", fontsize=7)
    ax.add_patch(FancyArrowPatch((6.2, 3.8), (8.4, 3.8), arrowstyle="-|>", mutation_scale=10, color=GREY))
    ax.text(7.3, 4.05, "A's first\ncompression", ha="center", fontsize=7.5)
    _box(ax, 8.8, 3.4, 1.5, 1.0, ORANGE, "page 0\nref 1 (B)", fontsize=7)
    _box(ax, 10.4, 3.4, 1.5, 1.0, ORANGE, "page 1\nref 1 (B)", fontsize=7)
    _box(ax, 12.2, 3.9, 1.5, 0.8, BLUE, "page 4 (A)", fontsize=7)
    _box(ax, 13.8, 3.9, 1.5, 0.8, BLUE, "page 5 (A)", fontsize=7)
    _box(ax, 12.2, 2.9, 1.5, 0.8, GREEN, "page 3 (B)", fontsize=7)
    ax.text(0, 1.6, "Shared (or still cached) pages are only read. A's kept tokens are compacted into fresh pages "
            "4 and 5;\nA drops its references to pages 0-2 (page 2, A's own, is freed), and a compressed request "
            "registers no more\nprefix hashes. B keeps reading the shared pages untouched.", fontsize=8, va="top")
    _save(fig, "concept_prefix.png")


def async_compression() -> None:
    """Compressions on a side stream overlap the other requests' decode steps."""
    fig, ax = _canvas(9, 2.4, (0, 20), (-0.3, 3.6))
    ax.text(0, 3.3, "main stream", fontsize=8)
    ax.text(0, 1.5, "side stream", fontsize=8)
    for s in range(9):
        x = 0.2 + s * 2.2
        label = "decode all" if s not in (3, 4) else "decode\n(not R)"
        _box(ax, x, 2.2, 2.0, 0.9, BLUE, label, fontsize=7)
    _box(ax, 0.2 + 3 * 2.2, 0.4, 3.6, 0.9, RED, "compress R (event)", fontsize=7)
    ax.add_patch(FancyArrowPatch((0.2 + 3 * 2.2 + 3.6, 1.3), (0.2 + 5 * 2.2 + 0.3, 2.2), arrowstyle="-|>",
                                 mutation_scale=8, color=GREY))
    ax.text(0.2 + 5 * 2.2 + 0.9, 1.4, "R rejoins once its event\nhas completed", fontsize=7.5)
    _save(fig, "concept_async.png")


# ----------------------------------------------------------------------------------------- plots
def measure_memory_over_time(budget=128, page_size=16, max_new_tokens=512) -> None:
    """Run SmolLM2 on a GSM8K problem with full KV and zipage; keep each cache's KV bytes per token."""
    sys.path.insert(0, str(ROOT / "integrations" / "space"))
    from sidebyside import Settings, side_by_side

    from zipage.demo import DEFAULT_INSTRUCTION
    from zipage.models import load_smollm2, math_problems

    model, tok = load_smollm2()
    question = math_problems("gsm8k", 1)[0]["problem"]
    ids = tok.apply_chat_template([{"role": "user", "content": f"{question}\n\n{DEFAULT_INSTRUCTION}"}],
                                  add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    settings = Settings(budget=budget, page_size=page_size, max_new_tokens=max_new_tokens)
    for snap in side_by_side(model, tok, ids, settings):
        pass
    out = {
        "what": "KV bytes after the prompt and after each generated token, SmolLM2-135M-Instruct fp32, GSM8K test #0, "
                "greedy; made by python docs/figures.py --measure",
        "prompt_tokens": len(ids), "budget": budget, "page_size": page_size, "buffer": settings.zipage_config().buffer,
        "full_kv_bytes": snap.full.kv_bytes, "zipage_kv_bytes": snap.zipage.kv_bytes,
        "compressions_at": snap.zipage.compressions_at, "first_difference": snap.first_difference,
        "full_tokens": len(snap.full.ids), "zipage_tokens": len(snap.zipage.ids),
    }
    (ASSETS / "memory_over_time.json").write_text(json.dumps(out) + "\n")
    print("wrote", ASSETS / "memory_over_time.json")


def memory_over_time() -> None:
    data = json.loads((ASSETS / "memory_over_time.json").read_text())
    mib = lambda xs: [x / 2**20 for x in xs]  # noqa: E731
    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=110)
    ax.plot(mib(data["full_kv_bytes"]), color=GREY, lw=2, label="full KV (DynamicCache)")
    ax.plot(mib(data["zipage_kv_bytes"]), color=BLUE, lw=2,
            label=f"zipage, budget {data['budget']}, pages of {data['page_size']} (storage held)")
    marks = data["compressions_at"]
    ax.plot(marks, [data["zipage_kv_bytes"][t] / 2**20 for t in marks], "v", color=RED, ms=4,
            label=f"compressions ({len(marks)})")
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("KV cache (MiB)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"Measured: SmolLM2-135M-Instruct on a GSM8K problem ({data['prompt_tokens']}-token prompt), CPU",
                 fontsize=10)
    _save(fig, "memory_over_time.png")


def throughput_against_concurrency() -> None:
    """Output tokens/s against requests running at once, from the committed H100 runs (Qwen3-8B shapes)."""
    points = []
    for name in ("throughput_qwen3-8b.json", "throughput_qwen3-8b_zipage-budgets.json"):
        data = json.loads((RESULTS / name).read_text())
        for system, row in data["systems"].items():
            if "mean_running" in row and not system.endswith("-sync") and system not in {pt[0] for pt in points}:
                points.append((system, row["mean_running"], row["tokens_per_s"], f"15 x {data['max_tokens']:,}"))
    for name in ("engine_run_qwen3-8b_32x512.json", "engine_run_qwen3-8b_128x8192.json"):
        data = json.loads((RESULTS / name).read_text())
        points.append((f"zipage-{data['budget']}", data["mean_running"], data["tokens_per_s"],
                       f"{data['requests']} x {data['max_tokens']:,}"))
    fig, ax = plt.subplots(figsize=(8, 3.4), dpi=110)
    seen = set()
    for system, running, tps, load in points:
        color = GREY if "fullkv" in system else BLUE
        label = "full-KV paged engine" if "fullkv" in system else "zipage"
        ax.scatter(running, tps, color=color, s=40, label=None if label in seen else label, zorder=3)
        seen.add(label)
        below = system == "zipage-2048" and running < 20  # two points share x = 15: one label above, one below
        ax.annotate(f"{system}\n{load} tokens", (running, tps), textcoords="offset points",
                    xytext=(7, -24 if below else 3), fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("requests decoding at once (mean over the run)")
    ax.set_ylabel("output tokens / s")
    ax.set_ylim(0, 4200)
    ax.set_xlim(4, 200)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("Throughput against concurrency, H100, Qwen3-8B shapes (benchmarks/results)", fontsize=10)
    _save(fig, "throughput_concurrency.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure", action="store_true", help="re-run the SmolLM2 memory measurement first (~2 min)")
    args = parser.parse_args(argv)
    ASSETS.mkdir(parents=True, exist_ok=True)
    if args.measure:
        measure_memory_over_time()
    for draw in (pages_and_page_tables, budget_and_buffer, same_count_eviction, in_place_compaction,
                 concurrency_from_memory, scheduler_timeline, prefix_caching, async_compression,
                 memory_over_time, throughput_against_concurrency):
        draw()
    return 0


if __name__ == "__main__":
    sys.exit(main())
