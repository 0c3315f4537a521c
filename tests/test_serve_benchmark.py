"""benchmarks/serving.py end to end on the CPU: it starts zipage and full-KV servers on a tiny model,
sends Poisson arrivals, and writes a report whose numbers add up."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from zipage.bench import serving  # noqa: E402


def test_serving_benchmark_smoke_run(tmp_path):
    out = tmp_path / "serving.json"
    assert serving.main(["--model", "tiny", "--rates", "6", "--duration", "2", "--drain", "5", "--output-len", "12",
                         "--input-len", "4", "20", "--num-pages", "128", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["systems"]) == {"zipage", "full"} and (tmp_path / "serving.png").stat().st_size > 0
    for system, (row,) in report["systems"].items():
        assert row["requests"] > 0 and row["errors"] == 0, row
        assert row["finished"] == row["requests"]  # a tiny model keeps up with 6 requests/s
        assert row["output_tokens"] == 12 * row["requests"]
        # every request ended long before the 5 s drain did: the window closes at the last token (2 s of
        # arrivals and their last tokens), so the idle rest of the drain does not dilute the throughput
        assert 2 <= row["wall_s"] < 4.5, row["wall_s"]
        assert row["throughput_tok_s"] == pytest.approx(row["output_tokens"] / row["wall_s"], rel=0.02)
        assert row["itl_p50_ms"] <= row["itl_p99_ms"] and row["ttft_p50_ms"] <= row["ttft_p99_ms"]
        assert report["highest_sustained_rate"][system] == (6 if row["sustained"] else None)
    merged = tmp_path / "merged.json"
    assert serving.main(["--combine", str(out), str(out), "--out", str(merged)]) == 0
    assert [len(rows) for rows in json.loads(merged.read_text())["systems"].values()] == [2, 2]


def test_staircase_runs_rates_back_to_back_with_the_servers_timeline(tmp_path):
    out = tmp_path / "stairs.json"
    assert serving.main(["--model", "tiny", "--systems", "zipage", "--staircase", "--rates", "3", "6", "--duration", "3",
                         "--drain", "4", "--ttft-slo-s", "4", "--output-len", "10", "--input-len", "4", "20",
                         "--num-pages", "128", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["systems"]["zipage"]
    assert report["mode"] == "staircase" and [r["rate"] for r in rows] == [3, 6]
    for row in rows:
        assert row["errors"] == 0 and row["started_in_time"] <= row["started"] <= row["requests"]
        assert row["wall_s"] == pytest.approx(3, abs=0.5)
    samples = report["timeline"]["zipage"]
    assert samples and all(s[1] >= 0 and s[2] >= 0 and 0 <= s[3] <= 1 for s in samples)
    assert (tmp_path / "stairs_timeline.png").stat().st_size > 0


def test_a_stage_is_judged_on_its_own_window_and_arrivals():
    from zipage.bench.serving_load import Result, arrivals_for, summarize, sustains, window_figures

    times = arrivals_for([(2.0, 50.0), (4.0, 50.0)], seed=3)
    first = [t for t, k in times if k == 0]
    assert all(0 < t <= 50 for t in first) and all(50 < t <= 100 for t, k in times if k == 1)
    assert 60 <= len(first) <= 140 and 140 <= len(times) - len(first) <= 260  # Poisson counts near 100 and 200

    # stage window [10, 20): tokens every 10 ms, one 150 ms gap inside the window, one before it
    steady = Result(sent=9.0, prompt_tokens=5, first=9.5, times=[9.5 + 0.01 * i for i in range(100)]
                    + [10.65 + 0.01 * i for i in range(800)] + [10.0 - 0.01])
    steady.times.sort()
    late = [Result(sent=12.0 + i, prompt_tokens=5, first=12.0 + i + (30.0 if i == 0 else 0.5)) for i in range(9)]
    row = summarize(1.0, [steady] + late, 10.0, 20.0, now=25.0, ttft_slo_s=10.0, samples=[], start=0.0)
    row = window_figures(row, [steady] + late)
    assert row["requests"] == 10 and row["started_in_time"] == 9  # one waited 30 s
    assert row["output_tokens"] == sum(10.0 <= t < 20.0 for t in steady.times)
    assert not sustains(row, 100.0)  # 9 of 10 started in time: under 95%
    row["started_in_time"] = 10
    assert sustains(row, 100.0)  # 1 gap of 150 ms in ~800 gaps: p99 under 100 ms
    assert not sustains(row, 5.0)
