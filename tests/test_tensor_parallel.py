"""Tensor parallelism on the CPU: two gloo ranks against one process, on a float32 tiny model.

The row-parallel projections sum two partial products where one process computes one, so logits
differ in the last bits (float32 sums in another order). Tokens are compared exactly anyway: the
tiny model's weights are scaled up (``tiny_model``'s ``scale``), so the best token leads by far more
than that rounding, and the log-probabilities are compared with a tolerance. One two-rank engine
(and its one-process twin) serve the tests of this file, in order: the last one kills a rank.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from conftest import tiny_model
from test_engine import prompts_of

from zipage import LLM, SamplingParams
from zipage.engine import parallel
from zipage.engine.parallel import TensorParallelError

# asynchronous compression: its bookkeeping (requests sitting out until their compression lands) on a CPU
SETTINGS = dict(budget=16, page_size=8, buffer=8, window=4, num_pages=64, max_num_seqs=4,
                enable_prefix_caching=True, async_compression=True)


@pytest.fixture(scope="module")
def engines():
    one = LLM(tiny_model("qwen3"), **SETTINGS)
    two = LLM(tiny_model("qwen3"), tensor_parallel_size=2, **SETTINGS)
    yield one, two
    two.close()


def _delta(llm: LLM, before: dict, key: str) -> int:
    return llm.stats()[key] - before[key]


def test_greedy_tokens_match_one_process_with_compressions_and_prefix_caching(engines):
    shared = prompts_of((20,), seed=7)[0]
    prompts = prompts_of((30,), seed=2) + prompts_of((9, 14, 3, 6, 11), seed=1, prefix=shared)  # 6 > max_num_seqs
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=3)
    outs = {}
    for llm in engines:
        before = llm.stats()
        outs[llm] = llm.generate(prompts, params, use_tqdm=False)
        outs[llm, "compressions"] = _delta(llm, before, "compressions")
        outs[llm, "hits"] = _delta(llm, before, "prefix_cache_hits")
        stats = llm.stats()
        assert stats["free_pages"] == stats["total_pages"]  # every page back in the (one) pool
    one, two = engines
    assert [o.token_ids for o in outs[one]] == [o.token_ids for o in outs[two]]
    assert outs[one, "compressions"] == outs[two, "compressions"] > 0
    assert outs[one, "hits"] == outs[two, "hits"] > 0
    for a, b in zip(outs[one], outs[two]):
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
            assert [t for t, _ in x.top] == [t for t, _ in y.top]
            assert [p for _, p in x.top] == pytest.approx([p for _, p in y.top], abs=1e-4)


def test_seeded_sampling_matches_one_process(engines):
    prompts = prompts_of((11, 25), seed=3)
    params = [SamplingParams(max_tokens=36, temperature=1.0, top_p=0.9, seed=5, n=2, ignore_eos=True),
              SamplingParams(max_tokens=30, temperature=0.7, top_k=20, seed=9, ignore_eos=True)]
    one, two = (llm.generate(prompts, params, use_tqdm=False) for llm in engines)
    assert [[c.token_ids for c in o.outputs] for o in one] == [[c.token_ids for c in o.outputs] for o in two]
    assert one[0].outputs[0].token_ids != one[0].outputs[1].token_ids  # (really sampled)


def _run_with_cancel(llm: LLM, prompts: list[list[int]]) -> dict[str, list[int]]:
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    ids = [llm.add_request(p, params, request_id=f"c{i}") for i, p in enumerate(prompts)]
    steps = 0
    while llm.has_unfinished():
        llm.step()
        steps += 1
        if steps == 6:
            llm.cancel("c1")
    outs = {rid: llm.output(rid) for rid in ids}
    for rid in ids:
        llm.forget(rid)
    assert outs["c1"].finish_reason == "cancelled"
    assert all(outs[rid].finish_reason == "length" for rid in ids if rid != "c1")
    return {rid: o.token_ids for rid, o in outs.items()}


def test_cancellations_match_one_process_and_free_every_page(engines):
    prompts = prompts_of((13, 22, 31), seed=4)
    one, two = (_run_with_cancel(llm, prompts) for llm in engines)
    assert one == two
    for llm in engines:
        stats = llm.stats()
        assert stats["free_pages"] == stats["total_pages"] and stats["running"] == stats["waiting"] == 0


def test_kept_positions_gather_every_rank_heads(engines):
    """Each rank compresses its own KV head: together they keep exactly what one process keeps."""
    prompt = prompts_of((26,), seed=5)[0]
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    for llm in engines:
        llm.add_request(prompt, params, request_id="k")
    while not all(llm.requests["k"].compressions >= 2 for llm in engines):
        for llm in engines:
            llm.step()
    one, two = engines
    for layer in range(one.model.config.num_hidden_layers):
        a, b = one.kept_positions("k", layer), two.kept_positions("k", layer)
        assert a.shape == b.shape == (2, one.requests["k"].stored)
        assert torch.equal(a, b)
        assert not torch.equal(a[0], a[1])  # the two heads (one per rank) kept different tokens
    for llm in engines:
        llm.cancel("k")
        llm.forget("k")


def test_budgets_of_their_own_match_one_process_and_their_maps_go(engines):
    """Requests with budgets of their own keep positions in maps of their own on every rank; those go with the
    requests (rank 0 tells the others), and the ranks stay in step for the requests after them."""
    prompts = prompts_of((26, 20, 31), seed=9)
    params = [SamplingParams(max_tokens=36, temperature=0, ignore_eos=True, budget=b) for b in (24, 32, None)]
    outs = [llm.generate(prompts, params, use_tqdm=False) for llm in engines]
    assert [o.token_ids for o in outs[0]] == [o.token_ids for o in outs[1]]
    for llm in engines:
        assert llm.runner.kept.own == {}
    again = [llm.generate(prompts[:1], params[:1], use_tqdm=False)[0].token_ids for llm in engines]
    assert again[0] == again[1] == outs[0][0].token_ids


def test_a_rank_that_fails_stops_the_engine(engines):
    """A rank that raises mid-step reports its traceback; rank 0 stops at once (no hang) and refuses
    every later step. (This kills the module's two-rank engine: it runs last.)"""
    _, two = engines
    worker = two.ranks.procs[0]
    two.ranks.send(("no such message",))  # rank 1 raises on it, while rank 0 goes into the next step
    with pytest.raises(TensorParallelError, match=r"(?s)rank 1 exited \(code 1\).*unknown message"):
        two.generate([prompts_of((12,), seed=6)[0]], SamplingParams(max_tokens=8), use_tqdm=False)
    worker.join(timeout=30)
    assert worker.exitcode == 1
    with pytest.raises(TensorParallelError, match="rank 1 exited"):
        two.generate([[5, 6, 7]], SamplingParams(max_tokens=4), use_tqdm=False)


@pytest.mark.parametrize("kv_rotation", [None, True])
def test_full_kv_fp8_two_ranks_then_close_stops_every_rank(kv_rotation):
    """FP8 pages scale per token and KV head, so each rank quantizes its heads as one process does (stored
    rotated on every rank with ``kv_rotation=True``, which a full-KV engine takes without a ZipageConfig)."""
    prompts = prompts_of((10, 19), seed=8)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=0)
    kw = dict(budget=None, page_size=8, num_pages=32, max_num_seqs=2, kv_cache_dtype="fp8", kv_rotation=kv_rotation)
    ref = LLM(tiny_model("llama"), **kw)
    want = ref.generate(prompts, params, use_tqdm=False)
    with LLM(tiny_model("llama"), tensor_parallel_size=2, **kw) as two:
        got = two.generate(prompts, params, use_tqdm=False)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        for a, b in zip(got, want):
            assert [x.logprob for x in a.logprobs] == pytest.approx([y.logprob for y in b.logprobs], abs=1e-4)
        worker = two.ranks.procs[0]
    assert worker.exitcode == 0  # a clean stop, not a kill
    with pytest.raises(TensorParallelError, match="closed"):
        two.generate(prompts, params, use_tqdm=False)


