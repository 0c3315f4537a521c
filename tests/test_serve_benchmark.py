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
        assert row["itl_p50_ms"] <= row["itl_p99_ms"] and row["ttft_p50_ms"] <= row["ttft_p99_ms"]
        assert report["highest_sustained_rate"][system] == (6 if row["sustained"] else None)
    merged = tmp_path / "merged.json"
    assert serving.main(["--combine", str(out), str(out), "--out", str(merged)]) == 0
    assert [len(rows) for rows in json.loads(merged.read_text())["systems"].values()] == [2, 2]
