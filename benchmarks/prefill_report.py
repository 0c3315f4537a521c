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
             "included). `v1` is the first prefill kernel, the others `kernels/paged_prefill.py`'s "
             "(`ZIPAGE_PREFILL_KERNEL=v2:<name>`; the engine's default launch follows this sweep); a ratio above 1 is faster than the baseline. The chunked step "
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
        # (this sweep predates the prefill's dequantization of 8-bit pages: its FP8 launches read codes)
        note = " (codes in the kernel; dequantized first, the default since: below)" if r["case"].startswith("fp8") else ""
        lines.append(f"| {r['case']} | {base:.3f} | {base / v1['ms']:.2f}x | {best}: {base / done[best]['ms']:.2f}x "
                     f"({done[best]['ms']:.3f} ms){note} | {v1['ms'] / done[best]['ms']:.2f}x |")
    return "\n".join(lines + [""] + torch_rows(results) + fresh_rows(results) + cudnn_rows(results)
                     + engine_rows(results) + fp8_rows(results))


def _best(kernel: dict) -> float:
    """A kernel's speed against the baseline's fastest formulation (``ratio_best``), as the first table's; a
    sweep that recorded only the ratio to the explicit-mask formulation gives that."""
    return kernel.get("ratio_best", kernel["ratio"])


TORCH_RUN = "issue15/s24/call2/prefill_tune.json"  # the sweep run with PyTorch's own attention beside the kernel


def torch_rows(results: Path) -> list[str]:
    """Whole prompts through PyTorch's own attention over the step's keys and values (no gather):
    what a prefill with nothing stored before it could call instead of the paged kernel."""
    path = results / TORCH_RUN
    if not path.exists():
        return []
    rows = [r for r in json.loads(path.read_text())["rows"] if "sdpa-fresh" in r["kernels"]]
    names = ("m64n64w4s3-tma", "flash-fresh", "sdpa-fresh", "cudnn-varlen")
    label = {"m64n64w4s3-tma": "Triton kernel (m64n64w4s3-tma)", "flash-fresh": "FlashAttention, variable length",
             "sdpa-fresh": "SDPA per sequence", "cudnn-varlen": "cuDNN, ragged"}
    lines = ["### PyTorch's own attention on whole prompts", "",
             f"The same baseline, from a later run of the sweep (`{path.relative_to(results.parent.parent)}`): "
             "PyTorch's own attention over the step's keys and values as the engine holds them (no gather), "
             "which a prefill with nothing stored before it could call instead of reading the pool. None "
             "reaches the baseline, whose SDPA takes each case's equal-length prompts in one cuDNN call. "
             "FlashAttention stays below the Triton kernel. SDPA per sequence (cuDNN) beats the kernel at 2K-4K "
             "here only because each case repeats one length, so its plans are built once: cuDNN builds a plan "
             "for every new shape (34-49 ms of host time, the ragged column and `benchmarks/sdpa_host.py`), "
             "which an engine's prompts, each of its own length, would pay every time. "
             "The engine keeps the Triton kernel for these (whole prompts where cuDNN's frontend is installed: "
             "its ragged attention, below).", "",
             "| case | " + " | ".join(label[n] for n in names) + " |", "|---|" + "---|" * len(names)]
    for r in rows:
        cells = []
        for n in names:
            k = r["kernels"].get(n, {})
            cells.append(f"{_best(k):.2f}x ({k['ms']:.3f} ms)" if "ms" in k else "-")
        lines.append(f"| {r['case']} | " + " | ".join(cells) + " |")
    return lines + [""]


FRESH_RUN = "issue15/s45/call2/prefill_tune.json"  # whole prompts through SDPA in length buckets (session 45)
FRESH_TTFT = "issue15/s45/call3"  # the engine's time to first token with the fused attention off and on
# (paged kernel file, fused attention file, note) per workload, each pair run one after the other in one call
FRESH_TTFT_PAIRS = (("longprompt_fresh0_2", "longprompt_fresh1_2", " (second pair: the first paid the compiles)"),
                    ("prompt4096_fresh0", "prompt4096_fresh1", ""))
