"""benchmarks/throughput.py's long-prompt workload: its options, its prompts, and time to first
token measured by an engine run (a tiny model on the CPU)."""

from __future__ import annotations

import math

import pytest
from conftest import tiny_model

import zipage.bench.throughput as tp


def test_prompt_len_parsing():
    assert tp.parse_prompt_len(None) == (8192, 32768)
    assert tp.parse_prompt_len("100,300") == (100, 300)
    assert tp.parse_prompt_len("512") == (512, 512)
    for bad in ("x", "300,100", "0,5", "1,2,3"):
        with pytest.raises(ValueError, match="--prompt-len"):
            tp.parse_prompt_len(bad)


@pytest.mark.parametrize("argv, message", [
    (["--prompt-len", "100,50", "--workload", "long-prompt"], "--prompt-len"),
    (["--prompt-len", "100"], "for --workload long-prompt"),
    (["--workload", "long-prompt", "--dataset", "gsm8k"], "drop --dataset"),
    (["--workload", "short"], "invalid choice"),
])
def test_bad_workload_options_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        tp.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_long_prompts_lengths_and_ids():
    prompts = tp.long_prompts(20, 1000, (50, 60), seed=1)
    assert len(prompts) == 20 and all(50 <= len(p) <= 60 for p in prompts)
    assert len({len(p) for p in prompts}) > 3  # lengths are drawn, not fixed
    assert all(100 <= t < 900 for p in prompts for t in p)
    assert prompts == tp.long_prompts(20, 1000, (50, 60), seed=1)


def test_ttft_stats():
    stats = tp.ttft_stats([0.4, 0.1, 0.3, 0.2] + [1.0] * 96)
    assert stats["ttft_count"] == 100 and stats["ttft_p50_s"] == 1.0 and stats["ttft_p99_s"] == 1.0
    assert math.isclose(stats["ttft_mean_s"], (1.0 + 96) / 100)
    stats = tp.ttft_stats([3.0, 1.0, 2.0])
    assert (stats["ttft_p50_s"], stats["ttft_p99_s"]) == (2.0, 3.0)
    assert math.isnan(tp.ttft_stats([])["ttft_mean_s"])


@pytest.mark.parametrize("budget", [None, 32])
def test_engine_run_reports_time_to_first_token(budget):
    model = tiny_model("llama")
    work = tp.Workload(tp.long_prompts(6, 96, (40, 70), seed=2), max_tokens=5)
    res = tp.run_engine(model, work, budget, math.nan, kv_gib=0.01, page_size=8, max_num_seqs=3)
    assert res["output_tokens"] == 30 and res["ttft_count"] == 6
    # at most 3 run at once: the later requests wait for a slot, so their first token comes later
    assert 0 < res["ttft_p50_s"] < res["ttft_p99_s"] <= res["wall_s"]
    assert res["ttft_mean_s"] <= res["ttft_p99_s"]
    assert "ttft s" in tp.table({"systems": {"zipage": res}})
