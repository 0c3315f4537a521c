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

KEY = ("model", "batch", "prompt", "new_tokens", "cache")


DEFAULT_REPEATS = {"cpu": 2, "gpu": 1}  # generate_speed.py's --repeats when none is given


def command(meta: dict, device: str, path: Path) -> str:
    """The command that wrote a results file: the one it stored, else one built from the settings it recorded
    (repeats, threads, label, output file), so that the command shown matches the numbers beside it."""
    if meta.get("command"):
        return meta["command"]
    kind = "cpu" if device == "cpu" else "gpu"
    parts = ["python benchmarks/generate_speed.py", kind]
    if meta.get("repeats") is not None and meta["repeats"] != DEFAULT_REPEATS[kind]:
        parts.append(f"--repeats {meta['repeats']}")
    if kind == "cpu" and meta.get("threads") not in (None, 1):
        parts.append(f"--threads {meta['threads']}")
    if meta.get("label"):
        parts.append(f"--label {meta['label']}")
    if path.name != f"generate_speed_{kind}.json":
        parts.append(f"--out benchmarks/results/{path.name}")
    return " ".join(parts)


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


def _shape(rows: list[dict]) -> str:
    """``qwen3-8b, batch 1, 512 new tokens`` for the variants of one results file."""
    seen = dict.fromkeys(f"{r['model']}, batch {r['batch']}, {r['new_tokens']} new tokens" for r in rows)
    return "; ".join(seen)


def _summary(files: list[tuple[Path, dict]]) -> list[str]:
    """One line per GPU variant and zipage cache over every GPU file: speed and peak against DynamicCache."""
    lines = ["| model | batch | new tokens | cache | stored at the end (full) | compressions | tok/s vs full | "
             "peak vs full | file |", "|---|---|---|---|---|---|---|---|---|"]
    for path, data in files:
        rows = data["rows"]
        for r in rows:
            full = next((f for f in rows if f["budget"] is None and all(
                f[k] == r[k] for k in ("model", "batch", "prompt", "new_tokens"))), None)
            if r["budget"] is None or full is None:
                continue
            peak = f"{r['peak_bytes'] / full['peak_bytes']:.2f}x" if full.get("peak_bytes") else "-"
            lines.append(f"| {r['model']} | {r['batch']} | {r['new_tokens']} | {r['cache']} | "
                         f"{r.get('stored', '-')} ({full.get('stored', '-')}) | {r.get('compressions', '-')} | "
                         f"{r['tokens_per_s'] / full['tokens_per_s']:.2f}x | {peak} | `{path.name}` |")
    return lines


# The tree each generate_steps file ran (by file name; each pair ran in one GPU call, each tree in its own process)
STEPS_TREES = {
    "generate_steps_gpu_b16_before.json": "aaf36fc",
    "generate_steps_gpu_b16_after.json": "35e3427 (cuDNN held)",
    "generate_steps_gpu_b16_s28_before.json": "35e3427 (cuDNN held)",
    "generate_steps_gpu_b16_s28_after.json": "dc5ba05 (lean update)",
    "generate_steps_gpu_b16_p4096_s28_lean.json": "2fd7d55 (lean update)",
    "generate_steps_gpu_b16_p16384_s28_lean.json": "2fd7d55 (lean update)",
    "generate_steps_gpu_b1_p16384_s28_lean.json": "2fd7d55 (lean update)",
    "generate_steps_gpu_8b_b16_p4096_s28_lean.json": "2fd7d55 (lean update)",
    "generate_steps_gpu_b16_p4096_s28_before.json": "35e3427 (cuDNN held)",
    "generate_steps_gpu_b16_p4096_s28_after.json": "f956b3c (one record after compressions)",
    "generate_steps_gpu_b1_p16384_s29_after.json": "07e3582 (one record after compressions)",
    "generate_steps_gpu_8b_b16_p4096_s29_after.json": "07e3582 (one record after compressions)",
    "generate_steps_gpu_b16_p200_s33_before.json": "4ea5f04",
    "generate_steps_gpu_b16_p200_s33_after.json": "a05442d (a call's last window steps keep their queries)",
    "generate_steps_gpu_b16_p4096_s33_before.json": "4ea5f04",
    "generate_steps_gpu_b16_p4096_s33_after.json": "a05442d (a call's last window steps keep their queries)",
}
STEPS_ORDER = list(STEPS_TREES)