FRESH_TITLE = "Whole prompts through PyTorch's fused attention"
FRESH_NAMES = ("m64n64w4s3-tma", "sdpa-fresh", "sdpa-bucket", "cudnn-bucket")
FRESH_LABEL = {"m64n64w4s3-tma": "Triton kernel (m64n64w4s3-tma)", "sdpa-fresh": "SDPA per sequence",
               "sdpa-bucket": "sdpa-bucket", "cudnn-bucket": "cudnn-bucket"}
TARGET_MIN_PROMPT = 512  # the prefill target's prompts are 512 tokens and longer


def _card(device: str) -> str:
    """``H100`` for ``NVIDIA H100 80GB HBM3``."""
    return device.replace("NVIDIA ", "").split()[0] if device else ""


def fresh_ranges(results: Path) -> dict | None:
    """The session-45 sweep's figures behind the prefill target's row (ratios against the explicit baseline the
    sweep's table shows): the Triton kernel on whole prompts of one length, the better of the two bucketed SDPA
    launches on them (read in place), and on ragged prompts of the target's lengths (copied into buckets); the
    card. None without the sweep."""
    path = results / FRESH_RUN
    if not path.exists():
        return None
    d = json.loads(path.read_text())
    kernel, bucket, ragged = [], [], []
    for r in d["rows"]:
        k = r["kernels"]
        buckets = [k[n]["ratio"] for n in ("sdpa-bucket", "cudnn-bucket") if "ratio" in k.get(n, {})]
        if r["case"].startswith("prompt "):
            if "ratio" in k.get("m64n64w4s3-tma", {}):
                kernel.append(k["m64n64w4s3-tma"]["ratio"])
            if buckets:
                bucket.append(max(buckets))
        elif r["case"].startswith("ragged ") and buckets and min(r["kv_lens"]) >= TARGET_MIN_PROMPT:
            ragged.append(max(buckets))
    return dict(card=_card(d["summary"].get("device", "")), kernel=kernel, bucket=bucket, ragged=ragged)


def fresh_ttft(results: Path) -> list[tuple[str, dict, dict, dict]]:
    """The session-45 TTFT pairs: (note, the run's settings, paged kernel's system, fused attention's system)."""
    folder = results / FRESH_TTFT
    out = []
    for off, on, note in FRESH_TTFT_PAIRS:
        if (folder / f"{off}.json").exists() and (folder / f"{on}.json").exists():
            a, b = (json.loads((folder / f"{n}.json").read_text()) for n in (off, on))
            out.append((note, a, next(iter(a["systems"].values())), next(iter(b["systems"].values()))))
    return out


