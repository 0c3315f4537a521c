"""What the benchmark scripts measure and count (benchmarks/throughput.py, prefill_tune.py, kernel_bench.py,
engine_run.py, generate_report.py): warm-ups that leave the timed prompts uncached, decode steps told apart by
what they scheduled, the bytes a decode step reads, time to first token of every request, and correctness checks
that a wrong row fails. Tiny models on the CPU."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import load_bench, tiny_model

import zipage.bench.throughput as tp


def _untied():
    return tiny_model("qwen3", tie_word_embeddings=False)


def test_decode_bytes_leave_out_an_untied_embedding_table():
    """A decode step reads the rows of its tokens from an untied input embedding, not the table; a tied table is
    the output layer, read whole."""
    model = _untied()
    emb = model.get_input_embeddings().weight
    row = emb.shape[1] * emb.element_size()
    assert tp.decode_weight_bytes(model, 3) == tp.weight_bytes(model) - emb.numel() * emb.element_size() + 3 * row
    tied = tiny_model("qwen3", tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.get_input_embeddings().weight
    assert tp.decode_weight_bytes(tied, 3) == tp.weight_bytes(tied) + 3 * row


def test_engine_floor_counts_what_a_decode_step_reads():
    """The floor of the run's median decode step (at 1 GB/s here): weights read (an untied table's rows only)
    and the stored KV of the requests that step decoded."""
    model = _untied()
    work = tp.Workload(tp.long_prompts(4, 96, (20, 30), seed=3), max_tokens=6)
    res = tp.run_engine(model, work, None, 1.0, kv_gib=0.01, page_size=8, max_num_seqs=4)
    n, stored = res["median_decode_running"], res["median_decode_kv_tokens"]
    want = (tp.decode_weight_bytes(model, n) + stored * tp.kv_bytes_per_token(model)) / 1e9 * 1000
    assert res["decode_floor_ms"] == pytest.approx(want)
    whole = (tp.weight_bytes(model) + stored * tp.kv_bytes_per_token(model)) / 1e9 * 1000
    assert res["decode_floor_ms"] < whole  # (the table left out)
    assert res["exact_tail_bytes_per_request"] == 0 and res["decode_steps"] > 0
    assert res["median_step_over_floor"] > 0


def test_exact_tail_ring_bytes_per_request():
    class Runner:
        exact_tail = 4
        exact_k = torch.zeros(3, (5 + 1) * 4, 1, 2, 16, dtype=torch.bfloat16)

    assert tp.exact_tail_bytes_per_request(Runner()) == 2 * 3 * 4 * 2 * 16 * 2
    Runner.exact_k = None
    assert tp.exact_tail_bytes_per_request(Runner()) == 0


def test_decode_steps_are_the_steps_that_scheduled_no_prompt_tokens():
    """A step after which every running request is out of prefill may still have run a last prefill chunk: it is
    no decode step; with asynchronous scheduling neither is the step after one (its time ends with that step's
    tokens)."""
    log = [(50.0, 40, 0, 0), (30.0, 8, 2, 20), (10.0, 0, 3, 40), (11.0, 0, 3, 43), (12.0, 0, 0, 0)]
    assert tp.decode_steps(log, async_scheduling=False) == [(10.0, 3, 40), (11.0, 3, 43)]
    assert tp.decode_steps(log, async_scheduling=True) == [(11.0, 3, 43)]


def test_engine_decode_steps_carry_no_prefill():
    """Chunked prompts (8 tokens a step) of requests admitted over the run: every step counted as a decode step
    scheduled no prompt token, including the steps that ran a request's last chunk."""
    model = tiny_model("llama")
    work = tp.Workload(tp.long_prompts(6, 96, (20, 40), seed=4), max_tokens=6)
    seen = []
    real = tp.decode_steps

    def spy(log, async_scheduling):
        seen.append(list(log))
        return real(log, async_scheduling)

    try:
        tp.decode_steps = spy
        res = tp.run_engine(model, work, None, math.nan, kv_gib=0.01, page_size=8, max_num_seqs=3,
                            max_num_batched_tokens=16, async_scheduling=False)
    finally:
        tp.decode_steps = real
    (log,) = seen
    assert any(p and n for _, p, n, _ in log)  # steps mixing a chunk with decoded requests
    assert res["decode_steps"] == sum(1 for _, p, n, _ in log if not p and n) > 0
    assert res["steps"] == len(log)