def test_exact_tails_on_two_ranks_match_one_process():
    """FP8 pages with exact tails, compressions and prefix-cache hits: each rank keeps its heads' ring of exact
    keys and values, and reads it from where the sequence's slot began (``ring_from``, sent with each step)."""
    shared = prompts_of((13,), seed=7)[0]
    prompts = prompts_of((9, 14, 3), seed=1, prefix=shared)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, logprobs=0)
    kw = dict(budget=16, page_size=4, buffer=4, window=6, num_pages=64, max_num_seqs=1, kv_cache_dtype="fp8",
              exact_tail=5)
    ref = LLM(tiny_model("qwen3"), **kw)
    want = ref.generate(prompts, params, use_tqdm=False)
    assert ref.stats()["prefix_cache_hits"] > 0 and ref.stats()["compressions"] > 0
    with LLM(tiny_model("qwen3"), tensor_parallel_size=2, **kw) as two:
        got = two.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for a, b in zip(got, want):
        assert [x.logprob for x in a.logprobs] == pytest.approx([y.logprob for y in b.logprobs], abs=1e-4)


TORCHRUN_SCRIPT = """
    import os
    from conftest import tiny_model
    from test_engine import prompts_of
    from zipage import LLM, SamplingParams

    kw = dict(budget=None, page_size=8, num_pages=32, max_num_seqs=2)
    llm = LLM(tiny_model("mistral"), tensor_parallel_size=2, **kw)  # rank 1 serves inside this call, then exits
    assert os.environ["RANK"] == "0"
    prompts, params = prompts_of((9, 21), seed=10), SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    two = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    llm.close()
    one = [o.token_ids for o in LLM(tiny_model("mistral"), **kw).generate(prompts, params, use_tqdm=False)]
    print("SAME TOKENS" if one == two else f"DIFFERENT {one} {two}")
"""


