"""The benchmarks page's quality sections (benchmarks/report.py, benchmarks/fp8_report.py): the Quality section
shows the main report and its presets once each, and every 8-bit report appears in the FP8 section's index,
each target with the pages as that report stored them."""

from __future__ import annotations

import json

from zipage.bench.fp8_report import _quality_index
from zipage.bench.report import _quality_files


def _report(folder, stem, command, targets, **extra):
    (folder / f"{stem}.json").write_text(json.dumps(dict(command=command, targets=[
        dict(target=t, value=v, passed=ok) for t, v, ok in targets], **extra)))


def test_quality_section_leaves_8bit_reports_to_the_fp8_section(tmp_path):
    bf16 = ("zipage at 1/4: top-1 >= 97% and ppl ratio <= 1.015", "top1 97.5%", True)
    _report(tmp_path, "quality", "python benchmarks/quality.py", [bf16])
    _report(tmp_path, "quality_quick", "python benchmarks/quality.py --quick", [bf16])
    _report(tmp_path, "quality_fp8", "python benchmarks/quality.py --fp8 --int8", [
        bf16,
        ("zipage[kv_cache_dtype=fp8] at 1/4: top-1 within 0.5 points of zipage", "top1 93.93% (+1.72)", False),
        ("full KV in INT8 pages, positions of 1/4: top-1 within 0.5 points of full KV", "top1 99.05%", False)])
    _report(tmp_path, "quality_fp8_rotated_qweights_exact_tail64_control",
            "ZIPAGE_FP8_ROTATION=1 python benchmarks/quality.py --exact-tail 64", [
                ("full KV in FP8 (exact_tail=64) pages, positions of 1/4: top-1 within 0.5 points of full KV in "
                 "bf16 pages", "top1 99.35% vs 99.75% (+0.39 points lost)", True)])
    _report(tmp_path, "quality_fp8_plain_exact_tail64_control", "ZIPAGE_FP8_SCALE_STEPS=1 python benchmarks/quality.py",
            [("full KV in FP8 (exact_tail=64) pages, positions of 1/4: top-1 within 0.5 points of full KV",
              "top1 98.79%", False)])
    _report(tmp_path, "quality_int8_rotated", "python benchmarks/quality.py --int8", [
        ("zipage[kv_cache_dtype=int8] at 1/8: top-1 within 0.5 points of zipage", "top1 92.24% (+0.22)", True)])
    (tmp_path / "quality_broken.json").write_text("{not json")

    assert [p.stem for p in _quality_files(tmp_path)] == ["quality", "quality_quick"]

    rows = _quality_index(tmp_path)
    assert rows[0].startswith("| report | pages as stored | target | measured | verdict |")
    body = rows[2:]
    assert len(body) == 5  # the 8-bit targets only: the bf16 budget target each report repeats is left out
    by_file = {}
    for row in body:
        cells = [c.strip() for c in row.strip("|").split("|")]
        by_file.setdefault(cells[0].strip("`"), []).append(cells)
    assert [c[1] for c in by_file["quality_fp8"]] == ["FP8, one scale max/448", "INT8, unrotated"]
    assert [c[4] for c in by_file["quality_fp8"]] == ["**miss**", "**miss**"]
    assert by_file["quality_fp8_rotated_qweights_exact_tail64_control"][0][1] == \
        "FP8, 16 scales searched, keys query-weighted, rotated"
    assert by_file["quality_fp8_rotated_qweights_exact_tail64_control"][0][4] == "pass"
    assert by_file["quality_fp8_plain_exact_tail64_control"][0][1] == "FP8, one scale max/448"
    assert by_file["quality_int8_rotated"][0][1] == "INT8, rotated"
    assert "+0.39 points lost" in by_file["quality_fp8_rotated_qweights_exact_tail64_control"][0][3]


def test_index_reads_the_rotation_setting(tmp_path):
    """Rows that set ``kv_rotation`` (and controls run with ``--kv-rotation``) are labelled by it, whatever the
    environment's default."""
    _report(tmp_path, "quality_fp8_setting", "python benchmarks/quality.py --kv-rotation on --exact-tail 64", [
        ("zipage[kv_cache_dtype=fp8,kv_rotation=True] at 1/4: top-1 within 0.5 points of zipage", "x", True),
        ("zipage[kv_cache_dtype=int8,kv_rotation=False] at 1/4: top-1 within 0.5 points of zipage", "x", True),
        ("full KV in FP8 (exact_tail=64) pages, positions of 1/4: top-1 within 0.5 points of full KV", "x", False)],
        fp8_store={"scale_steps": 16, "query_weights": True},  # (its own record, whatever the file's name)
        settings={"kv_rotation": "on"})
    pages = [row.split("|")[2].strip() for row in _quality_index(tmp_path)[2:]]
    assert pages == ["FP8, 16 scales searched, keys query-weighted, rotated", "INT8, unrotated",
                     "FP8, 16 scales searched, keys query-weighted, rotated"]