def test_warmup_leaves_no_page_of_the_timed_prompts_in_the_cache():
    """The warm-up prompts share no page with the timed ones (the warm-up on the first two prompts themselves
    put their pages in the prefix cache: the timed run found them there)."""
    prompts = tp.long_prompts(4, 96, (40, 60), seed=5)
    warm = tp.warmup_prompts(prompts, chunk_tokens=32)
    assert warm[:2] == [prompts[0][::-1], prompts[1][::-1]]
    assert len(warm) == 3 and len(warm[2]) == 33  # a two-chunk prefill: the longest prompt exceeds a step
    assert tp.warmup_prompts(prompts, chunk_tokens=64) == warm[:2]
    model = tiny_model("llama")
    res = tp.run_engine(model, tp.Workload(prompts, max_tokens=4), None, math.nan, kv_gib=0.01, page_size=8,
                        max_num_seqs=4, warmup=True)
    assert res["prefix_cache_hits"] == 0 and res["output_tokens"] == 16


def test_time_to_first_token_of_one_token_outputs_and_of_a_cut_run():
    """Every request's first token counts, also one that ends it (it has left the running list by then); a run
    cut by its time limit says how many requests had none."""
    model = tiny_model("llama")
    work = tp.Workload(tp.long_prompts(6, 96, (20, 30), seed=6), max_tokens=1)
    res = tp.run_engine(model, work, None, math.nan, kv_gib=0.01, page_size=8, max_num_seqs=3)
    assert res["ttft_count"] == 6 and res["ttft_missing"] == 0
    assert res["ttft_max_s"] >= res["ttft_p99_s"] >= res["ttft_p50_s"] > 0
    work = tp.Workload(tp.long_prompts(6, 96, (20, 30), seed=6), max_tokens=50)
    res = tp.run_engine(model, work, None, math.nan, kv_gib=0.01, page_size=8, max_num_seqs=3, time_limit=0)
    assert res["truncated"] and res["ttft_missing"] >= 3 and res["ttft_count"] + res["ttft_missing"] == 6
    line = tp.table({"systems": {"zipage": res}}).splitlines()[1]
    assert line.endswith(f"{res['ttft_count']}+{res['ttft_missing']}")


def test_ttft_stats_report_the_max_beside_the_nearest_rank_p99():
    stats = tp.ttft_stats([3.0, 1.0, 2.0], missing=2)
    assert (stats["ttft_p99_s"], stats["ttft_max_s"], stats["ttft_missing"]) == (3.0, 3.0, 2)
    assert tp.ttft_stats([])["ttft_missing"] == 0


def _masking_bug():
    """Causal attention of 1024 queries and a wrong copy of it whose last 16 query rows ignore the last 64 keys
    (a kernel's wrong tile): the whole output's relative error stays near 1e-2."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 1024, 32) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    mask = torch.ones(1024, 1024, dtype=torch.bool).tril()
    mask[-16:, -64:] = False
    bad = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return bad[0].transpose(0, 1), ref[0].transpose(0, 1)  # [T, H, D] as the kernels give them


def test_prefill_check_fails_a_wrong_tile_of_rows():
    pt = load_bench("prefill_tune")
    bad, ref = _masking_bug()
    rel, _ = pt.rel_err(bad, ref)
    assert rel < 2e-2  # the whole output's error alone passes it
    ok, err = pt.agrees(bad, ref)
    assert not ok and err["row_rel_err"] > pt.ROW_TOL
    assert pt.agrees(ref + 1e-4 * torch.randn_like(ref), ref)[0]


def test_kernels_check_fails_a_wrong_tile_of_rows():
    kb = load_bench("kernel_bench")
    bad, ref = _masking_bug()
    got = kb.check(bad, ref)
    assert got["rel_err"] < kb.REL_TOL and not got["ok"]
    assert kb.check(ref, ref)["ok"]


def test_kernels_weights_floor_leaves_out_the_embedding_table():
    """Qwen3-8B: 16.38e9 bytes of bf16 parameters, of which a step of 128 reads 15.14e9 (the untied 1.245e9-byte
    embedding table but its 128 rows); the 16.4e9 constant counted the table whole."""
    kb = load_bench("kernel_bench")
    got = kb.decode_weight_bytes_qwen3_8b(128)
    embed = 151936 * 4096 * 2
    assert got == pytest.approx(16.38e9 - embed + 128 * 4096 * 2, rel=1e-3)
    assert got == pytest.approx(15.14e9, rel=1e-3)


def test_prefill_ragged_baseline_has_a_padded_batch():
    """Ragged whole prompts: the baseline padded to the longest (one SDPA call, causal and padding mask) gives the
    per-length baseline's outputs; equal lengths and chunked steps have none."""
    pt = load_bench("prefill_tune")
    pt.smoke_setup()
    step = pt.Step([12, 20, 17, 20], [12, 20, 17, 20])
    ref = step.packed(step.baseline())
    padded = step.baseline("padded")
    assert isinstance(padded, torch.Tensor) and padded.shape[0] == 4  # one call over the batch
    assert pt.agrees(step.packed(padded), ref)[0]
    assert pt.Step([16, 16], [16, 16]).padded_inputs is None
    assert pt.Step([24, 16], [12, 1]).padded_inputs is None