def fresh_rows(results: Path) -> list[str]:
    """Whole prompts padded to length buckets and batched through SDPA (``kernels/fresh_prefill.py``): the
    session-45 sweep's cases, then the engine's time to first token with it off and on."""
    path = results / FRESH_RUN
    if not path.exists():
        return []
    d = json.loads(path.read_text())
    s = d["summary"]
    rel = path.relative_to(results.parent.parent)
    plans = [c for c in s.get("first_calls", []) if c["first_ms"] >= 1.0]  # (calls that built a cuDNN plan)
    first = sorted(int(c["first_ms"]) for c in plans)  # (whole milliseconds)
    after = max((c["second_ms"] for c in plans), default=0.0)
    built = f" ({first[0]}-{first[-1]} ms on first use, {after:.1f} ms after)" if first else ""
    once = f" (~{first[0]} ms before the first tokens)" if first else ""
    rows = [r for r in d["rows"] if r["case"].startswith(("prompt ", "ragged "))]
    in_place = [r["kernels"]["m64n64w4s3-tma"]["ms"] / r["kernels"]["cudnn-bucket"]["ms"] for r in rows
                if r["case"].startswith("prompt ") and all("ms" in r["kernels"].get(n, {})
                                                           for n in ("m64n64w4s3-tma", "cudnn-bucket"))]
    lines = [f"### {FRESH_TITLE}, in length buckets", "",
             f"{s['device']}, torch {s['torch']}, triton {s['triton']}, the same shapes and baseline (`PART=s45b bash\n"
             f"benchmarks/gpu_session.sh`, `{rel}`). `kernels/fresh_prefill.py`\n"
             "pads each whole prompt to a length bucket (a multiple of 128 tokens up to 1,024, then eight buckets to a "
             "doubling)\nand batches the prompts of a bucket, a power of two at a time, into one SDPA call over the "
             "step's own keys and\nvalues: the shapes stay few, so cuDNN builds a plan for each once"
             f"{built}. A batch whose\n"
             "prompts fill their bucket and lie one after another is read in place; others are copied into a "
             "zero-padded batch.\n`sdpa-bucket` lets PyTorch pick the backend (cuDNN here), `cudnn-bucket` holds it "
             "to cuDNN; `SDPA per sequence`\ncalls it once a prompt at its own length (a new plan for every new "
             "length). The ragged cases draw each prompt's\nlength at random; their baseline runs one SDPA call per "
             "length.", "",
             "| case | baseline ms | " + " | ".join(FRESH_LABEL[n] for n in FRESH_NAMES) + " |",
             "|---|---|" + "---|" * len(FRESH_NAMES)]
    for r in rows:  # (ratios against the baseline shown, the sweep's explicit formulation)
        cells = []
        for n in FRESH_NAMES:
            k = r["kernels"].get(n, {})
            cells.append(f"{k['ratio']:.2f}x ({k['ms']:.3f} ms)" if "ms" in k else "-")
        lines.append(f"| {r['case']} | {r['baseline_ms']:.3f} | " + " | ".join(cells) + " |")
    faster = (f"Batched in place, cuDNN is {min(in_place):.1f}-{max(in_place):.1f}x the Triton kernel. "
              if in_place else "")
    lines += ["", f"{faster}Copied (ragged lengths), the index copies in and out cost\nmore than the faster "
              "attention saves at every length tried, and SDPA per sequence pays a plan for every new length."
              "\nSo the engine sends only batches read in place, and only where asked (`ZIPAGE_FRESH_PREFILL=1`): "
              "in the engine the\nattention "
              "is a small share of a prompt's prefill, and time to first token did not improve (random-weight "
              "Qwen3-8B,\nbf16, budget 2048, one process each, `PART=s45c`, "
              f"`{(results / FRESH_TTFT).relative_to(results.parent.parent)}/`; each run's warm-up\n"
              "left its first two prompts in the prefix cache, alike for both):", ""]
    pairs = fresh_ttft(results)
    if pairs:
        lines += ["| workload | paged kernel: TTFT mean / p50 (s), tok/s | fused attention: TTFT mean / p50 (s), "
                  "tok/s |", "|---|---|---|"]
        for note, run, off, on in pairs:
            lo, hi = run["prompt_len"]
            tokens = f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"
            lines.append(f"| {run['requests']} prompts of {tokens} tokens, {run['max_tokens']} new{note} | "
                         + " | ".join(f"{r['ttft_mean_s']:.2f} / {r['ttft_p50_s']:.2f}, {r['tokens_per_s']:.0f}"
                                      for r in (off, on)) + " |")
        lines.append("")
    lines += ["The long prompts' chunks after the first read a cached prefix (the kernel's 1.5x case); a 4,096-token "
              "prompt's\nattention is ~7% of its prefill's arithmetic, and each run pays its plans once"
              f"{once}.\nTriton's automatic warp specialization (`tl.range(..., "
              "warp_specialize=True)`) on the kernel's mask-free loop was\ntried in the same session: Triton 3.6 "
              "fails to compile the 64 x 64 launch with it and the 128 x 128 one is no faster\n"
              f"(`{(results / FRESH_RUN).parent.parent.relative_to(results.parent.parent)}/call1/`).", ""]
    return lines


CUDNN_RUN = "issue15/s53"  # whole prompts through cuDNN's ragged attention (session 53, one H100)
# benchmarks/cudnn_prefill_probe.py (session 54, one H100: its default plan, every plan timed, baseline and route
# alternated), relative to the results folder
CUDNN_PROBE = "issue15/s54/s54/cudnn_prefill_probe.json"
CUDNN_BUILDS = "s53c/cudnn_graph_builds.json"  # benchmarks/cudnn_graph_builds.py
# the engine's time to first token: (file, route), in the order they ran, after an untimed warm-up run
CUDNN_TTFT = (("s53d/ttft_paged_a", "paged kernel"), ("s53d/ttft_cudnn128_a", "cuDNN, buckets from 128"),
              ("s53d/ttft_cudnn2048_a", "cuDNN, buckets from 2,048"),
              ("s53d/ttft_cudnn2048_b", "cuDNN, buckets from 2,048"),
              ("s53d/ttft_cudnn128_b", "cuDNN, buckets from 128"), ("s53d/ttft_paged_b", "paged kernel"))
