"""The generate() section of docs/benchmarks.md, from benchmarks/results/generate_speed_*.json.

A ``generate_speed_<device>_before.json`` beside a ``generate_speed_<device>.json`` (the same
plan run on an earlier tree, ``--label before``) adds a before/after table.
"""

from __future__ import annotations

import json
from pathlib import Path

try:
    from .generate_speed import table
except ImportError:  # run as a script from benchmarks/
    from generate_speed import table

COMMAND = {"cpu": "python benchmarks/generate_speed.py cpu", "gpu": "python benchmarks/generate_speed.py gpu"}
KEY = ("model", "batch", "prompt", "new_tokens", "cache")


def _before_after(rows: list[dict], before: list[dict], device: str) -> str:
    speed = "cpu_tokens_per_s" if device == "cpu" else "tokens_per_s"
    old = {tuple(r[k] for k in KEY): r for r in before}
    lines = ["| model | batch | new tokens | cache | tok/s before | tok/s after | after / before | "
             "peak MiB before | peak MiB after | after / before |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = old.get(tuple(r[k] for k in KEY))
        if b is None:
            continue
        pb, pa = b.get("peak_bytes", 0) / 2**20, r.get("peak_bytes", 0) / 2**20
        lines.append(f"| {r['model']} | {r['batch']} | {r['new_tokens']} | {r['cache']} | {b[speed]:.1f} | "
                     f"{r[speed]:.1f} | {r[speed] / b[speed]:.2f}x | {pb:.1f} | {pa:.1f} | "
                     f"{pa / pb if pb else 0:.2f}x |")
    return "\n".join(lines)


def generate_sections(results: Path) -> list[str]:
    parts = []
    for path in sorted(results.glob("generate_speed_*.json")):
        if path.stem.endswith("_before"):
            continue
        device = path.stem.removeprefix("generate_speed_")
        device = "cpu" if device.startswith("cpu") else device  # (generate_speed_cpu_long.json: --long)
        data = json.loads(path.read_text())
        meta, rows = data["meta"], data["rows"]
        speed = "CPU time of the process" if device == "cpu" else "wall time"
        memory = ("peak of the tensor storage the call allocates (`StoragePeak`)" if device == "cpu"
                  else "`torch.cuda.max_memory_allocated` above the weights")
        parts += [f"### generate(): zipage against DynamicCache, {meta['device']}", "",
                  f"`{meta.get('command') or COMMAND.get(device, path.name)}` ({meta['threads']} thread(s), torch {meta['torch']}, "
                  f"transformers {meta['transformers']}). Same prompts and the same number of new tokens for "
                  f"every cache; tok/s: new tokens per second of {speed}, prefill included; peak: {memory}.", "",
                  table(rows, device), ""]
        if meta.get("note"):
            parts += [meta["note"], ""]
        for s in data.get("skipped", []):
            parts.append(f"- skipped: {s['model']}, batch {s['batch']}, {s['new_tokens']} new tokens ({s['reason']})")
        if data.get("skipped"):
            parts.append("")
        before = path.with_name(f"{path.stem}_before.json")
        if before.exists():
            parts += ["", f"Before and after this tree's generate() changes (`{before.name}`: the same plan on the "
                      "earlier tree):", "", _before_after(rows, json.loads(before.read_text())["rows"], device), ""]
    return parts