def test_prefill_table_and_report_use_the_fastest_baseline(tmp_path):
    pt = load_bench("prefill_tune")
    kernel = dict(ms=2.0, ratio=2.0, ratio_best=1.5, ok=True)
    rows = [dict(case="c", baseline_ms=4.0, best_baseline_ms=3.0, gather_ms=0.1, kernels={"m64": kernel})]
    table = pt.table(rows)
    assert "1.50x" in table and "2.00x" not in table
    pr = load_bench("prefill_report")
    run = tmp_path / "results" / pr.TORCH_RUN
    run.parent.mkdir(parents=True)
    run.write_text(json.dumps(dict(rows=[dict(case="c", kernels={"sdpa-fresh": kernel, "m64n64w4s3-tma": kernel})])))
    lines = pr.torch_rows(tmp_path / "results")
    assert any("1.50x (2.000 ms)" in line for line in lines) and not any("2.00x" in line for line in lines)


def test_generate_report_command_follows_the_recorded_settings(tmp_path):
    """A results file without a stored command shows one built from its settings (5 repeats, not the CPU's
    default 2)."""
    gr = load_bench("generate_report")
    meta = dict(device="cpu", threads=1, repeats=5, label="after")
    assert gr.command(meta, "cpu", tmp_path / "generate_speed_cpu.json") == (
        "python benchmarks/generate_speed.py cpu --repeats 5 --label after")
    assert gr.command(dict(meta, repeats=2, label=""), "cpu", tmp_path / "generate_speed_cpu.json") == (
        "python benchmarks/generate_speed.py cpu")
    assert gr.command(dict(meta, repeats=1), "gpu_b1", tmp_path / "generate_speed_gpu_b1.json").endswith(
        "gpu --label after --out benchmarks/results/generate_speed_gpu_b1.json")
    assert gr.command(dict(meta, command="python x"), "cpu", tmp_path / "a.json") == "python x"


def test_engine_run_workload_and_warmup_prompts():
    """The shared prefix is whole pages only above the page size (128 tokens: none at 256-token pages); the
    warm-up's prompts (the first two reversed) share no page with the timed ones."""
    er = load_bench("engine_run")
    prompts = er.workload(8, 5000)
    assert prompts[0][:128] == prompts[4][:128] and prompts[0][:129] != prompts[4][:129]
    longer = er.workload(8, 5000, shared_prefix=300)
    assert longer[0][:300] == longer[4][:300] and min(len(longer[0]), len(longer[4])) >= 300
    model = tiny_model("llama")
    import zipage

    llm = zipage.LLM(model, budget=None, page_size=8, num_pages=200, max_num_seqs=4)
    prompts = tp.long_prompts(4, 96, (30, 40), seed=7)
    er.warmup(llm, prompts, max_tokens=4, budget=None)
    hits = llm.stats()["prefix_cache_hits"]
    llm.generate(prompts[:2], zipage.SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert llm.stats()["prefix_cache_hits"] == hits  # (the warm-up left none of their pages cached)


def test_bench_json_is_strict_and_its_table_marks_what_was_not_measured():
    """A CPU has no copy bandwidth or floors (NaN): the JSON holds null (JSON has no NaN), the table a dash; a
    CPU's tokens/s keep a decimal (0.5 and 1.4 tok/s printed 0 and 1)."""
    summary = {"copy_bandwidth_gbps": math.nan, "systems": {
        "zipage-32": dict(requests=2, max_tokens=8, mean_output_tokens=8.0, tokens_per_s=0.49, peak_gib=math.nan,
                          mean_running=2.0, max_running=2, preemptions=0),
        "hf-generate_batch": dict(requests=2, max_tokens=8, tokens_per_s=1234.5, peak_gib=math.nan)}}
    text = json.dumps(tp.finite(summary), allow_nan=False)
    assert json.loads(text)["copy_bandwidth_gbps"] is None
    assert json.loads(text)["systems"]["zipage-32"]["peak_gib"] is None
    rows = tp.table(summary).splitlines()
    assert rows[1].split()[:6] == ["zipage-32", "2x8", "8", "0.5", "-", "2.0"]
    assert rows[2].split()[:7] == ["hf-generate_batch", "2x8", "8", "1234", "-", "-", "-"]
