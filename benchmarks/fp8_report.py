"""The FP8 section of the benchmarks page: the engine with FP8 pages against bf16 pages, the decode
kernel's variants, and where FP8 loses quality (results under ``benchmarks/results/fp8/``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

try:
    from .prefill_report import SPREAD, cudnn_ranges, fresh_ranges
except ImportError:  # run as a script from benchmarks/
    from prefill_report import SPREAD, cudnn_ranges, fresh_ranges

EIGHT_BIT_REPORTS = ("quality_fp8", "quality_int8")  # the quality reports of 8-bit pages: shown in this section
# engine pairs kept beside their session's other results (paths under benchmarks/results/), listed after fp8/'s
ENGINE_RUNS_ELSEWHERE = ("issue15/s45/call4/throughput_qwen3-8b_fp8_s45.json",)
S45_RUN = ENGINE_RUNS_ELSEWHERE[0]  # the first pair with the corrected floor (``PART=s45e``)
S43_H100_RUN = "throughput_qwen3-8b_zzzzzzzzz_fp8_plain_h100.json"  # the same pair on the H100 before it, 100 s
# the input embedding table (vocabulary x hidden size, 2 bytes a bf16 weight) of the random-weight models the
# engine pairs ran: untied, it was read whole by the floors of runs before session 45's review of throughput.py,
# which reads only the step's rows of it since
EMBEDDING_TABLES = {"qwen3-8b": (151_936, 4_096, 2)}


def _new_floor(r: dict) -> bool:
    """Whether a run's floor reads the step's embedding rows, not the untied table (runs since session 45's
    review of ``benchmarks/throughput.py``, which also record ``exact_tail_bytes_per_request``)."""
    return "exact_tail_bytes_per_request" in r


def _corrected_over(data: dict, r: dict) -> float | None:
    """An earlier run's step over its floor with the products, against that floor as it is computed now (the
    step's embedding rows read, not the whole untied table); None where it already is or the table is unknown."""
    table = EMBEDDING_TABLES.get(data.get("model"))
    bw = data.get("copy_bandwidth_gbps")
    running = r.get("median_decode_running")
    if _new_floor(r) or not table or not bw or not running or not r.get("decode_compute_floor_ms"):
        return None
    vocab, hidden, size = table
    less_ms = (vocab - running) * hidden * size / (bw * 1e9) * 1000
    return r["median_decode_step_ms"] / (r["decode_compute_floor_ms"] - less_ms)


