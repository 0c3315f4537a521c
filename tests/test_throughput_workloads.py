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
    (["--systems", "bogus"], "unknown system 'bogus'"),
    (["--systems", "zipage-2048,zipage-abc"], "the budget 'abc'"),
    (["--systems", "zipage-64-fp8-int8"], "fp8 with int8"),
    (["--systems", "zipage-64-fp8-tail"], "'tail'"),
    (["--systems", "zipage-64-fp8-tail0"], "'tail0'"),
    (["--systems", "zipage-64-tail4"], "with -fp8 or -int8"),
    (["--systems", "zipage-64-fp8-tail4-tail8"], "one -tail<N> at most"),
    (["--page-size", "3"], "--page-size 3"),
    (["--kv-gib", "0"], "--kv-gib 0"),
    (["--max-num-seqs", "0"], "--max-num-seqs 0"),
])
def test_bad_workload_options_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        tp.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_system_names_give_the_engine_options():
    tp.check_system("zipage-64-fp8-tail16")
    assert tp.system_options("zipage-64-fp8-tail16", "auto") == (
        64, dict(kv_cache_dtype="fp8", async_scheduling=True, exact_tail=16))
    assert tp.system_options("zipage-fullkv-sync", "int8") == (
        None, dict(kv_cache_dtype="int8", async_scheduling=False))


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
    # the decode steps' median concurrency beside the floors (no bandwidth or matrix rate measured on the CPU)
    assert 1 <= res["median_decode_running"] <= 3 and math.isnan(res["decode_compute_floor_ms"])
    assert "cfloor" in tp.table({"systems": {"zipage": res}})


def test_compute_floor_adds_the_products_beyond_reading_the_weights():
    """The decode floor with the linear layers' arithmetic: below the rate's crossover the byte floor stands; above
    it the products' time replaces the weights' reading time. Qwen3-8B's FP8 run of the benchmarks page (489
    requests, byte floor 18.4 ms) at 4,250 GB/s and 790 TFLOP/s: 23.9 ms, not 18.4."""
    flops, linear = 2 * 7.57e9, 2 * 7.57e9  # Qwen3-8B's linear layers: 7.57e9 bf16 weights
    assert tp.compute_floor_ms(18.4, 100, flops, linear, 4250, 790) == 18.4  # reading the weights takes longer
    got = tp.compute_floor_ms(18.4, 489, flops, linear, 4250, 790)
    assert got == pytest.approx(18.4 + 489 * flops / 790e12 * 1e3 - linear / 4250e9 * 1e3)
    assert 23.5 < got < 24.3
    assert math.isnan(tp.compute_floor_ms(math.nan, 4, flops, linear, math.nan, math.nan))


def test_linear_weights_count_each_weight_once():
    """Multiply-adds per token and bytes of the linear layers: every nn.Linear weight once (a head tied to the
    embedding is the embedding's weight, counted once as the head's)."""
    import torch

    model = tiny_model("qwen3")
    linears = {id(m.weight): m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)}
    n = sum(w.numel() for w in linears.values())
    assert n > 0
    assert tp.linear_weights(model) == (2 * n, n * next(iter(linears.values())).element_size())
    layer = model.model.layers[0]
    parts = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
             layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
    per_layer = sum(m.weight.numel() for m in parts)
    assert n == per_layer * len(model.model.layers) + model.lm_head.weight.numel()


def test_fp8_page_compares_decode_steps_as_well_as_tok_s(tmp_path):
    """The benchmarks page's 8-bit table: tok/s over the run, and the decode steps alone (requests running over
    the median step), against the bf16 run beside it; runs before the compute floor was recorded leave it blank."""
    import json

    from zipage.bench.fp8_report import _engine_table

    def system(tok_s, running, step, cfloor=None):
        r = dict(tokens_per_s=tok_s, mean_running=running, mean_output_tokens=1000, median_decode_step_ms=step,
                 decode_floor_ms=10.0, step_over_floor=step / 10.0)
        if cfloor:
            r.update(median_decode_running=running, decode_compute_floor_ms=cfloor,
                     step_over_compute_floor=step / cfloor)
        return r

    new = tmp_path / "throughput_new.json"
    new.write_text(json.dumps(dict(command="x --time-limit 100", systems={
        "zipage-2048": system(1000.0, 250, 25.0, 20.0), "zipage-2048-fp8": system(1300.0, 500, 40.0, 25.0),
        "zipage-2048-fp8-tail32": system(1250.0, 500, 41.0, 25.0)})))
    old = tmp_path / "throughput_old.json"
    old.write_text(json.dumps(dict(command="x", systems={
        "zipage-2048": system(1000.0, 250, 25.0), "zipage-2048-fp8": system(1200.0, 500, 40.0)})))
    rows = {line.split(" | ")[1]: line for line in _engine_table([new]) if "throughput_new" in line}
    fp8 = rows["zipage-2048-fp8"].rstrip(" |").split(" | ")
    assert fp8[-2:] == ["1.30x", f"{(500 / 40.0) / (250 / 25.0):.2f}x"]  # 1.25x per decode step
    assert fp8[-4:-2] == ["25.0", "1.60"]  # 40 ms against a floor of 25 with the products
    assert rows["zipage-2048-fp8-tail32"].rstrip(" |").split(" | ")[-2] == "1.25x"  # (exact-tail systems too)
    old_fp8 = [line for line in _engine_table([old]) if "zipage-2048-fp8" in line][0].rstrip(" |").split(" | ")
    assert old_fp8[-3:] == ["", "", "1.20x"]  # (no floor with the products, no decode ratio: the last cell empty)