def test_targets_table_reads_the_newest_pair_and_names_what_is_missing(tmp_path):
    from zipage.bench.fp8_report import targets_table

    def system(tok_s, running, pages, step=30.0, floor=24.0):
        return dict(tokens_per_s=tok_s, mean_running=running, kv_pages=pages, page_size=256,
                    median_decode_step_ms=step, decode_compute_floor_ms=floor, step_over_compute_floor=step / floor,
                    step_over_floor=step / 18.0)

    (tmp_path / "fp8").mkdir()
    (tmp_path / "fp8" / "throughput_a.json").write_text(json.dumps(dict(systems={
        "zipage-2048": system(1000.0, 250, 1000), "zipage-2048-fp8": system(1700.0, 500, 1950, 29.0)})))
    (tmp_path / "fp8" / "throughput_b.json").write_text(json.dumps(dict(systems={  # the newer pair
        "zipage-2048": system(1000.0, 250, 1000), "zipage-2048-fp8": system(1400.0, 490, 1940, 33.6)})))
    rows = targets_table(tmp_path)
    speed = next(r for r in rows if r.startswith("| zipage-2048-fp8 >= 1.6x"))
    assert "1.40x" in speed and "**miss**" in speed and "throughput_b.json" in speed
    assert "1.94x the pages" in next(r for r in rows if r.startswith("| twice the requests"))
    step = next(r for r in rows if r.startswith("| the FP8 decode step"))
    assert "1.40x its floor" in step and "**miss**" in step
    assert "**missing**" in next(r for r in rows if r.startswith("| full-KV FP8 against full-KV bf16"))
    (tmp_path / "fp8" / "throughput_c.json").write_text(json.dumps(dict(systems={
        "zipage-fullkv": system(500.0, 100, 1000), "zipage-fullkv-fp8": system(800.0, 200, 1940)})))
    full = next(r for r in targets_table(tmp_path) if r.startswith("| full-KV FP8 against full-KV bf16"))
    assert "1.60x" in full and "reported" in full


def test_targets_table_gives_the_newest_pair_on_each_card_the_h200_first(tmp_path):
    """The FP8 targets name the H200; a newer pair on another card gets rows of its own, after the H200's, and
    never hides the H200's verdict."""
    from zipage.bench.fp8_report import targets_table

    def pair(fp8_tok_s, device, date, over):
        def system(tok_s, running):
            return dict(tokens_per_s=tok_s, mean_running=running, median_decode_running=running, kv_pages=1000,
                        page_size=256, median_decode_step_ms=30.0, decode_compute_floor_ms=30.0 / over,
                        step_over_compute_floor=over, step_over_floor=over)
        return json.dumps(dict(device=device, date=date, kv_gib=40.0, systems={
            "zipage-2048": system(1000.0, 250), "zipage-2048-fp8": system(fp8_tok_s, 490)}))

    (tmp_path / "fp8").mkdir()
    (tmp_path / "fp8" / "throughput_h200_old.json").write_text(pair(1300.0, "NVIDIA H200", "2026-12-01T00:00:00Z", 1.4))
    (tmp_path / "fp8" / "throughput_h200.json").write_text(pair(1380.0, "NVIDIA H200", "2026-12-02T00:00:00Z", 1.34))
    (tmp_path / "fp8" / "throughput_h100.json").write_text(pair(1540.0, "NVIDIA H100 80GB HBM3",
                                                                 "2026-12-03T00:00:00Z", 1.21))
    rows = targets_table(tmp_path)
    speed = [r for r in rows if r.startswith("| zipage-2048-fp8 >= 1.6x")]
    assert len(speed) == 2
    assert "1.38x (H200," in speed[0] and "throughput_h200.json" in speed[0] and "**miss**" in speed[0]
    assert "1.54x (H100," in speed[1] and "throughput_h100.json" in speed[1]
    step = [r for r in rows if r.startswith("| the FP8 decode step")]
    assert "1.34x" in step[0] and "H200, 490 requests" in step[0] and "**miss**" in step[0]
    assert "1.21x" in step[1] and "H100" in step[1] and "| pass |" in step[1]
    assert "throughput_h100.json" in next(r for r in rows if r.startswith("| twice the requests"))  # (the newest)