def _steps(results: Path) -> list[str]:
    """``generate_steps_*.json`` (benchmarks/generate_steps.py): the decode step, the two caches taking turns."""
    paths = sorted(results.glob("generate_steps_*.json"),
                   key=lambda p: (STEPS_ORDER.index(p.name) if p.name in STEPS_ORDER else len(STEPS_ORDER), p.name))
    if not paths:
        return []
    lines = ["### generate()'s decode step, zipage and DynamicCache taking turns", "",
             "`python benchmarks/generate_steps.py --batch B --prompt P --new N` (run by `bash "
             "benchmarks/gpu_session.sh` with `PART=steps`, `longsteps` or `pastbudget`; for a before/after pair "
             "each tree in its own process, the earlier tree carried as `.before`): the model's forward with each "
             "cache, one decode step each in turn, the same tokens, after an untimed pass over the same lengths; "
             "the ratio is the median of the per-step ratios, which a slow spell of the host hits alike (whole "
             "runs of one cache after the other drifted by 10-20% on the H200's host: "
             "`benchmarks/results/issue15/s27/`), and \"all steps' time\" counts zipage's compressions. A long "
             "prompt puts the stored length past the budget (zipage compresses it after the prefill; "
             "DynamicCache holds it all). Trees: aaf36fc, before generate()'s dense decode work was cut; "
             "35e3427, cuDNN held off from the first to the last full layer of a dense decode step, new tokens "
             "stored by `index_copy_`; dc5ba05 and 2fd7d55, the layers after the first take a lean update "
             "(`ZipageCache._update_lean`); f956b3c and 07e3582 (the same generate() code), after a compression every "
             "layer shares one validity record where no attention mask was seen (on CUDA each layer had extended "
             "its own every step, so no step after the first compression took the lean update); a05442d, the "
             "last `window` steps of a call keep their queries (a later call continuing the cache may compress "
             "at once: it failed before), as does every chunk of a chunked prefill that a compression may read. Only ratios "
             "within one pair compare: the "
             "host's speed differs between processes and calls.", "",
             "| tree | device | model | batch | prompt | steps | budget | zipage stored (compressions) | "
             "DynamicCache ms | zipage ms | zipage / full per step (first half, second half) | all steps' time |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        d = json.loads(path.read_text())
        tree = STEPS_TREES.get(path.name) or d.get("label") or "-"
        total = d.get("total_ratio") or (sum(d["zipage_s"]) / sum(d["full_s"]) if d.get("full_s") else None)
        total = f"{total:.3f}" if total else "-"
        lines.append(f"| {tree} | {d['device']} | {d['model']} | {d['batch']} | {d['prompt']} | "
                     f"{d['new']} | {d['budget']} | {d['stored']} ({d['compressions']}) | {d['full_ms_median']:.2f} | "
                     f"{d['zipage_ms_median']:.2f} | **{d['step_ratio_median']:.3f}** "
                     f"({d['step_ratio_first_half']:.3f}, {d['step_ratio_second_half']:.3f}) | {total} |")
    return lines + [""]


def generate_sections(results: Path) -> list[str]:
    parts = []
    paths = [p for p in sorted(results.glob("generate_speed_*.json")) if not p.stem.endswith("_before")]
    gpu = [(p, json.loads(p.read_text())) for p in paths if not p.stem.startswith("generate_speed_cpu")]
    if gpu:
        parts += [f"### generate() on the GPU at a glance ({gpu[0][1]['meta']['device']})", "",
                  "Every zipage row of the GPU files below against DynamicCache in the same run (each file's own "
                  "section has its command and notes):", "", *_summary(gpu), ""]
    parts += _steps(results)
    for path in paths:
        device = path.stem.removeprefix("generate_speed_")
        device = "cpu" if device.startswith("cpu") else device  # (generate_speed_cpu_long.json: --long)
        data = json.loads(path.read_text())
        meta, rows = data["meta"], data["rows"]
        speed = "CPU time of the process" if device == "cpu" else "wall time"
        memory = ("peak of the tensor storage the call allocates (`StoragePeak`)" if device == "cpu"
                  else "`torch.cuda.max_memory_allocated` above the weights")
        parts += [f"### generate(): zipage against DynamicCache, {meta['device']}: {_shape(rows)}", "",
                  f"`{command(meta, device, path)}` ({meta['threads']} thread(s), torch {meta['torch']}, "
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