TARGET_MAX_PROMPT = 4096  # ... and 4,096 tokens or shorter
SPREAD = 0.05  # time-to-first-token means this close (relative) count as the same, within runs' spread


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _in_target(r: dict) -> bool:
    """Whether a probe case's prompts are all of the target's lengths (512-4,096 tokens)."""
    lens = [n for n in r.get("lens", []) if n]
    return bool(lens) and min(lens) >= TARGET_MIN_PROMPT and max(lens) <= TARGET_MAX_PROMPT


def cudnn_ranges(results: Path) -> dict | None:
    """The ragged route's probe behind the prefill target's row, over the target's cases (every prompt 512-4,096
    tokens): the route's (each case's lower of its timed window and, where the probe alternated the two, their
    alternated median) and the Triton kernel's ratios against the baseline's fastest formulation, the case of the
    route's lowest, whether every case of the probe ran and agreed, the card, and whether the engine's time
    to first token (``CUDNN_TTFT``) had the routes within ``SPREAD``. None without the probe."""
    path = results / CUDNN_PROBE
    d = _json(path)
    if d is None or not d.get("rows"):
        return None
    rows = [r for r in d["rows"] if _in_target(r) and "ratio_cudnn" in r]
    # (each case's lower of its one timed window and its alternated median, where the probe alternated them)
    ratio = lambda r: min(r["ratio_cudnn"], r.get("alt_ratio_cudnn", r["ratio_cudnn"]))  # noqa: E731
    lowest = min(rows, key=ratio) if rows else None
    ttft = cudnn_ttft(results)
    by_route = {}
    for label, r in ttft:
        by_route.setdefault(label.startswith("cuDNN"), []).append(r["ttft_mean_s"])
    same = None
    if len(by_route) == 2:
        means = [sum(v) / len(v) for v in by_route.values()]
        same = abs(means[0] - means[1]) <= SPREAD * min(means)
    return dict(card=_card(d.get("info", {}).get("device", "")), ratios=[ratio(r) for r in rows],
                triton=[r["ratio_triton"] for r in rows if "ratio_triton" in r],
                lowest=lowest["case"] if lowest else None,
                ok=all(r.get("ok") is True for r in d["rows"]), ttft_same=same, path=path)


def cudnn_ttft(results: Path) -> list[tuple[str, dict]]:
    """The engine's time-to-first-token runs of ``CUDNN_TTFT`` present: (route, the run's system)."""
    runs = []
    for name, label in CUDNN_TTFT:
        d = _json(results / CUDNN_RUN / f"{name}.json")
        systems = list((d or {}).get("systems", {}).values())
        if systems and "ttft_mean_s" in systems[0]:
            runs.append((label, dict(systems[0], run=d)))
    return runs