def test_targets_table_takes_the_newest_run_by_its_date(tmp_path):
    """A run that records its date is newer than every run that does not, whatever the file names say."""
    from zipage.bench.fp8_report import targets_table

    def pair(tok_s, date=None):
        systems = {"zipage-fullkv": dict(tokens_per_s=500.0, mean_running=100),
                   "zipage-fullkv-fp8": dict(tokens_per_s=tok_s, mean_running=200)}
        return json.dumps(dict(systems=systems, **({"date": date} if date else {})))

    (tmp_path / "fp8").mkdir()
    (tmp_path / "fp8" / "throughput_zz_old.json").write_text(pair(600.0))
    (tmp_path / "fp8" / "throughput_a_new.json").write_text(pair(700.0, "2026-12-06T10:00:00Z"))
    (tmp_path / "fp8" / "throughput_b_newer.json").write_text(pair(800.0, "2026-12-07T10:00:00Z"))
    full = next(r for r in targets_table(tmp_path) if r.startswith("| full-KV FP8 against full-KV bf16"))
    assert "1.60x" in full and "throughput_b_newer.json" in full


def test_full_kv_quality_row_takes_the_newest_reports_and_names_each_setting(tmp_path):
    """The full-KV FP8 row of the targets table: the newest group of control reports decides, each setting with its
    own verdict (rotated ones named so); the older reports are shown as earlier results, not counted."""
    from zipage.bench.fp8_report import targets_table

    def report(name, tail, lost, passed, seqs):
        target = (f"full KV in FP8 (exact_tail={tail}) pages, positions of 1/4: top-1 within 0.5 points of full KV "
                  "in bf16 pages")
        (tmp_path / name).write_text(json.dumps(dict(settings=dict(seqs=seqs), targets=[
            dict(target=target, passed=passed, value=f"top1 99.1% vs 99.75% (+{lost:.2f} points lost)")])))

    report("quality_fp8_qweights_products_8seq_control_tail32.json", 32, 0.65, False, 8)
    report("quality_fp8_rotated_qweights_products_8seq_control_tail128.json", 128, 0.30, True, 8)
    report("quality_fp8_qweights_exact_tail64_control.json", 64, 0.48, True, 4)
    row = next(r for r in targets_table(tmp_path) if r.startswith("| the same for full KV"))
    assert "`exact_tail=32`: +0.65, `exact_tail=128, rotated`: +0.30 (8 sequences" in row, row
    assert "earlier, `exact_tail=64`: +0.48 (`quality_fp8_qweights_exact_tail64_control`)" in row, row
    assert "pass with `exact_tail=128, rotated`; **miss** with `exact_tail=32`" in row, row
    (tmp_path / "quality_fp8_qweights_products_8seq_control_tail32.json").unlink()
    (tmp_path / "quality_fp8_rotated_qweights_products_8seq_control_tail128.json").unlink()
    row = next(r for r in targets_table(tmp_path) if r.startswith("| the same for full KV"))
    assert "| pass |" in row and "+0.48" in row and "earlier" not in row, row


def _probe(folder, ratios, ok=True, alternated=None):
    """A cuDNN ragged-route probe (benchmarks/cudnn_prefill_probe.py's JSON) with these ratios on 1,024-token cases
    (and these alternated ones, where given)."""
    rows = [dict(case=f"prompt 1024 x{i}", lens=[1024] * 2, baseline_ms=1.0, best_baseline_ms=1.0, triton_ms=1.5,
                 ratio_triton=0.67, cudnn_ms=1.0 / x, cudnn_host_us=90.0, first_call_ms=40.0 + i, ok=ok,
                 ratio_cudnn=x) for i, x in enumerate(ratios)]
    for row, alt in zip(rows, alternated or []):
        row.update(alt_ratio_cudnn=alt, alt_ratio_tuned=alt + 0.01, tuned_ok=True)
    rows.append(dict(case="prompt 128 x16", lens=[128] * 16, baseline_ms=1.0, best_baseline_ms=1.0, triton_ms=1.0,
                     ratio_triton=1.0, cudnn_ms=2.0, cudnn_host_us=90.0, first_call_ms=900.0, ok=True,
                     ratio_cudnn=0.5))  # (below the target's prompts: not counted)
    from zipage.bench.prefill_report import CUDNN_PROBE

    path = folder / CUDNN_PROBE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(info=dict(device="NVIDIA H100 80GB HBM3", torch="2.11", backend=91900,
                                              frontend="1.32.0", extra={}), rows=rows)))