def test_under_torchrun_every_rank_builds_the_engine(tmp_path):
    """``torchrun --nproc-per-node 2 script.py``: rank 0 drives, rank 1's LLM(...) serves until it closes."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(TORCHRUN_SCRIPT))
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "SAME TOKENS" in run.stdout

def test_the_random_scorer_keeps_what_one_process_keeps():
    """Each rank draws every head's numbers and keeps its own heads' (each drew its heads from the start of the
    stream: rank 1's heads kept what rank 0's did)."""
    kw = dict(SETTINGS, scorer="random")
    prompt = prompts_of((30,), seed=4)[0]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    kept = []
    for size in (1, 2):
        with LLM(tiny_model("qwen3"), tensor_parallel_size=size, **kw) as llm:
            llm.add_request(prompt, params, request_id="r")
            while llm.stats()["compressions"] < 2:
                llm.step()
            kept.append([llm.kept_positions("r", layer) for layer in range(2)])
            while llm.has_unfinished():
                llm.step()
    for one, two in zip(*kept):
        assert torch.equal(one, two)
    assert not torch.equal(kept[0][0][0], kept[0][0][1])  # (heads keep different positions: a random choice each)


@pytest.mark.parametrize("then", ["generate", "close"])
def test_a_stuck_rank_stops_the_engine_within_the_timeout(then):
    """A rank that is stuck (alive, its sockets open: here stopped by SIGSTOP between steps) never takes rank 0's
    next message: rank 0 gives up after ``tensor_parallel_timeout`` and kills it, for a step as for ``close()``
    (rank 0, its close and the interpreter's exit waited on it forever)."""
    import signal
    import time

    llm = LLM(tiny_model("qwen3"), tensor_parallel_size=2, tensor_parallel_timeout=3, **SETTINGS)
    worker = llm.ranks.procs[0]
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4), use_tqdm=False)
    os.kill(worker.pid, signal.SIGSTOP)
    start = time.monotonic()
    try:
        if then == "generate":
            with pytest.raises(TensorParallelError, match="did not take part within 3 s"):
                llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4), use_tqdm=False)
        llm.close()
    finally:
        if worker.exitcode is None:
            os.kill(worker.pid, signal.SIGKILL)
    assert time.monotonic() - start < 30
    worker.join(timeout=10)
    assert worker.exitcode is not None
    with pytest.raises(TensorParallelError):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4), use_tqdm=False)


# ------------------------------------------------------------------------------------ bad sizes
@pytest.mark.parametrize("size", [0, -2, True, 2.0])
def test_invalid_sizes_are_refused(size):
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM(tiny_model("qwen3"), num_pages=8, tensor_parallel_size=size)