def cudnn_rows(results: Path) -> list[str]:
    """Whole prompts through cuDNN's ragged attention (``kernels/cudnn_prefill.py``): the probe's cases, what a
    graph build costs, and the engine's time to first token with each route. Parts whose files or keys are
    missing are left out."""
    path = results / CUDNN_PROBE
    d = _json(path)
    if d is None or not d.get("rows"):
        return []
    info = d.get("info", {})
    rel = lambda p: p.relative_to(results.parent.parent)  # noqa: E731
    versions = ", ".join(f"{what} {info[k]}" for k, what in (("torch", "torch"), ("backend", "cuDNN"),
                                                           ("frontend", "cuDNN frontend")) if k in info)
    lines = ["### Whole prompts through cuDNN's ragged attention", "",
             f"{info.get('device', 'one GPU')}{', ' + versions if versions else ''}; the same shapes and baseline "
             f"(`PART=s54 bash benchmarks/gpu_session.sh`, `{rel(path)}`). "
             "`kernels/cudnn_prefill.py` hands every whole prompt of a step to one cuDNN call in ragged form: each "
             "sequence's first row and length are device tensors, so ragged prompts need no padding and no copy, "
             "wherever they lie among the step's rows. A graph is built per (number of prompts, rounded up to a "
             "power of two; length bucket) and reused. The engine takes this route by default where it can run "
             "(`pip install -e \".[cudnn]\"`, a GPU of compute capability 9.0 or above, 16-bit activations, head "
             "dims that are multiples of 8 up to 128) and the pages hold the model's dtype (not FP8 or INT8); "
             "`ZIPAGE_FRESH_PREFILL=0` keeps the paged kernel. Ratios are "
             "against the baseline's fastest formulation; the host time is one call's, queued. `alternated`: the "
             "baseline, the route and the route with its fastest plan (below) timed in turn, three rounds of 60 ms "
             "each, medians.", "",
             "| case | baseline ms | Triton kernel | cuDNN, ragged | alternated: route / fastest plan "
             "| host µs a call | agrees |",
             "|---|---|---|---|---|---|---|"]
    timed = []
    for r in d["rows"]:
        base = r.get("best_baseline_ms", r.get("baseline_ms"))
        if base is None:
            continue
        triton = (f"{r['ratio_triton']:.2f}x ({r['triton_ms']:.3f} ms)"
                  if "ratio_triton" in r and "triton_ms" in r else "-")
        if "ratio_cudnn" in r and "cudnn_ms" in r:
            timed.append(r)
            host = f"{r['cudnn_host_us']:.0f}" if "cudnn_host_us" in r else "-"
            alt = (f"{r['alt_ratio_cudnn']:.3f}x / {r['alt_ratio_tuned']:.3f}x"
                   if "alt_ratio_cudnn" in r and "alt_ratio_tuned" in r else "-")
            ok = r.get("ok") and r.get("tuned_ok", True)
            lines.append(f"| {r['case']} | {base:.3f} | {triton} | {r['ratio_cudnn']:.3f}x ({r['cudnn_ms']:.3f} ms) "
                         f"| {alt} | {host} | {'yes' if ok else '**no**'} |")
        else:
            lines.append(f"| {r['case']} | {base:.3f} | {triton} | failed | - | - | - |")
    one = [r["ratio_cudnn"] for r in timed if r["case"].startswith("prompt ")]
    one_alt = [r["alt_ratio_cudnn"] for r in timed if r["case"].startswith("prompt ") and "alt_ratio_cudnn" in r]
    ragged = [r["ratio_cudnn"] for r in timed if r["case"].startswith("ragged ")]
    notes = []
    if one:
        notes.append(f"On prompts of one length both sides run cuDNN's attention: {min(one):.3f}-{max(one):.3f}x"
                     + (f" ({min(one_alt):.3f}-{max(one_alt):.3f}x alternated)" if one_alt else "")
                     + ": parity, within the measure's spread of about 1%.")
    plans = [r for r in timed if isinstance(r.get("plans"), dict) and r.get("chosen_plan")]
    if plans:
        names = sorted({name.split(": ", 1)[-1] for r in plans for name in r["plans"]})
        notes.append(f"cuDNN offers {len(names)} plans for the ragged graph ({', '.join(names)}); timed each "
                     "(`CudnnPrefill(autotune=True)`), the fastest is the default plan's engine within a few "
                     "percent, and the route with it runs no faster (the alternated column), so the default keeps the "
                     "first plan that builds.")
    if ragged:
        notes.append(f"On ragged prompts the baseline calls it once a length and the route once a step: "
                     f"{min(ragged):.2f}-{max(ragged):.2f}x (the most where the prompts are many and short).")
    extra = {k: v for k, v in info.get("extra", {}).items() if isinstance(v, dict)}
    if extra:
        agreed = sum(bool(v.get("ok")) and v.get("untouched", True) for v in extra.values())
        notes.append("The probe also checked a graph reused for other lengths of its bucket, a zero-length "
                     "sequence, other rows between the sequences (left untouched) and batches padded to a power of "
                     f"two with empty sequences: {agreed} of {len(extra)} checks agreed.")
    built = sorted(r["first_call_ms"] for r in d["rows"] if r.get("first_call_ms", 0.0) >= 5.0)
    if len(built) > 1:  # (first calls that built a graph; the largest, the process's first, loaded the library)
        notes.append(f"A call that built a graph took {built[0]:.0f}-{built[-2]:.0f} ms (the process's first: "
                     f"{built[-1]:,.0f} ms, the library loaded), later calls the times above.")
    lines += ["", " ".join(notes), ""] if notes else [""]
    lines += _build_rows(results, rel)
    runs = cudnn_ttft(results)
    if runs:
        d0 = runs[0][1]["run"]
        lo, hi = d0.get("prompt_len", (0, 0))
        lines += [f"The engine's time to first token, {d0.get('device', '')}, random-weight {d0.get('model', '')}, "
                  f"bf16, budget 2048: {d0.get('requests')} prompts of {lo:,}-{hi:,} tokens (mean "
                  f"{d0.get('mean_prompt_tokens', 0):,.0f}), {d0.get('max_tokens')} new each, one process a run, in "
                  f"the order shown, after an untimed warm-up run through the route (`PART=s53b SKIP_BUILDS=1`, "
                  f"`{rel(results / CUDNN_RUN)}/s53d/`):", "",
                  "| run | route | TTFT mean / p50 / p99 (s) | tok/s |", "|---|---|---|---|"]
        for i, (label, r) in enumerate(runs, 1):
            lines.append(f"| {i} | {label} | {r['ttft_mean_s']:.2f} / {r.get('ttft_p50_s', float('nan')):.2f} / "
                         f"{r.get('ttft_p99_s', float('nan')):.2f} | {r.get('tokens_per_s', float('nan')):.0f} |")
        same = (cudnn_ranges(results) or {}).get("ttft_same")
        if same is not None:
            lines += ["", (f"The routes' means are within {SPREAD:.0%} of each other" if same else
                           f"The routes' means differ by more than {SPREAD:.0%}") + ": a prompt's attention is a "
                      "small share of its prefill (the linear layers dominate), so the faster attention moves time "
                      "to first token by a few percent at most."]
        printed = results / CUDNN_RUN / "s53" / "ttft_printed.txt"
        means = _printed_ttft(printed) if printed.exists() else {}
        tags = ("ragged_0_a", "ragged_0_b", "ragged_cudnn_a", "ragged_cudnn_b", "p4096_0_a", "p4096_0_b",
                "p4096_cudnn_a", "p4096_cudnn_b")
        if all(t in means for t in tags):
            m = {t: f"{means[t]:.2f}" for t in tags}
            lines += ["", f"An earlier call (`{rel(printed)}`, its printed lines: the runs' JSONs did not come "
                      "back), warmed up through the route only, in the order paged, route, route, paged: 64 ragged "
                      f"prompts {m['ragged_0_a']} s (the paged kernel's first run, the cause of its slowness not "
                      f"established), {m['ragged_cudnn_a']}, {m['ragged_cudnn_b']}, {m['ragged_0_b']} s; 32 prompts "
                      f"of 4,096 tokens {m['p4096_0_a']}, {m['p4096_cudnn_a']}, {m['p4096_cudnn_b']}, "
                      f"{m['p4096_0_b']} s."]
        lines.append("")
    return lines