def _engine_table(paths: list[Path], names: dict[Path, str] | None = None) -> list[str]:
    """One row per system of each engine pair in ``paths``, shown by file name (or as ``names`` gives it)."""
    lines = ["| run | system | time limit (s) | running (mean) | mean output | tok/s | decode step (ms) | floor (ms) "
             "| step / floor | floor with products (ms) | step / that floor | 8-bit / bf16 tok/s "
             "| 8-bit / bf16 decode tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        data = json.loads(path.read_text())
        systems = data.get("systems", {})
        limit = _time_limit(data.get("command", ""))
        for bf16 in ("zipage-2048", "zipage-fullkv"):
            quantized = [name for name in systems if name.startswith(f"{bf16}-fp8") or name.startswith(f"{bf16}-int8")]
            quantized = [name for name in quantized if "tokens_per_s" in systems[name]]  # (-tail<N> systems too)
            if "tokens_per_s" not in systems.get(bf16, {}) or not quantized:
                continue
            for name in [bf16] + quantized:
                r = systems[name]
                ratio = r["tokens_per_s"] / systems[bf16]["tokens_per_s"]
                cfloor = r.get("decode_compute_floor_ms")
                over = f"{r['step_over_compute_floor']:.2f}" if cfloor else ""
                rate = _decode_rate(r)
                base_rate = _decode_rate(systems[bf16])
                decode_ratio = f"{rate / base_rate:.2f}x" if rate and base_rate and name != bf16 else ""
                device = data.get("device", "")
                card = device.replace('NVIDIA ', '').split()[0] if device else ""
                marks = [m for m in (card, "new floor" if _new_floor(r) else "") if m]
                where = f" ({', '.join(marks)})" if marks else ""
                shown = (names or {}).get(path, path.name)
                lines.append(f"| `{shown}`{where} | {name} | {limit} | {r['mean_running']:.0f} | "
                             f"{r['mean_output_tokens']:,.0f} | {r['tokens_per_s']:,.0f} | "
                             f"{r['median_decode_step_ms']:.1f} | {r['decode_floor_ms']:.1f} | "
                             f"{r['step_over_floor']:.2f} | {f'{cfloor:.1f}' if cfloor else ''} | "
                             f"{over} | "
                             f"{f'{ratio:.2f}x' if name != bf16 else ''} | {decode_ratio} |")
    return lines if len(lines) > 2 else []


def _decoded_in_chunks(path) -> bool:
    """Whether a quality report's teacher-forced rows were decoded in chunks (its recorded ``decode`` setting)."""
    try:
        return json.loads(path.read_text()).get("settings", {}).get("decode") == "chunk"
    except (OSError, ValueError):
        return False


def _decode_rate(r: dict) -> float | None:
    """Tokens a millisecond of the median decode step: the requests it runs over its time (runs that record
    ``median_decode_running``)."""
    running = r.get("median_decode_running")
    return running / r["median_decode_step_ms"] if running and r.get("median_decode_step_ms") else None


def _time_limit(command: str) -> str:
    words = command.split()
    return words[words.index("--time-limit") + 1] if "--time-limit" in words[:-1] else ""


_STEP_GROUPS = [("decode attention (split pass, merge)", ("_decode_split", "_decode_merge")),
                ("linear layers (cuBLAS)", ("nvjet", "cublas", "cutlass", "gemm", "sm90_xmma")),
                ("KV store (and the query ring)", ("_store",)),
                ("RMSNorms, RoPE, SiLU gate", ("_rms_norm", "_rope", "_silu_mul")),
                ("other (residual adds, argmax, copies, fills)", ("",))]


def _step_profile_table(folder: Path) -> list[str]:
    """The decode step's device time by kind of kernel, from ``profile_step.py --out`` files."""
    runs = []
    for path in sorted(folder.glob("profile_step_*.json")):
        data = json.loads(path.read_text())
        v = data["variants"][-1]
        groups = dict.fromkeys([name for name, _ in _STEP_GROUPS], 0.0)
        for k in v.get("kernels", []):
            for name, keys in _STEP_GROUPS:
                if any(key in k["name"] for key in keys):
                    groups[name] += k["ms_per_step"]
                    break
        pages = "bf16" if data.get("kv_cache_dtype", "auto") == "auto" else data["kv_cache_dtype"].upper()
        runs.append((f"{pages}, {v['running']} requests, context {v['mean_context']:.0f}", groups,
                     v["device_ms_per_step"], v["running"]))
    if not runs:
        return []
    lines = ["| kernels | " + " | ".join(r[0] for r in runs) + " |", "|---|" + "---|" * len(runs)]
    for name, _ in _STEP_GROUPS:
        lines.append(f"| {name} | " + " | ".join(f"{r[1][name]:.2f} ms" for r in runs) + " |")
    lines.append("| **device time a step** | " + " | ".join(f"**{r[2]:.2f} ms**" for r in runs) + " |")
    lines.append("| tokens a millisecond | " + " | ".join(f"{r[3] / r[2]:.1f}" for r in runs) + " |")
    return lines


def _kernel_table(path: Path) -> list[str]:
    rows = json.loads(path.read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    best: dict[tuple, dict] = {}
    for r in rows:  # (files before the context was recorded ran 2,176 tokens)
        key = (r.get("ctx", 2176), r["batch"], r["kv"], r.get("kernel", "general"))
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    lines = ["| requests x tokens | pages | kernel (fastest launch) | block_n / warps / stages | ms | share of copy bandwidth |",
             "|---|---|---|---|---|---|"]
    for (ctx, batch, kv, kernel), r in sorted(best.items(), key=lambda kv_: (kv_[0][:2], kv_[1]["ms"])):
        lines.append(f"| {batch} x {ctx:,} | {kv} | {kernel} | {r['block_n']} / {r.get('warps', r.get('num_warps'))} / "
                     f"{r.get('stages', r.get('num_stages'))} | {r['ms']:.3f} | {r['bw_share']:.2f} |")
    return lines


def _s45_note(results: Path) -> str:
    """The intro's sentences on the session-45 pair (its floor, decode steps and warm-up as measured since),
    against the H100 pair before it; empty without both files."""
    path, before = results / S45_RUN, results / "fp8" / S43_H100_RUN
    if not (path.exists() and before.exists()):
        return ""
    data, old = json.loads(path.read_text()), json.loads(before.read_text())
    a, b = data["systems"]["zipage-2048"], data["systems"]["zipage-2048-fp8"]
    oa, ob = old["systems"]["zipage-2048"], old["systems"]["zipage-2048-fp8"]
    corrected = _corrected_over(old, ob)
    vocab, hidden, size = EMBEDDING_TABLES[data["model"]]
    table = vocab * hidden * size
    limit = _time_limit(data.get("command", ""))
    return (f" The `s45` rows (`PART=s45e`, {data['kv_gib']:.0f} GiB of KV, {limit} s each) ran after a review of "
            "`benchmarks/throughput.py`: its floor now reads the embedding rows the step uses instead of the whole "
            f"untied input embedding table ({table / 1e9:.3f} GB less for Qwen3-8B: "
            f"~{table / (data['copy_bandwidth_gbps'] * 1e9) * 1000:.1f} ms on the H100, so every earlier step / floor "
            f"here is understated by about that; the s43 H100 FP8 run's {ob['step_over_compute_floor']:.2f}x is "
            f"{corrected:.2f}x against it), its decode steps are the steps that scheduled no prompt tokens, and its "
            "warm-up no longer leaves the timed run's first two prompts in the prefix cache. Their "
            f"{limit} s window is the ramp (mean output {b['mean_output_tokens']:,.0f} tokens for FP8: few "
            f"compressions yet, small steps), so {b['tokens_per_s'] / a['tokens_per_s']:.2f}x against the "
            f"{_time_limit(old.get('command', ''))} s window's {ob['tokens_per_s'] / oa['tokens_per_s']:.2f}x says "
            "that the ratio moves with the window, both runs being cut by their time limit; neither is a run to "
            "completion.")


def fp8_section(results: Path) -> str:
    folder = results / "fp8"
    if not folder.is_dir():
        return ""
    parts = ["## FP8 and INT8 KV pages", "",
             "Random-weight Qwen3-8B on the H200 unless the run is marked otherwise, the same 80 GiB of KV for every "
             "page type, 512 requests of up to "
             "4,096 forced tokens, each system run for the time limit shown "
             "(`benchmarks/throughput.py --systems zipage-2048,zipage-2048-fp8,zipage-2048-int8 --time-limit 60`); "
             "the floor is the step's bytes (weights and KV, scales included) at the copy bandwidth. It leaves out "
             "the linear layers' arithmetic, which at the 8-bit runs' ~490 requests takes longer than reading "
             "their weights (15 GFLOP per Qwen3-8B token: 7.4 TFLOP a step), so those steps cannot reach it; "
             "`benchmarks/throughput.py` also measures the GPU's bf16 matrix rate and records a floor with "
             "the products (`decode_compute_floor_ms`, `step_over_compute_floor`; the last run is the first to "
             "have them). The last column compares the decode steps alone (requests running over the median "
             "step's time): tok/s over a time limit also counts the prefill of every admitted prompt, twice as "
             "many for 8-bit pages, which a run to completion spreads over 4,096 tokens each. Runs are "
             "listed oldest first: `fp8_block128` decoded 8-bit pages with the general kernel, the `tma` runs "
             "with `kernels/paged_decode_fp8.py` reading tiles through tensor descriptors (the default since). "
             "Within a time limit the 8-bit runs, with twice the requests running, reach the budget later "
             "(mean output below 2,048 tokens: no compression yet), so their tok/s still includes the ramp. "
             "`throughput_qwen3-8b_z_8bit_steady.json` runs each system 115 s, past the budget (INT8 pages "
             "rotated there, as they are stored now); `throughput_qwen3-8b_zz_fp8_cfloor.json` 100 s, FP8 "
             "against bf16 (`PART=cfloor` of `benchmarks/gpu_session.sh`); "
             "`throughput_qwen3-8b_zzz_fp8_vdim_steady.json` 125 s, FP8 pages with values stored "
             "dimension-major (the default since) against bf16 (`PART=vdim2`); "
             "`throughput_qwen3-8b_zzzz_fp8_smallops_steady.json` the same pair after the cuts to the "
             "step's small kernels (`PART=final32`, below); `throughput_qwen3-8b_zzzzz_fp8_tail32.json` 100 s, "
             "bf16, FP8, and FP8 with `exact_tail=32` (`PART=longtail STAGE=b`; the ring of exact tokens, 2.4 GB "
             "here, is beside the 80 GiB of pages); `throughput_qwen3-8b_zzzzzz_fullkv_fp8_h100.json` full KV in FP8 "
             "against bf16 pages (the issue's full-KV pair) on an H100, whose 80 GB hold 40 GiB of KV beside the "
             "weights, 80 s each (`KV_GIB=40 TIME_LIMIT=80 PART=fullkv8`, run as its command by hand; "
             "`benchmarks/results/issue15/s40/`): with no "
             "eviction both run past what their pages hold and preempt (recompute) the newest requests; "
             "`throughput_qwen3-8b_zzzzzzz_fp8_search.json` 100 s, bf16 against FP8 pages as they are stored now "
             "(16 scales searched, keys weighted by the queries, the candidates' codes as products, the store "
             "launched as two heads a program with keys and values apart: `ZIPAGE_STORE_LAUNCH=heads=2,split=1,"
             "warps=2`, the default since; `PART=fp8pair`, `benchmarks/results/issue15/s41/`); "
             "`throughput_qwen3-8b_zzzzzzzzz_fp8_plain_h100.json` the same pair with the decode kernel's default "
             "of session 42 (two warps, `/plain` below) on an H100, 50 GiB of KV, 100 s each (`KV_GIB=50 "
             "PART=fp8pair`, `benchmarks/results/issue15/s43/call3`; at 40 GiB, 245 against 126 requests, two runs "
             "gave 1.51x and 1.57x, `call1` and `call2`). An H100's 80 GB cannot hold the H200's 80 GiB of KV, "
             "and at its ~300 requests the linear layers are less bound by the tensor cores than at 490, so its "
             "ratio is not the H200's." + _s45_note(results), "",
             "What holds the FP8 step above its floor is the decode kernel on FP8 pages, at 0.69 of the copy "
             "bandwidth where the bf16 kernel reaches 1.0. Nsight Compute (`PART=ncu`, "
             "`benchmarks/results/issue15/s30/`) finds it bound neither by memory (DRAM 63%) nor by issue slots "
             "(31% busy) but by each tile's chain of dependent work: ~830 instructions per warp and 128-token "
             "tile at ~9 cycles each, mostly waiting on shared memory (the value tile's fp16 copy for the second "
             "dot, 7-way bank-conflicted; the row maxima across the 4 warps; the probabilities moved to the "
             "second dot's layout), with 3 programs (12 warps) per multiprocessor, limited by 168 registers and "
             "75 KB of shared memory each. Double-buffered tile copies (`/pf` below, taken back out) and "
             "head-major scale pools (`/hm`) each moved it by 2% or less. Storing values dimension-major "
             "(each page `[H_kv, D, page]`, `/vdim` below) lets the value tile reach the second dot's operand "
             "layout without that copy; with a partial tile's stale rows left in place (`/none`) the kernel "
             "reads 8-bit pages at 0.85 of the copy bandwidth (0.65 ms at 512 requests, against 0.79), and the "
             "engine's FP8 decode step past the budget fell from 35.9 to 34.4 ms, 1.55x to 1.44x its floor with "
             "products (`benchmarks/results/issue15/s31/`). Converting those stale rows as any other code "
             "(`/plain`: the engine's pools hold no NaN code, so the NaN check's 5 integer operations per 4 value codes "
             "go; 934 to 786 instructions in the compiled tile loop) with two warps a program instead of four "
             "took the kernel in the engine's step at 490 requests from 336 to 312 us a layer, and the step from "
             "25.18 to 24.21 ms of device time (`fp8_decode_vplain.json`, `benchmarks/results/issue15/s42/`).", ""]
    targets = targets_table(results)
    if targets:
        parts += ["### Where the FP8 targets stand", "",
                  "Each target of the FP8 issue against the newest result on this page (the sections below have the "
                  "runs, their commands and the reasons for each miss). The zipage-2048 pair's H200 rows are the "
                  "newest H200 run, with FP8 pages' scale search (`benchmarks/results/issue15/s41/`); before the search "
                  "the same pair gave 1.40x (`throughput_qwen3-8b_zzzzz_fp8_tail32.json`). The H100 rows are the newest "
                  "run, with the decode kernel's default of session 42, at about 300 requests (the H200 has not run "
                  "that default end to end). The quality rows at 1/8 "
                  "and 1/4 come from 8 sequences with the store as it is now (candidates' codes as products); the "
                  "earlier 4-sequence reports beside them ran the store before that change, which moves a code "
                  "only where a product lands an ulp from the quotient, yet moved top-1 at 1/4 from 0.24 to 0.60 "
                  "points lost on those 4 sequences: a difference of a few tenths of a point is within what one "
                  "flipped rounding does to which tokens a compression keeps. The full-KV row's newest reports ran 8 "
                  "sequences with the store as it is now; only rotated pages with a 128-token tail stay within half a "
                  "point of bf16 pages there (4 sequences had given 0.48 points for a 64-token tail).", "", *targets, ""]
    elsewhere = sorted((results / name for name in ENGINE_RUNS_ELSEWHERE if (results / name).exists()), key=_run_key)
    engine = _engine_table(sorted(folder.glob("throughput_*.json")) + elsewhere,
                           {path: str(path.relative_to(results)) for path in elsewhere})
    parts += engine + [""] if engine else ["(no engine pair yet)", ""]
    profile = _step_profile_table(folder)
    if profile:
        parts += ["### Where the decode step's time goes, and why 8-bit pages stop near 1.3x", "",
                  "`python benchmarks/profile_step.py --requests 490 --prompt-tokens 1024 --kv-cache-dtype fp8 "
                  "--default-only --out ...` and `--requests 252` on bf16 pages (`profile_step_*.json`, "
                  "`benchmarks/results/issue15/s32/call4`): the same memory holds 490 requests on FP8 pages and "
                  "252 on bf16 pages at these contexts; each column is the device time of one decode step "
                  "(5 profiled steps, CUDA graphs, no compression among them) by kind of kernel.", ""]
        parts += profile + ["",
                  "Twice the requests double the linear layers' arithmetic as well as the KV they read: past about "
                  "190 requests Qwen3-8B's linear layers are bound by the tensor cores, not by reading their "
                  "weights, so they cost 10.4 ms a step at 490 requests against 6.0 ms at 252. With the FP8 decode "
                  "kernel at the full copy bandwidth (40.3 GB of codes and scales a step here: 9.5 ms, against "
                  "12.6 ms measured, 0.75 of it) and no store cost, the step would take about 21.6 ms: 22.7 tokens "
                  "a millisecond, 1.52x the bf16 step's 15.0. FP8 pages with bf16 weights cannot reach 1.6x on "
                  "this GPU at these contexts; the rest of the gap is the kernel's own (above) and the "
                  "dimension-major value store, whose bytes each land in a 32-byte sector of their own that the "
                  "memory reads and writes back whole: `benchmarks/store_bench.py` (one CUDA graph of a step's "
                  "stores over 36 layers' pools) times it at 30.6 us a layer at 490 requests against 3.0 us with "
                  "values token-major (1.1 against 0.1 ms a step; `benchmarks/results/issue15/s32/call3`), "
                  "while the kernel reads dimension-major values 5 ms a step faster. Storing the new token's "
                  "value from "
                  "the decode kernel instead (its codes put into the last tile, which holds the rest of the 32-token "
                  "segment, and the segment written back as whole sectors) was compiled for sm_90 and dropped "
                  "unmeasured: patching the tile inside the loop takes every value tile through shared memory "
                  "(Triton 3.9: 255 registers and 1 KB of spills against 152 and none, "
                  "`benchmarks/decode_compile.py`).", "",
                  "Then the step's small kernels were cut (`benchmarks/results/issue15/s32/call3`, `call4`, each "
                  "a before/after pair in one GPU call): per-head RMSNorms read the merged q/k/v projection in "
                  "place (no strided copy of the queries and keys first) and several rows a program; an all-greedy "
                  "batch takes the argmax of the logits as they are (no float32 copy of 490 x 151,936); the query "
                  "ring is stored by the store kernel (3.6 us a layer against index_copy_'s 9.1); RoPE takes a "
                  "token's heads in one program (0.52 to 0.19 ms a step); a decode with one split writes its "
                  "output from the split pass and skips the merge kernel (0.43 ms a step); a decode-only step "
                  "returns the kernel's output without a copy. FP8 at 490 requests: 26.88 to 25.75 ms of device "
                  "time a step, then 26.27 to 25.75 ms (the second pair's before is the first pair's after, "
                  "re-measured); bf16 at 252: 17.47 to 16.91 ms, then 17.26 to 16.85 ms. End to end "
                  "(`throughput_qwen3-8b_zzzz_fp8_smallops_steady.json`, `PART=final32`, the vdim2 workload): "
                  "13,123 against 10,612 tok/s (1.24x), FP8 step 35.7 ms (1.37x its floor with products, 1.44x "
                  "before), bf16 step 22.8 ms (1.15x, 1.21x before); the earlier run's 13,051 and 10,289 tok/s "
                  "came from another call.", ""]
    for path in sorted(folder.glob("fp8_decode_*.json")):
        parts += [f"### Decode kernel on 8-bit pages against bf16 pages (`{path.name}`)", "",
                  "Qwen3-8B attention shapes (32 query heads over 8 KV heads, head dim 128, 256-token pages); "
                  "`python benchmarks/fp8_decode_tune.py` (`--all` for the full sweep). Kernel names: `general` is "
                  "the split kernel every page type uses; `fp8/<convert>/hf<head_fast>` is "
                  "`kernels/paged_decode_fp8.py` (`/hm`: head-major scale pools; `/page`: one page-table read per "
                  "tile; `/tma`: tiles through tensor descriptors, the default on Hopper; `/swap1`, `/swap2`: the key "
                  "tile, then the value tile too, as the dots' first operand, measured slower and removed since; "
                  "`/pf`: each tile's page read one tile ahead so the tile copies are double-buffered, no faster "
                  "and removed since; `/noptx`: INT8 codes converted per element, as before they were converted four "
                  "at a time in PTX; `/bytes`, `/operand`, `/none`: a partial tile's stale value rows zeroed as "
                  "bytes, zeroed after conversion, or left in place (FP8's NaN codes read as +-448); `/plain`: left "
                  "in place and converted as any other code, for pools that hold no NaN code (the engine's), the "
                  "default since session 42 with two warps; `/vdim`: values stored dimension-major, the "
                  "engine's layout since).", ""]
        parts += _kernel_table(path) + [""]
    reports = [("quality_fp8.md", "FP8 and INT8 pages with eviction (quality report)",
                "INT8 pages here are unrotated (measured before INT8 pages were stored rotated; "
                "`ZIPAGE_INT8_ROTATION=0` gives them back)."),
               ("quality_int8_rotated.md", "INT8 pages, rotated, with eviction (quality report)",
                "INT8 pages as they are stored now, in the Hadamard-rotated basis."),
               ("quality_fp8_rotated.md", "FP8 pages, rotated (`ZIPAGE_FP8_ROTATION=1`), with eviction (quality report)",
                "FP8 pages stored in the Hadamard-rotated basis, as INT8 pages are. Not the default: on Gemma 3 "
                "270M a rotation makes e4m3 rounding worse (see the rounding tables below)."),
               *((f"quality_fp8{rot}_exact_tail_{b}.md",
                  f"FP8 pages{', rotated,' if rot else ''} with exact tails (`exact_tail=16`), "
                  f"budget {b.replace('_', '/')} (quality report)",
                  "generate() decoding one token a step (`--decode step`: a forward of several tokens would read them "
                  "all exactly), each query reading its last 16 tokens in the model's dtype; the bf16 row is run the "
                  "same way (its figures equal the chunked runs', the same cache states).")
                 for rot in ("", "_rotated") for b in ("1_8", "1_4")),
               *((f"quality_fp8_qweights_exact_tail_{b}.md",
                  f"FP8 pages with the query-weighted search and exact tails of 16 and 32, budget {b.replace('_', '/')} "
                  "(quality report)",
                  "FP8 pages as they are stored now (16 scales searched per row, keys weighted by the queries' "
                  "moments); generate() decoding one token a step.") for b in ("1_8", "1_4")),
               *((f"quality_fp8{rot}_qweights_exact_tail{tail}_control.md",
                  f"Full KV in FP8 pages{', rotated,' if rot else ''} with the query-weighted search and a {tail}-token "
                  "exact tail (quality report)",
                  "Nothing evicted: what the page type alone costs, scored at the positions of 1/4 (the compressed "
                  "row is the same pages at a budget of 1/4). Where a `bf16 pages` row is shown, the FP8 pages are "
                  "also held to what they replace on a GPU: full KV with keys and values stored in bf16 (points "
                  "lost: the bf16 pages' top-1 against full KV in the model's dtype minus the FP8 pages').")
                 for tail in (64, 128) for rot in ("", "_rotated"))]
    parts += ["FP8 pages search each stored row's scale (16 scales from `max |x| / 448` to 1.92 times that, the least "
              "rounding error; `kernels/fp8.py`). The FP8 quality reports measured before that, every one "
              "below and every `quality_fp8*` file without `search` in its name, stored one scale `max |x| / 448` per "
              "row: their commands reproduce them with `ZIPAGE_FP8_SCALE_STEPS=1`. "
              "`quality_fp8_search_exact_tail64_control.md` against `quality_fp8_plain_exact_tail64_control.md` "
              "compares the two on the same rows. Since then keys' scales are compared by what their rounding does "
              "to the logits of the queries that read them (`zipage/query_moments.py`): the files with `qweights` "
              "in their name measure that, the `search` ones the squared error "
              "(`ZIPAGE_FP8_QUERY_WEIGHTS=0` gives it back).", ""]
    chunked = sorted(f.stem for f in results.glob("quality_*8*.json") if _decoded_in_chunks(f))
    if chunked:
        parts += ["Decoded in chunks (`--decode chunk`): " + ", ".join(f"`{n}`" for n in chunked) + ". A forward of "
                  "several tokens reads its own keys and values unrounded and counts its queries in the FP8 keys' "
                  "weights, which generate()'s one-token steps do not, so these do not measure what 8-bit pages cost "
                  "in generate(); the targets are read from the reports decoded a token a step, and "
                  "`benchmarks/quality.py` now decodes 8-bit rows only that way.", ""]
    for name, title, note in reports:
        quality = results / name
        if quality.exists():
            parts += [f"### {title}", "",
                      "Teacher-forced fidelity of the default scorer with each page type against full KV in the "
                      f"model's dtype (`benchmarks/results/{name}`; its command is in the file). {note}", ""]
            parts += _quality_rows(quality.read_text()) + [""]
    index = _quality_index(results)
    if index:
        parts += ["### Every 8-bit quality run", "",
                  "Each 8-bit target of every `quality_fp8*` and `quality_int8*` report under `benchmarks/results/` "
                  "(SmolLM2-135M-Instruct, 4 x 2,048 tokens of MATH-500 solutions, float32 on the CPU), as its "
                  "JSON records it, by file name. *Pages as stored* is the report's own record of the FP8 store where it has "
                  "one (`fp8_store`), else follows from the environment its command names and from when it ran: "
                  "files named `plain`, and those older than the scale search (every FP8 file without `search` or "
                  "`qweights` in its name), stored one scale `max |x| / 448` per row. Budget "
                  "rows are held to the same budget in the model's dtype; full-KV rows (`full KV in ... pages`) to "
                  "full KV in the model's dtype or, where the report has that control, to full KV in bf16 pages.", ""]
        parts += index + [""]
    roundings = sorted(folder.glob("fp8_key_rounding*.md"))
    if roundings:
        parts += ["### Where 8-bit pages lose quality", "",
                  "Keys or values rounded through e4m3 or int8 (per token and head, as stored) in one "
                  "teacher-forced forward, nothing evicted, against the same forward unrounded "
                  "(`python benchmarks/fp8_key_rounding.py [--model gemma3]`). `rotated` rows round in the "
                  "Hadamard basis INT8 pages are stored in (`x H`, queries rotated the same way).", ""]
        for path in roundings:
            parts += [path.read_text().split("\n", 2)[-1].strip(), ""]
    return "\n".join(parts)


def _quality_rows(text: str) -> list[str]:
    """The teacher-forced table and the page types' target rows of a quality report."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        if line.startswith("| config |"):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                out.append(lines[j])
                j += 1
            out.append("")
        elif line.startswith("| target |"):
            out += [line, lines[i + 1]]
            out += [row for row in lines[i + 2:] if row.startswith("|") and "kv_cache_dtype" in row or "pages" in row
                    and row.startswith("|")]
            break
    return out


def _pages_as_stored(stem: str, command: str, target: str, store: dict | None = None,
                     settings: dict | None = None) -> str:
    """How a quality report's 8-bit pages were stored: from its record of the FP8 store (``store``, reports
    since it was kept) or else its file name, its command's environment and the target's page type (see the
    index's caption)."""
    env = command.split(" python", 1)[0] if " python" in command else ""
    if "int8" in target.lower():
        rotated = "ZIPAGE_INT8_ROTATION=0" not in env and stem != "quality_fp8"  # (quality_fp8: before rotation)
        control = _control_rotation(target, settings)
        if "kv_rotation=" in target:  # (a row's own setting, then the controls' --kv-rotation)
            rotated = "kv_rotation=True" in target
        elif control is not None:
            rotated = control
        return "INT8, " + ("rotated" if rotated else "unrotated")
    if store is not None:
        scale = ("one scale max/448" if store.get("scale_steps", 16) == 1 else
                 f"{store.get('scale_steps')} scales searched" + (", keys query-weighted" if store.get("query_weights")
                                                                   else " (squared error)"))
    elif "ZIPAGE_FP8_SCALE_STEPS=1" in env or "plain" in stem or not any(w in stem for w in ("search", "qweights")):
        scale = "one scale max/448"
    elif "qweights" in stem and "ZIPAGE_FP8_QUERY_WEIGHTS=0" not in env:
        scale = "16 scales searched, keys query-weighted"
    else:
        scale = "16 scales searched (squared error)"
    control = _control_rotation(target, settings)
    rotated = ("kv_rotation=True" in target if "kv_rotation=" in target else control if control is not None
               else "ZIPAGE_FP8_ROTATION=1" in env)
    return f"FP8, {scale}" + (", rotated" if rotated else "")


def _control_rotation(target: str, settings: dict | None) -> bool | None:
    """A full-KV control's ``kv_rotation`` as its report ran it (``--kv-rotation``: ``settings``), or None."""
    if not target.startswith("full KV") or not settings or settings.get("kv_rotation") is None:
        return None
    return settings["kv_rotation"] == "on"


def _quality_index(results: Path) -> list[str]:
    """One row per 8-bit target of every 8-bit quality report (``EIGHT_BIT_REPORTS``): report, pages as
    stored, target, value, verdict."""
    rows = []
    for path in sorted(p for p in results.glob("quality*.json") if p.stem.startswith(EIGHT_BIT_REPORTS)):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        command = data.get("command", "")
        for t in data.get("targets", []):
            name = t.get("target", "")
            if "kv_cache_dtype=" not in name and " pages" not in name:
                continue  # (the bf16 budget targets each report repeats)
            pages = _pages_as_stored(path.stem, command, name, data.get("fp8_store"), data.get("settings"))
            rows.append(f"| `{path.stem}` | {pages} | {name} | "
                        f"{t.get('value', '')} | {'pass' if t.get('passed') else '**miss**'} |")
    if not rows:
        return []
    return ["| report | pages as stored | target | measured | verdict |", "|---|---|---|---|---|", *rows]


def _pair(folder: Path, bf16: str) -> tuple[Path, dict, dict] | None:
    """The newest throughput file with ``bf16`` and ``bf16-fp8`` both measured (by the ``date`` a run records,
    then by name for runs from before it was recorded): path, bf16, FP8."""
    found = []
    for path in folder.glob("throughput_*.json"):
        data = json.loads(path.read_text())
        systems = data.get("systems", {})
        a, b = systems.get(bf16, {}), systems.get(f"{bf16}-fp8", {})
        if "tokens_per_s" in a and "tokens_per_s" in b:
            found.append((_run_key(path), path, a, b))
    return max(found, key=lambda f: f[0])[1:] if found else None


def _run_key(path: Path) -> tuple[str, str]:
    """How runs are ordered, oldest first: by the ``date`` a run records, then by name (runs from before it was
    recorded come first)."""
    return json.loads(path.read_text()).get("date", ""), path.name


def _pairs_by_card(folder: Path, bf16: str) -> list[tuple[str, Path, dict, dict]]:
    """The newest ``bf16`` / ``bf16-fp8`` pair on each card (``H200``, ``H100``; ``""`` where a run does not name
    its GPU): card, path, bf16, FP8; the H200, the card the FP8 targets name, first."""
    newest: dict[str, tuple[tuple[str, str], Path, dict, dict]] = {}
    for path in folder.glob("throughput_*.json"):
        data = json.loads(path.read_text())
        systems = data.get("systems", {})
        a, b = systems.get(bf16, {}), systems.get(f"{bf16}-fp8", {})
        if "tokens_per_s" not in a or "tokens_per_s" not in b:
            continue
        card = (data.get("device") or "").replace("NVIDIA ", "").split(" ")[0]
        key = _run_key(path)
        if card not in newest or key > newest[card][0]:
            newest[card] = (key, path, a, b)
    order = sorted(newest, key=lambda c: (c != "H200", c))
    return [(card, *newest[card][1:]) for card in order]


def _lost(results: Path, name: str, must: str) -> list[tuple[str, float, bool]]:
    """(target, points lost, passed) of the FP8 targets of quality report ``name`` whose text contains ``must``."""
    path = results / name
    if not path.exists():
        return []
    out = []
    for t in json.loads(path.read_text()).get("targets", []):
        m = re.search(r"\(\+?(-?[\d.]+) points lost\)", t.get("value", ""))
        if must in t.get("target", "") and m:
            out.append((t["target"], float(m.group(1)), bool(t.get("passed"))))
    return out


def _tail(target: str) -> str:
    """``exact_tail=N`` of a target's row, or ``no tail``."""
    m = re.search(r"exact_tail=\d+", target)
    return m.group(0) if m else "no tail"


# the quality reports behind the FP8 targets at 1/8 and 1/4 of the length: groups, newest first; the first group with
# a report decides (every tail its reports measured is shown), the later groups are shown as earlier results
QUALITY_TARGET_REPORTS = {
    "1/8": (("quality_fp8_qweights_products_8seq_1_8.json",), ("quality_fp8_qweights_exact_tail_1_8.json",)),
    "1/4": (("quality_fp8_qweights_products_8seq_1_4.json", "quality_fp8_qweights_products_8seq_tail32_1_4.json",
             "quality_fp8_qweights_products_8seq_tail64_1_4.json"), ("quality_fp8_qweights_exact_tail_1_4.json",)),
}


# the same for the full-KV controls (nothing evicted) against bf16 pages
CONTROL_TARGET_REPORTS = (
    ("quality_fp8_qweights_products_8seq_control_tail32.json", "quality_fp8_qweights_products_8seq_control_tail64.json",
     "quality_fp8_rotated_qweights_products_8seq_control_tail128.json"),
    ("quality_fp8_qweights_exact_tail64_control.json", "quality_fp8_rotated_qweights_exact_tail128_control.json"),
)


def _setting(target: str, name: str) -> str:
    """A quality target's pages as a row names them: its exact tail, and rotated if its report was."""
    return _tail(target) + (", rotated" if "rotated" in name else "")


def _newest_group(results: Path, groups: tuple, must: str) -> tuple[str, str, str] | None:
    """(measured, verdict, files) for one quality target row: the first group of reports with a result decides
    (each setting it measured, with its verdict), the later groups are shown as earlier results."""
    found = [[(name, lost) for name in group if (lost := _lost(results, name, must))] for group in groups]
    found = [group for group in found if group]
    if not found:
        return None
    current, earlier = found[0], found[1:]
    lost = [(_setting(t, name), v, ok) for name, group_lost in current for t, v, ok in group_lost]
    seqs = {json.loads((results / name).read_text()).get("settings", {}).get("seqs") for name, _ in current}
    measured = "points lost: " + ", ".join(f"`{s}`: {v:+.2f}" for s, v, _ in lost) + (
        f" ({seqs.pop()} sequences of 2,048 tokens)" if len(seqs) == 1 and None not in seqs else "")
    for group in earlier:
        for old, old_lost in group:
            measured += ("; earlier, " + ", ".join(f"`{_setting(t, old)}`: {v:+.2f}" for t, v, _ in old_lost)
                         + f" (`{old[:-5]}`)")
    passed = [f"`{s}`" for s, _, ok in lost if ok]
    missed = [f"`{s}`" for s, _, ok in lost if not ok]
    verdict = ("pass" if not missed else "**miss**" if not passed
               else f"pass with {', '.join(passed)}; **miss** with {', '.join(missed)}")
    return measured, verdict, ", ".join(f"`{name[:-5]}`" for name, _ in current)


def targets_table(results: Path) -> list[str]:
    """Where each target of the FP8 issue stands, from the newest results this page shows (one row a target)."""
    folder = results / "fp8"
    rows = []

    def row(target: str, measured: str, verdict: str, where: str) -> None:
        rows.append(f"| {target} | {measured} | {verdict} | {where} |")

    pairs = _pairs_by_card(folder, "zipage-2048")
    for card, path, a, b in pairs:
        on = f"{card}, " if card else ""
        kv = json.loads(path.read_text()).get("kv_gib")
        memory = f", {kv:.0f} GiB of KV" if kv else ""
        ratio = b["tokens_per_s"] / a["tokens_per_s"]
        row("zipage-2048-fp8 >= 1.6x the tokens/s of zipage-2048 in bf16 (Qwen3-8B shapes, 256+ requests, the "
            "same KV memory)", f"{ratio:.2f}x ({on}{b['tokens_per_s']:,.0f} against {a['tokens_per_s']:,.0f} tok/s; "
            f"{b['mean_running']:.0f} against {a['mean_running']:.0f} requests at once{memory})",
            "pass" if ratio >= 1.6 else "**miss**", f"`fp8/{path.name}`")
    if pairs:
        _, path, a, b = max(pairs, key=lambda p: _run_key(p[1]))
        pages = b["kv_pages"] / a["kv_pages"]
        row("twice the requests fit in the same memory", f"{pages:.2f}x the pages ({b['kv_pages']:,} against "
            f"{a['kv_pages']:,} of {a['page_size']} tokens); the float32 scales take the rest (4 bytes a 128-byte "
            "row)", "pass, but for the scales" if pages >= 1.9 else "**miss**", f"`fp8/{path.name}`")
    steps = []
    for card, path, a, b in pairs:
        over = b.get("step_over_compute_floor")
        if over:
            running = b.get("median_decode_running")
            at = f"{card}, " if card else ""
            at += f"{running:.0f} requests: " if running else ""
            steps.append((f"{over:.2f}x its floor with the linear layers' products ({at}"
                          f"{b['median_decode_step_ms']:.1f} against {b['decode_compute_floor_ms']:.1f} ms; "
                          f"{b['step_over_floor']:.2f}x the bytes-only floor)",
                          _corrected_over(json.loads(path.read_text()), b), over, path))
    # runs from before session 45 also against the floor as computed since; the last such row says what changed
    last = max((i for i, step in enumerate(steps) if step[1]), default=None)
    for i, (measured, corrected, over, path) in enumerate(steps):
        if corrected:
            measured += f"; {corrected:.2f}x against the " + (
                "floor corrected in session 45 (the embedding rows read, not the whole table)" if i == last
                else "corrected floor")
        row("the FP8 decode step within 1.25x of its own floor", measured, "pass" if over <= 1.25 else "**miss**",
            f"`fp8/{path.name}`")
    full = _pair(folder, "zipage-fullkv")
    if full:
        path, a, b = full
        data = json.loads(path.read_text())
        row("full-KV FP8 against full-KV bf16, reported", f"{b['tokens_per_s'] / a['tokens_per_s']:.2f}x "
            f"({b['tokens_per_s']:,.0f} against {a['tokens_per_s']:,.0f} tok/s; {b['mean_running']:.0f} against "
            f"{a['mean_running']:.0f} requests at once, {b.get('preemptions', 0):,} against {a.get('preemptions', 0):,} "
            f"preemptions; {data.get('device', 'GPU')}, {data.get('kv_gib', '?')} GiB of KV)", "reported",
            f"`fp8/{path.name}`")
    else:
        row("full-KV FP8 against full-KV bf16, reported", "not measured yet (`PART=fullkv8` of "
            "`benchmarks/gpu_session.sh` is ready)", "**missing**", "")
    for what, groups in QUALITY_TARGET_REPORTS.items():
        found = _newest_group(results, groups, "kv_cache_dtype=fp8")
        if found:
            row(f"FP8 costs <= 0.5 points of top-1 against the same budget in the model's dtype (the issue's bf16; "
                f"float32 on the CPU), {what} of the length", *found)
    found = _newest_group(results, CONTROL_TARGET_REPORTS, "in bf16 pages")
    if found:
        row("the same for full KV (nothing evicted), against full KV in bf16 pages", *found)
    tune = results / "prefill" / "prefill_tune.json"
    if tune.exists():
        ratios = []
        for r in json.loads(tune.read_text())["rows"]:
            if r["case"].startswith("prompt "):
                base = r.get("best_baseline_ms", r["baseline_ms"])
                done = [v["ms"] for n, v in r["kernels"].items() if v.get("ok") and "ms" in v and not n.startswith("v1")]
                if done:
                    ratios.append(base / min(done))
        fresh, ragged_route = fresh_ranges(results), cudnn_ranges(results)
        if ratios and ragged_route and ragged_route["ratios"]:
            # whole prompts through cuDNN's ragged attention (session 53; the default where the extra is installed)
            kernel, got = ratios + (fresh["kernel"] if fresh else []), ragged_route["ratios"]
            lo, low = min(got), ragged_route["lowest"]
            parity = " where both sides run cuDNN's kernel" if low and low.startswith("prompt ") else ""
            if not ragged_route["ok"]:
                verdict = "**miss**: a probe case failed or disagreed with the baseline"
            elif lo >= 1.0:
                verdict = "pass with cuDNN's ragged route (the `cudnn` extra); **miss** for the Triton kernel alone"
            elif lo >= 0.99:  # (two runs of one kernel differ by this much)
                below = sum(x < 1.0 for x in got)
                verdict = (f"**miss**, at parity with cuDNN's ragged route ({below} of {len(got)} cases below 1.0x, "
                           f"the lowest {low}: {lo:.3f}x{parity}); **miss** for the Triton kernel alone")
            else:
                verdict = f"**miss** ({low}: {lo:.3f}x with cuDNN's ragged route)"
            on = f" ({ragged_route['card']})" if ragged_route["card"] else ""
            triton = ragged_route["triton"]
            same = {True: f"; the engine's time to first token the same within {SPREAD:.0%} (below: whole prompts "
                          "through cuDNN's ragged attention)",
                    False: f"; the engine's time to first token differs by more than {SPREAD:.0%} (below)",
                    None: ""}
            row("prefill over paged KV >= 1.0x gather + SDPA, 512-4,096-token prompts",
                f"whole prompts through cuDNN's ragged attention (`kernels/cudnn_prefill.py`, the engine's default "
                f"where `pip install -e \".[cudnn]\"` installed the frontend, on Hopper with pages in the model's "
                f"dtype): {lo:.3f}-{max(got):.2f}x{on} over "
                f"the probe's cases whose prompts are all 512-4,096 tokens, "
                f"{'every case agreeing' if ragged_route['ok'] else 'a case failing or disagreeing'}; the Triton "
                "kernel alone: "
                + (f"{min(triton):.2f}-{max(triton):.2f}x in the same probe, " if triton else "")
                + f"{min(kernel):.2f}-{max(kernel):.2f}x in the sweeps (cached prefixes and chunked steps: above "
                "1.0x)" + same[ragged_route["ttft_same"]], verdict,
                f"`{ragged_route['path'].relative_to(results)}`, `prefill/prefill_tune.json`, `issue15/s45/`")
        elif ratios and fresh and fresh["bucket"] and fresh["ragged"]:
            # the kernel over both sweeps; whole prompts through SDPA in length buckets (session 45, opt-in)
            kernel, bucket, ragged = ratios + fresh["kernel"], fresh["bucket"], fresh["ragged"]
            verdicts = [("the kernel", min(kernel) >= 1.0), ("ragged prompts", min(ragged) >= 1.0),
                        ("prompts of one length (opt-in)", min(bucket) >= 1.0)]
            missed = [what for what, ok in verdicts if not ok]
            passed = [what for what, ok in verdicts if ok]
            verdict = "; ".join(([f"**miss** for {' and '.join(missed)}"] if missed else [])
                                + ([f"pass for {' and '.join(passed)}"] if passed else []))
            on = f" ({fresh['card']})" if fresh["card"] else ""
            row("prefill over paged KV >= 1.0x gather + SDPA, 512-4,096-token prompts", f"Triton kernel: "
                f"{min(kernel):.2f}-{max(kernel):.2f}x on whole prompts (cached prefixes and chunked steps: above "
                "1.0x); whole prompts of one length batched through cuDNN in place (`kernels/fresh_prefill.py`, "
                f"opt-in `ZIPAGE_FRESH_PREFILL=1`): {min(bucket):.2f}-{max(bucket):.2f}x{on}; ragged prompts copied "
                f"into length buckets: {min(ragged):.2f}-{max(ragged):.2f}x; the engine's time to first token no "
                "better with it (below: whole prompts through PyTorch's fused attention)", verdict,
                "`prefill/prefill_tune.json`, `issue15/s45/`")
        elif ratios:
            row("prefill over paged KV >= 1.0x gather + SDPA, 512-4,096-token prompts", f"{min(ratios):.2f}-"
                f"{max(ratios):.2f}x whole prompts (cached prefixes and chunked steps: above 1.0x; below: PyTorch's "
                "own attention on whole prompts, the long-prompt TTFT)", "pass" if min(ratios) >= 1.0 else "**miss**",
                "`prefill/prefill_tune.json`")
    if not rows:
        return []
    return ["| target | measured | verdict | file |", "|---|---|---|---|", *rows,
            "| `generate()` peak memory never above `DynamicCache`'s | equal in the bytes tensors request (79.77 MiB "
            "each at batch 1, Qwen3-0.6B shapes); the caching allocator's blocks show 1.09x there; 0.35x by 2,048 "
            "tokens past a budget of 512 at batch 16 | pass in requested bytes | "
            "`issue15/s29/call1/README.md`, generate() below |",
            "| `generate()` not slower than `DynamicCache` before eviction, faster well past the budget | per decode "
            "step 1.008-1.019x before eviction and 4,096 tokens past the budget; 0.81x 16,384 tokens past it (batch "
            "16); FP8 pages' generate() path 1.42x (host-bound at small shapes) | within 2% in bf16 | generate() "
            "below |"]