def test_an_invalid_timeout_is_refused():
    with pytest.raises(ValueError, match="tensor_parallel_timeout=0 is invalid"):
        LLM(tiny_model("qwen3"), num_pages=8, tensor_parallel_size=2, tensor_parallel_timeout=0)
    with pytest.raises(ValueError, match="tensor_parallel_timeout=inf is invalid"):
        LLM(tiny_model("qwen3"), num_pages=8, tensor_parallel_size=2, tensor_parallel_timeout=float("inf"))


@pytest.mark.parametrize("env,message", [
    ({"WORLD_SIZE": "3", "RANK": "0"}, "tensor_parallel_size=2 but the launcher started 3 processes"),
    ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two'"),
    ({"WORLD_SIZE": "2", "RANK": "x"}, "RANK='x'"),
])
def test_a_launcher_s_environment_that_does_not_fit_is_refused_before_the_rendezvous(monkeypatch, env, message):
    """(the rendezvous would wait for processes that never come, until the timeout)"""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        LLM(tiny_model("qwen3"), num_pages=8, tensor_parallel_size=2)


def test_a_failed_start_leaves_the_process_able_to_start_an_engine(monkeypatch):
    """A launcher's variables without its rendezvous address: the start fails (torch.distributed counted a group
    by then); the next engine of the process starts, its spawned ranks naming their groups as rank 0 does."""
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises((ValueError, RuntimeError), match="MASTER_ADDR"):
        LLM(tiny_model("qwen3"), num_pages=8, tensor_parallel_size=2)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    with LLM(tiny_model("qwen3"), tensor_parallel_size=2, tensor_parallel_timeout=60, **SETTINGS) as two:
        assert two.generate([[5, 6, 7]], SamplingParams(max_tokens=3), use_tqdm=False)[0].token_ids


def test_heads_must_divide_by_the_size():
    with pytest.raises(ValueError, match="does not divide the model's 2 KV heads"):
        LLM(tiny_model("qwen3", num_attention_heads=6, num_key_value_heads=2), num_pages=8, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="tensor_parallel_size=4 does not divide the model's 2 KV heads"):
        LLM(tiny_model("qwen3"), num_pages=8, tensor_parallel_size=4)


def test_a_model_without_a_tensor_parallel_plan_is_refused():
    model = tiny_model("llama")
    model.config.base_model_tp_plan = None
    with pytest.raises(NotImplementedError, match="no tensor-parallel plan"):
        LLM(model, num_pages=8, tensor_parallel_size=2)


def test_a_mixture_of_experts_is_refused_naming_its_experts():
    """transformers 5.25's Qwen3-MoE plan no longer lists its experts: the check does not rest on the plan."""
    cfg = transformers.Qwen3MoeConfig(vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      num_experts=4, num_experts_per_tok=2)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(NotImplementedError, match=r"mixture of experts \(num_experts=4\).*every expert whole"):
        LLM(model, num_pages=8, tensor_parallel_size=2)


def test_more_ranks_than_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="needs 2 GPUs from cuda:0, but only 1 GPU is present"):
        parallel.check_devices(torch.device("cuda", 0), 2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(ValueError, match="needs 4 GPUs from cuda:1, but only 4 GPUs are present"):
        parallel.check_devices(torch.device("cuda", 1), 4)
    parallel.check_devices(torch.device("cuda", 0), 4)


def test_serve_takes_a_tensor_parallel_size():
    from zipage.serve.server import check_args
    from zipage_cli import serve_parser

    assert serve_parser().parse_args(["m"]).tensor_parallel_size == 1
    assert serve_parser().parse_args(["m", "--tensor-parallel-size", "2"]).tensor_parallel_size == 2
    assert "--tensor-parallel-size 0 is invalid" in check_args(serve_parser().parse_args(["m", "-tp", "0"]))


def test_an_expert_count_of_another_name_is_refused_too():
    """Aria names its count moe_num_experts (transformers 5.25's Aria plan lists no experts either)."""
    from zipage.engine.sharding import check_tensor_parallel

    with pytest.raises(NotImplementedError, match=r"mixture of experts \(moe_num_experts=\d+\)"):
        check_tensor_parallel(transformers.AutoConfig.for_model("aria_text"), 2)