def _engine_min_bucket() -> int:
    """The engine's shortest length bucket (``runner.CUDNN_MIN_BUCKET``; 2,048 where zipage does not import)."""
    try:
        from zipage.engine.runner import CUDNN_MIN_BUCKET
    except ImportError:
        return 2048
    return CUDNN_MIN_BUCKET


def _printed_ttft(path: Path) -> dict[str, float]:
    """``ttft_printed.txt``: each run's tag to its mean time to first token (the fifth number from the end of
    ``benchmarks/throughput.py``'s summary row: mean, p50, p99, max, count)."""
    means = {}
    for line in path.read_text().splitlines():
        tag, sep, row = line.partition(": ")
        if sep and not tag.startswith("#"):
            try:
                means[tag] = float(row.split()[-5])
            except (IndexError, ValueError):
                continue
    return means


def _build_rows(results: Path, rel) -> list[str]:
    """What a graph build costs (``benchmarks/cudnn_graph_builds.py``): per key, with cuDNN's dynamic shapes, one
    graph with shape overrides, and the kernel time of each ``min_bucket``; parts without their keys left out."""
    path = results / CUDNN_RUN / CUDNN_BUILDS
    b = _json(path)
    if b is None:
        return []
    modes = b.get("modes", {})
    fixed, dyn, over = (modes.get(m, {}) for m in ("fixed", "dynamic", "override"))
    said = []
    if "build_ms_median" in fixed:
        said.append(f"over {len(b.get('keys', []))} keys (1-32 prompts, buckets of 128-4,096 tokens) a build took "
                     f"{fixed['build_ms_median']:.0f} ms (median)" + (
                         f", the process's first {fixed['init_ms']:,.0f} ms" if "init_ms" in fixed else ""))
    if dyn.get("ok"):
        multi = {k: v for k, v in dyn["ok"].items() if not k.startswith("(1,")}
        wrong = sum(not v for v in multi.values())
        said.append(f"cuDNN's dynamic shapes with a shared kernel cache built in "
                    f"{dyn.get('build_ms_median', float('nan')):.0f} ms" + (
                        f" but gave wrong outputs for {wrong} of {len(multi)} keys of two prompts or more" if wrong
                        else ", every output agreeing"))
    if over.get("error"):
        reason = next((m for m in ("requires cudnn 9.21", "requires cuDNN 9.21") if m.lower() in
                       over["error"].lower()), None)
        said.append("one graph run with shape overrides " + ("needs cuDNN 9.21 (this one declined)" if reason
                                                              else "failed (the JSON holds the error)"))
    table = {k: v for k, v in b.get("min_bucket", {}).items() if k != "error"}  # ("error": buckets that failed)
    failed = sorted(int(mb) for mb in b.get("min_bucket", {}).get("error", {}))
    mbs = sorted({int(mb) for v in table.values() for mb in v})
    if not said and not table:
        return []
    text = (f"What a graph costs (`benchmarks/cudnn_graph_builds.py`, `{rel(path)}`): " + "; ".join(said)
            + ". So the route keeps a graph per key and has fewer keys: the engine builds its graphs with S_max at "
            f"least {_engine_min_bucket():,} (`min_bucket`), so prompts up to that share one graph per batch size."
            + (f" (Graphs from S_max {', '.join(f'{mb:,}' for mb in failed)} failed: the JSON holds the errors.)"
               if failed else ""))
    if not (table and 128 in mbs):
        return [text, ""]
    lines = [text + " The kernel time of each `min_bucket` over the exact bucket's (the empty tiles past each "
             "prompt):", "", "| prompts, longest | " + " | ".join(f"S_max >= {mb:,}" for mb in mbs) + " |",
             "|---|" + "---|" * len(mbs)]
    for key, got in table.items():
        base = got.get("128", [float("nan")])[0]
        lines.append(f"| {key} | " + " | ".join(f"{got[str(mb)][0] / base:.2f}x ({got[str(mb)][0] * 1000:.0f} µs)"
                                                 if str(mb) in got else "-" for mb in mbs) + " |")
    return lines + [""]


