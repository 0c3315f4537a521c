"""What the demo Space shows: the memory plot, the kept-positions heat map, the shaded tokens, the stats.

Figures are ``matplotlib.figure.Figure`` objects made without pyplot (no global state, safe across
the app's worker threads); gradio's ``gr.Plot`` renders them.
"""

from __future__ import annotations

import html
from typing import Any

import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from zipage.engine.outputs import IncrementalText
from zipage.engine.views import ListView

FULL_COLOR, ZIPAGE_COLOR, MARK_COLOR = "#6b7280", "#2563eb", "#dc2626"
KEPT_RGB = (37, 99, 235)


def _mib(n: float) -> float:
    return n / 2**20


def memory_figure(snapshot) -> Figure:
    """KV memory of both caches against generated tokens, zipage's compressions marked."""
    fig = Figure(figsize=(6.4, 3.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for run, color in ((snapshot.full, FULL_COLOR), (snapshot.zipage, ZIPAGE_COLOR)):
        ax.plot(range(len(run.kv_bytes)), [_mib(b) for b in run.kv_bytes], color=color, lw=2, label=run.name)
    marks = [t for t in snapshot.zipage.compressions_at if t < len(snapshot.zipage.kv_bytes)]
    if marks:
        ax.plot(marks, [_mib(snapshot.zipage.kv_bytes[t]) for t in marks], "v", color=MARK_COLOR, ms=6,
                label=f"compression ({len(marks)})")
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("KV cache (MiB)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    cfg = snapshot.config
    ax.set_title(f"KV memory: full KV vs zipage (budget {cfg.budget}, pages of {cfg.page_size})", fontsize=10)
    return fig


def heatmap_figure(mask: torch.Tensor | None, prompt_len: int, full_layer: int = 0) -> Figure:
    """Which logical positions (columns) each layer and KV head (rows) keeps; None: a note instead. The title
    counts what ``full_layer`` (a layer that sees the whole context, not a sliding window) keeps."""
    fig = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    if mask is None:
        ax.text(0.5, 0.5, "this zipage version does not report kept positions\n(ZipageCache.kept_positions)",
                ha="center", va="center", fontsize=10)
        ax.set_axis_off()
        return fig
    layers, heads, seen = mask.shape
    image = mask.reshape(layers * heads, seen).float().numpy()
    ax.imshow(image, aspect="auto", interpolation="nearest", cmap=ListedColormap(["#f3f4f6", ZIPAGE_COLOR]),
              vmin=0, vmax=1)
    ax.axvline(prompt_len - 0.5, color=MARK_COLOR, lw=1)
    step = max(1, layers // 10)
    ax.set_yticks([l * heads for l in range(0, layers, step)], [f"L{l}" for l in range(0, layers, step)], fontsize=7)
    ax.set_xlabel("logical position (prompt | answer, split by the red line)")
    ax.set_ylabel(f"layer x KV head ({heads} per layer)")
    kept = int(mask[full_layer, 0].sum())
    ax.set_title(f"positions kept by each layer and KV head at the end: {kept} of {seen} (blue)", fontsize=10)
    return fig


def _pieces(tokenizer, ids: list[int]) -> list[str]:
    """The text each token adds to what comes before it: a character split over several tokens (bytes of an
    emoji) goes with the token that completes it, and a SentencePiece ``▁word`` keeps its space (each token
    decoded alone would give "\ufffd" pieces and words run together)."""
    text = IncrementalText()
    return [text.add(tokenizer, ListView(ids, i + 1), skip_special_tokens=False) for i in range(len(ids))]


def tokens_html(tokenizer, prompt_ids: list[int], answer_ids: list[int], share: torch.Tensor | None) -> str:
    """The prompt and zipage's answer, each token shaded by the share of (layer, head) pairs keeping it.

    Tokens the cache has not stored yet (the last one generated) count as kept by every head.
    """
    if share is None:
        return "<p>Kept positions are not available from this zipage version.</p>"
    spans = []
    pieces = _pieces(tokenizer, prompt_ids + answer_ids)
    for pos, piece in enumerate(pieces):
        s = float(share[pos]) if pos < share.shape[0] else 1.0
        if pos == len(prompt_ids):
            spans.append('<hr style="margin:6px 0">')
        text = html.escape(piece)
        style = f"background:rgba{KEPT_RGB + (round(0.08 + 0.72 * s, 3),)};" if s > 0 else "color:#9ca3af;"
        spans.append(f'<span title="{s:.0%} of heads keep this token" style="{style}">{text}</span>')
    legend = (
        '<p style="font-size:0.85em;margin:0 0 6px 0">Each token shaded by the share of layers x KV heads that '
        'still keep it (dark: all; grey text: none). Above the line the prompt, below it zipage\'s answer.</p>'
    )
    body = "".join(spans)
    return f'{legend}<div style="white-space:pre-wrap;font-family:monospace;line-height:1.6">{body}</div>'


def stats_markdown(stats: dict[str, Any], snapshot, tokenizer) -> str:
    cfg = snapshot.config
    diff = stats["first_difference"]
    if diff is None:
        differ = "never: the answers are identical"
    else:
        a = snapshot.full.ids[diff : diff + 1]
        b = snapshot.zipage.ids[diff : diff + 1]
        show = lambda ids: repr(tokenizer.decode(ids)) if ids else "(ended)"  # noqa: E731
        differ = f"at generated token {diff}: full KV {show(a)}, zipage {show(b)}"
    rows = [
        ("compressions", stats["compressions"]),
        ("pages in use (peak)", f"{stats['pages_in_use']} ({stats['peak_pages']}) of {cfg.page_size} tokens"),
        ("tokens seen / stored per head", f"{stats['tokens_seen']} / {stats['tokens_stored']} "
                                          f"(at most budget + buffer = {cfg.capacity})"),
        ("KV memory now: full KV / zipage", f"{_mib(stats['kv_bytes_full']):.2f} / {_mib(stats['kv_bytes_zipage']):.2f} MiB"),
        ("memory saved", f"{100 * stats['memory_saved']:.1f}%"),
        ("answers first differ", differ),
    ]
    lines = ["| zipage against full KV | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)