def test_prefill_target_reads_the_ragged_route_probe(tmp_path):
    """The prefill target's row: the Triton kernel's miss alone; with the ragged route's probe, its range over
    the target's prompts (512 tokens and longer), parity named as such, a disagreeing case a miss."""
    from zipage.bench.fp8_report import targets_table
    from zipage.bench.prefill_report import cudnn_rows

    (tmp_path / "prefill").mkdir()
    (tmp_path / "prefill" / "prefill_tune.json").write_text(json.dumps(dict(rows=[dict(
        case="prompt 1024 x8", baseline_ms=1.0, kernels={"m64": dict(ms=1.5, ok=True)})])))

    def prefill_row():
        return next(r for r in targets_table(tmp_path) if r.startswith("| prefill over paged KV"))

    assert "| **miss** |" in prefill_row() and "0.67-0.67x" in prefill_row()  # (the kernel alone)
    _probe(tmp_path, [1.2, 3.0])
    row = prefill_row()
    assert "1.200-3.00x (H100) over the probe's cases whose prompts are all 512-4,096 tokens, every case " \
           "agreeing" in row and "| pass with cuDNN's ragged route" in row  # (not the 128-token case's 0.5x)
    assert "**miss** for the Triton kernel alone" in row and "0.67-0.67x in the same probe" in row
    _probe(tmp_path, [1.3, 0.995])
    assert "| **miss**, at parity with cuDNN's ragged route (1 of 2 cases below 1.0x, the lowest prompt 1024 x1: " \
           "0.995x where both sides run cuDNN's kernel" in prefill_row()
    _probe(tmp_path, [1.3, 1.01], alternated=[1.29, 0.993])  # (a case's alternated median lower than its window)
    assert "0.993-1.29x (H100)" in prefill_row() and "the lowest prompt 1024 x1: 0.993x" in prefill_row()
    table = "\n".join(cudnn_rows(tmp_path))
    assert "| prompt 1024 x1 | 1.000 | 0.67x (1.500 ms) | 1.010x (0.990 ms) | 0.993x / 1.003x | 90 | yes |" in table
    _probe(tmp_path, [0.95, 1.3])
    assert "| **miss** (prompt 1024 x0: 0.950x with cuDNN's ragged route) |" in prefill_row()
    _probe(tmp_path, [1.2, 1.3], ok=False)
    assert "a case failing or disagreeing" in prefill_row() and "**miss**: a probe case failed" in prefill_row()
    table = "\n".join(cudnn_rows(tmp_path))
    assert "| prompt 1024 x0 | 1.000 | 0.67x (1.500 ms) | 1.200x (0.833 ms) | - | 90 | **no** |" in table


def test_ragged_route_section_leaves_out_what_its_files_lack(tmp_path):
    """The cuDNN section: a graph-build run whose min_bucket part failed for a bucket (an "error" entry), runs
    without modes, a probe row without timings: the page says what failed and renders the rest, never crashes."""
    from zipage.bench.prefill_report import CUDNN_BUILDS, CUDNN_PROBE, CUDNN_RUN, cudnn_rows

    _probe(tmp_path, [1.2])
    builds = tmp_path / CUDNN_RUN / CUDNN_BUILDS
    builds.parent.mkdir(parents=True, exist_ok=True)
    builds.write_text(json.dumps(dict(keys=[[1, 128]], modes={"fixed": dict(error="boom")}, min_bucket={
        "(1, 128)": {"128": [0.01, True], "2048": [0.02, True]}, "error": {"4096": "Traceback ..."}})))
    page = "\n".join(cudnn_rows(tmp_path))
    assert "| (1, 128) | 1.00x (10 µs) | 2.00x (20 µs) |" in page
    assert "Graphs from S_max 4,096 failed" in page
    builds.write_text(json.dumps(dict(keys=[])))
    assert "What a graph costs" not in "\n".join(cudnn_rows(tmp_path))
    probe = tmp_path / CUDNN_PROBE
    d = json.loads(probe.read_text())
    d["rows"][0] = dict(case="prompt 1024 x0", lens=[1024], baseline_ms=1.0, error="graph failed")
    probe.write_text(json.dumps(d))
    assert "| prompt 1024 x0 | 1.000 | - | failed | - | - | - |" in "\n".join(cudnn_rows(tmp_path))