def engine_rows(results: Path) -> list[str]:
    """The engine with each prefill kernel on the long-prompt workload (``benchmarks/throughput.py
    --workload long-prompt``, one GPU call, ``ZIPAGE_PREFILL_KERNEL`` set per run)."""
    folder = results / "prefill" / "engine_longprompt"
    runs = []
    for name in ("v1", "v2", "v1_warm", "v2_warm"):
        path = folder / f"longprompt_{name}.json"
        if path.exists():
            d = json.loads(path.read_text())
            runs.append((name, d, d["systems"][0] if isinstance(d["systems"], list) else next(iter(d["systems"].values()))))
    if not runs:
        return []
    d0 = runs[0][1]
    lines = ["### The engine's prefill kernel on long prompts", "",
             f"{d0['device']}, random-weight {d0['model']}, {d0['requests']} requests of "
             f"{d0['prompt_len'][0]:,}-{d0['prompt_len'][1]:,}-token prompts (mean {d0['mean_prompt_tokens']:,.0f}) "
             f"and {d0['max_tokens']} new tokens, budget 2048 (`{folder.relative_to(results.parent.parent)}`). "
             "The pairs ran one after the other in two GPU calls on the same machine: in the first pair the v1 run "
             "also paid for compiling the kernels both runs share, so the second pair (every kernel compiled) is "
             "the comparison. TTFT includes the wait behind other requests' prefills.", "",
             "| run | prefill kernel | TTFT mean / p50 / p99 (s) | tok/s | wall (s) |", "|---|---|---|---|---|"]
    for name, d, r in runs:
        lines.append(f"| {'second' if name.endswith('warm') else 'first'} | {d['prefill_kernel']} | "
                     f"{r['ttft_mean_s']:.2f} / {r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {r['wall_s']:.1f} |")
    return lines + [""]


FP8_RUN = "issue15/s29/call3"  # the prefill over 8-bit pages dequantized first against the kernel reading codes
FP8_ORDER = ("longprompt_fp8_m128n64w8s3-tma-codes_1", "longprompt_fp8_v2_1", "longprompt_fp8_m128n64w8s3-tma-codes_2",
             "longprompt_fp8_v2_2", "longprompt_bf16")  # the order they ran in


def fp8_rows(results: Path) -> list[str]:
    """8-bit pages: the step's pages dequantized into a 16-bit scratch pool first (the default) against the kernel
    reading the codes (``-codes``): the sweep's FP8 case, then the engine's long-prompt TTFT in run order."""
    folder = results / FP8_RUN
    tune = folder / "prefill_tune.json"
    if not tune.exists():
        return []
    rows = [r for r in json.loads(tune.read_text())["rows"] if r["case"].startswith("fp8")]
    lines = ["### Prefill over FP8 pages: dequantized first, or read as codes by the kernel", "",
             "By default a prefill over 8-bit pages (FP8, INT8) with 16-bit queries first dequantizes the pages the "
             "step reads into a 16-bit scratch pool (one pass, `dequantize_pages` in `kernels/paged_prefill.py`), "
             "then runs the 16-bit kernel and launch on it; `-codes` launches read the codes in the kernel, "
             "converting each key and value tile for every block of queries that reads it. Same baseline as above "
             f"(gather + SDPA on bf16 pages), same machine and call (`{folder.relative_to(results.parent.parent)}`).",
             "", "| case | launch | ms | against the baseline |", "|---|---|---|---|"]
    for r in rows:
        for name, k in r["kernels"].items():
            if "ms" in k and name != "v1":
                kind = "codes in the kernel" if name.endswith("-codes") else "dequantized first"
                lines.append(f"| {r['case']} | {name} ({kind}) | {k['ms']:.3f} | {_best(k):.2f}x |")
    runs = []
    for name in FP8_ORDER:
        path = folder / f"{name}.json"
        if path.exists():
            d = json.loads(path.read_text())
            runs.append((name, d, next(iter(d["systems"].items()))))
    if runs:
        d0 = runs[0][1]
        lines += ["", f"The engine on the long-prompt workload ({d0['device']}, random-weight {d0['model']}, "
                  f"{d0['requests']} requests of {d0['prompt_len'][0]:,}-{d0['prompt_len'][1]:,}-token prompts, "
                  f"{d0['max_tokens']} new tokens, {d0['kv_gib']} GiB of KV), in the order the runs went; the first "
                  "run also compiled the kernels:", "",
                  "| run | system | prefill over 8-bit pages | TTFT mean / p50 / p99 (s) | tok/s | wall (s) |",
                  "|---|---|---|---|---|---|"]
        for i, (name, d, (system, r)) in enumerate(runs, 1):
            how = "-" if "fp8" not in system else ("codes in the kernel" if "codes" in name else "dequantized first")
            lines.append(f"| {i} | {system} | {how} | {r['ttft_mean_s']:.2f} / {r['ttft_p50_s']:.2f} / "
                         f"{r['ttft_p99_s']:.2f} | {r['tokens_per_s']:.0f} | {r['wall_s']:.1f} |")
        bf16 = [i for i, (_, _, (system, _)) in enumerate(runs, 1) if "fp8" not in system]
        # warm bf16 runs of the same workload: session 45's TTFT pair on the long prompts (both runs compiled)
        warm = [(run, off, on) for _, run, off, on in fresh_ttft(results)
                if run["prompt_len"] == d0["prompt_len"] and run["requests"] == d0["requests"]]
        if bf16 and warm:
            run, off, on = warm[0]
            lo, hi = sorted((off["ttft_mean_s"], on["ttft_mean_s"]))
            lines += ["", f"Run {bf16[0]} was the call's first run on 16-bit pages, so it too compiled its kernels "
                      "(the 16-bit store and decode\npaths the FP8 runs do not use): it is no warm bf16 figure. Warm "
                      f"bf16 runs of the same workload on an {_card(run['device'])} took\n{lo:.2f}-{hi:.2f} s (session "
                      f"45, \"{FRESH_TITLE}\" above). Each of these runs also\nwarmed up on its first two prompts, "
                      "which left them in the prefix cache for the timed run (fixed since in\n"
                      "`benchmarks/throughput.py`): every run here had the same head start."]
    return lines + [""]
