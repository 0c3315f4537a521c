"""Whole prompts through cuDNN's ragged attention (kernels/cudnn_prefill.py) and the engine's use of it: the engine's
routing on a CPU with the dense reference standing in for cuDNN, the kernel itself on a GPU with the frontend."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from conftest import tiny_model
from test_fresh_prefill import mixed_steps, prompts_of

import zipage.engine.runner as runner_mod
from zipage import LLM, SamplingParams
from zipage.kernels import cudnn_prefill
from zipage.kernels.cudnn_prefill import length_bucket, ragged_prefill_reference, ragged_prefill_sdpa
from zipage.kernels.fresh_prefill import fresh_prefill_reference

GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)


def test_length_buckets_are_powers_of_two_from_128():
    assert [length_bucket(n) for n in (1, 128, 129, 1000, 1024, 1025, 32768)] == [128, 128, 256, 1024, 1024, 2048,
                                                                                   32768]
    with pytest.raises(ValueError, match="at least one token"):
        length_bucket(0)


def test_the_reference_attends_each_sequence_where_it_lies_and_nothing_else():
    g = torch.Generator().manual_seed(0)
    lens, gaps = [5, 9, 3], [2, 4, 1]
    T = sum(lens) + sum(gaps) + 2
    q, k, v = (torch.randn(T, h, 8, generator=g) for h in (4, 2, 2))
    starts, a = [], 0
    for n, gap in zip(lens, gaps):
        a += gap
        starts.append(a)
        a += n
    out = torch.full_like(q, 7.0)
    ragged_prefill_reference(q, k, v, starts, lens, 0.4, out=out)
    rows = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lens)])
    packed = [x[rows] for x in (q, k, v)]
    torch.testing.assert_close(out[rows], fresh_prefill_reference(*packed, lens, 0.4))
    others = torch.ones(T, dtype=torch.bool)
    others[rows] = False
    assert (out[others] == 7).all()


@pytest.mark.parametrize("hkv", [2, 4])
def test_the_fallback_attends_each_sequence_as_the_reference(hkv):
    g = torch.Generator().manual_seed(1)
    lens, starts = [5, 0, 9, 3], [1, 6, 8, 20]
    q, k, v = (torch.randn(24, h, 8, generator=g) for h in (4, hkv, hkv))
    out = torch.full_like(q, 7.0)
    ragged_prefill_sdpa(q, k, v, starts, lens, 0.4, out=out)
    ref = ragged_prefill_reference(q, k, v, starts, lens, 0.4, out=torch.full_like(q, 7.0))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)  # (rows of no sequence untouched in both)


def test_the_error_measure_is_each_sequence_s_own():
    """``ragged_error``: a sequence of small outputs zeroed beside one of large outputs is as wrong as any (1.0,
    not hidden by the other's scale); a row outside the sequences written after a NaN fill is infinitely wrong;
    a NaN inside is too."""
    ref = torch.zeros(12, 2, 4)
    ref[0:5] = 100.0 * torch.randn(5, 2, 4, generator=torch.Generator().manual_seed(0))
    ref[6:10] = 0.01
    out = ref.clone()
    out[11] = float("nan")
    starts, lens = [0, 6], [5, 4]
    assert cudnn_prefill.ragged_error(out, ref, starts, lens) == 0.0
    out[6:10] = 0
    assert cudnn_prefill.ragged_error(out, ref, starts, lens) == pytest.approx(1.0)
    out[6:10], out[5], out[10] = ref[6:10], float("nan"), float("nan")
    assert cudnn_prefill.ragged_error(out, ref, starts, lens, untouched=True) == 0.0  # (rows 5, 10, 11 untouched)
    out[10] = 0.0
    assert cudnn_prefill.ragged_error(out, ref, starts, lens, untouched=True) == float("inf")
    out[10], out[7] = float("nan"), float("nan")
    assert cudnn_prefill.ragged_error(out, ref, starts, lens) == float("inf")


class StandIn:
    """cuDNN's ragged attention as the engine calls it, run by the dense reference (checks the call's form);
    a "graph" per (sequences rounded up to a power of two, length bucket), as the real one keys them."""

    calls: list = []

    def __init__(self, device, pad_batch=False, min_bucket=cudnn_prefill.MIN_BUCKET):
        self.device = device
        self.min_bucket = min_bucket
        self.graphs = {}
        StandIn.warmed = []

    def warm(self, hq, hkv, d, dtype):
        StandIn.warmed.append((hq, hkv, d, dtype))

    def __call__(self, q, k, v, starts, lens, max_len, scale, out=None, key=None):
        assert key is None or key == self.key(q, k, v, lens.numel(), max_len, scale, out)
        assert starts.dtype == lens.dtype == torch.int32 and starts.numel() == lens.numel() + 1
        s, n = starts.tolist(), lens.tolist()
        assert max_len == max(n) and all(a + m <= b for a, m, b in zip(s, n, s[1:])) and s[-1] <= q.shape[0]
        for t in (q, k, v) + ((out,) if out is not None else ()):
            assert cudnn_prefill.rows_of_heads(t)
        StandIn.calls.append(n)
        self.graphs.setdefault(self.key(q, k, v, len(n), max_len, scale, out), None)
        return ragged_prefill_reference(q, k, v, s[:-1], n, scale, out=out)

    def key(self, q, k, v, n, max_len, scale, out=None):  # (the output's row stride: None makes a contiguous one)
        row = out.stride(0) if out is not None else q.shape[1] * q.shape[2]
        return 1 << (n - 1).bit_length(), max(self.min_bucket, length_bucket(max_len)), row


class WrongOnce(StandIn):
    """A new graph whose first answer is wrong: the prompts' rows zeroed (``how="zero"``) or the first row outside
    them written (``"spill"``: a decode row's or a chunk's); at the first new graph (``where="first"``) or at the
    first whose step has other rows than the whole prompts' (``"mixed"``: decode rows, chunks)."""

    how, where, done = "zero", "first", False

    def __call__(self, q, k, v, starts, lens, max_len, scale, out=None, key=None):
        new = self.key(q, k, v, lens.numel(), max_len, scale, out) not in self.graphs
        got = super().__call__(q, k, v, starts, lens, max_len, scale, out=out, key=key)
        s, n = starts.tolist(), lens.tolist()
        if new and not WrongOnce.done and (WrongOnce.where == "first" or sum(n) < q.shape[0]):
            WrongOnce.done = True
            inside = torch.zeros(q.shape[0], dtype=torch.bool)
            for a, m in zip(s, n):
                inside[a:a + m] = True
            if WrongOnce.how == "zero":
                got[inside] = 0
            else:
                got[int((~inside).nonzero()[0])] = 0
        return got


def run(monkeypatch, model, prompts, route, **kw):
    monkeypatch.setattr(runner_mod, "fresh_prefill_default", lambda *a: route)
    monkeypatch.setattr(cudnn_prefill, "CudnnPrefill", StandIn)
    llm = LLM(model, page_size=8, num_pages=256, **kw)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    return [o.token_ids for o in outs], llm.runner


@pytest.mark.parametrize("budget", [None, 32])
def test_engine_gives_the_same_tokens_with_whole_prompts_through_the_ragged_route(monkeypatch, budget):
    """Mixed steps (whole prompts of every length, one after a cached prefix, chunks after the first, decode rows):
    the whole prompts go to the ragged call, wherever they lie among the step's rows, and the tokens are the
    paged kernel's."""
    model = tiny_model("qwen3")
    shared = prompts_of((40,), seed=3)[0]
    prompts = prompts_of((37, 128, 5, 90, 128, 200, 60), seed=1) + prompts_of((20, 9), seed=2, prefix=shared)
    kw = mixed_steps(budget)
    StandIn.calls = []
    base, r0 = run(monkeypatch, model, prompts, None, **kw)
    assert not StandIn.calls and r0.fresh_prefill_tokens == 0
    got, r1 = run(monkeypatch, model, prompts, "cudnn", **kw)
    assert got == base
    cfg = model.config  # (cuDNN's first graph built when the engine starts, at the model's heads)
    assert StandIn.warmed == [(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, model.dtype)]
    served = [n for call in StandIn.calls for n in call]
    assert r1.fresh_prefill_tokens >= 37 + 128 + 5 and 37 in served and 5 in served
    assert any(len(call) > 1 for call in StandIn.calls)  # (several prompts of a step in one call)


def run_warned(monkeypatch, model, prompts, stand_in, **kw):
    """The engine through ``stand_in`` for cuDNN's route: the LLM, every request's tokens, and the warnings it
    gave that the route failed."""
    monkeypatch.setattr(runner_mod, "fresh_prefill_default", lambda *a: "cudnn")
    monkeypatch.setattr(cudnn_prefill, "CudnnPrefill", stand_in)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llm = LLM(model, page_size=8, num_pages=256, **kw)
        got = [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    return llm, got, [str(w.message) for w in caught if "cuDNN's ragged attention failed" in str(w.message)]


class Failing(StandIn):
    """cuDNN's route failing: at its warm-up (``fail_at=0``) or at its ``fail_at``-th call in a step."""

    fail_at = 0

    def warm(self, hq, hkv, d, dtype):
        if Failing.fail_at == 0:
            raise RuntimeError("no engine proposed a plan for this graph")

    def __call__(self, *args, **kw):
        if len(StandIn.calls) + 1 >= Failing.fail_at:
            raise RuntimeError("graph execution failed")
        return super().__call__(*args, **kw)


@pytest.mark.parametrize("fail_at", [0, 1, 2, 5])
def test_a_failing_cudnn_route_loses_no_prompt(monkeypatch, fail_at):
    """A graph cuDNN cannot build (at the engine's start) or run: at a step's first layer, at its second (the
    tiny model's last: the step split between cuDNN and the fallback) or in a later step whose whole prompts lie
    among chunks and decode rows. One warning saying why, that step's whole prompts through PyTorch's fused
    attention, later steps the paged kernel's; every request's tokens as the paged kernel's alone."""
    model = tiny_model("qwen3")
    assert model.config.num_hidden_layers == 2
    shared = prompts_of((40,), seed=3)[0]
    prompts = prompts_of((37, 128, 5, 90, 128, 200, 60), seed=1) + prompts_of((20, 9), seed=2, prefix=shared)
    kw = mixed_steps(32)
    base, _ = run(monkeypatch, model, prompts, None, **kw)
    StandIn.calls, Failing.fail_at = [], fail_at
    llm, got, said = run_warned(monkeypatch, model, prompts, Failing, **kw)
    assert len(said) == 1 and ("no engine proposed" if fail_at == 0 else "graph execution failed") in said[0]
    assert got == base
    r = llm.runner
    assert r.fresh_prefill is None and r.cudnn_prefill is None and "RuntimeError" in r.cudnn_error
    assert len(StandIn.calls) == max(fail_at - 1, 0)  # (the calls before the failure, then none)
    if fail_at:
        assert r.fresh_prefill_tokens > 0  # (the failing step's prompts were planned for the route)
    monkeypatch.setenv("ZIPAGE_FRESH_PREFILL", "cudnn")  # asked for: a failing start refuses the LLM, saying why
    Failing.fail_at = 0
    with pytest.raises(RuntimeError, match="ZIPAGE_FRESH_PREFILL=cudnn: cuDNN's ragged attention failed here: "
                       "RuntimeError: no engine proposed"):
        LLM(model, page_size=8, num_pages=256, **kw)


@pytest.mark.parametrize("how, where", [("zero", "first"), ("zero", "mixed"), ("spill", "mixed")])
def test_a_new_graph_s_wrong_answer_is_caught(monkeypatch, how, where):
    """Every new graph's first answer is checked against PyTorch's attention: one whose prompts' rows differ, or
    that writes a row outside them (the first graph of the run, or one in a step with decode rows and chunks,
    whose rows it must leave alone) gives the route up with one warning naming the error, its step's prompts
    are answered by PyTorch's, and every request's tokens are the paged kernel's."""
    model = tiny_model("qwen3")
    shared = prompts_of((40,), seed=3)[0]
    prompts = prompts_of((37, 128, 5, 90, 128, 200, 60), seed=1) + prompts_of((20, 9), seed=2, prefix=shared)
    kw = mixed_steps(None)
    base, _ = run(monkeypatch, model, prompts, None, **kw)
    StandIn.calls, WrongOnce.how, WrongOnce.where, WrongOnce.done = [], how, where, False
    monkeypatch.setattr(runner_mod, "CUDNN_MIN_BUCKET", 128)  # (graphs per length bucket too: one new in step 3)
    llm, got, said = run_warned(monkeypatch, model, prompts, WrongOnce, **kw)
    err = re.search(r"a new graph's answer differs from PyTorch's attention \(error ([\d.e+-]+|inf) of", said[0])
    assert WrongOnce.done and len(said) == 1 and err and float(err.group(1)) > runner_mod.CUDNN_CHECK_TOLERANCE
    assert (err.group(1) == "inf") == (how == "spill")
    assert got == base and llm.runner.cudnn_prefill is None


def test_the_engine_checks_each_new_graph_once(monkeypatch):
    """A graph's first answer is compared with PyTorch's, later calls of the same graph are not."""
    model = tiny_model("qwen3")
    checked = []
    real = cudnn_prefill.ragged_error
    monkeypatch.setattr(cudnn_prefill, "ragged_error", lambda *a, **kw: checked.append(1) or real(*a, **kw))
    _, runner = run(monkeypatch, model, prompts_of((37, 128, 5, 90, 128, 200, 60), seed=1), "cudnn",
                    **mixed_steps(None))
    assert runner.cudnn_prefill is not None and len(checked) == len(runner.cudnn_prefill.graphs) >= 2
    assert len(StandIn.calls) > len(checked)  # (the model's layers after the first: no check)


def test_asking_for_cudnn_where_it_cannot_run_says_why(monkeypatch):
    monkeypatch.setenv("ZIPAGE_FRESH_PREFILL", "cudnn")
    with pytest.raises(RuntimeError, match="cannot run here: it runs on CUDA devices, not cpu"):
        LLM(tiny_model("llama"), budget=None, page_size=8, num_pages=32)
    cuda = torch.device("cuda")  # (the reasons before any CUDA call: no GPU needed)
    assert "16-bit activations, not torch.float32" in cudnn_prefill.unavailable(cuda, torch.float32, 128)
    assert "head dims that are multiples of 8 up to 128, not 256" in cudnn_prefill.unavailable(cuda, torch.bfloat16,
                                                                                                256)
    monkeypatch.setattr(cudnn_prefill, "_module", lambda: None)
    assert 'pip install -e ".[cudnn]"' in cudnn_prefill.unavailable(cuda, torch.bfloat16, 128)
    monkeypatch.setenv("ZIPAGE_FRESH_PREFILL", "0")
    assert runner_mod.fresh_prefill_default(torch.device("cpu"), torch.bfloat16, 128) is None
    assert not cudnn_prefill.available(torch.device("cpu"), torch.bfloat16, 128)


def test_whole_prompts_go_to_cudnn_by_default_only_where_it_can_run(monkeypatch):
    monkeypatch.delenv("ZIPAGE_FRESH_PREFILL", raising=False)
    cuda = torch.device("cuda")
    monkeypatch.setattr(cudnn_prefill, "available", lambda *a: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert runner_mod.fresh_prefill_default(cuda, torch.bfloat16, 128) == "cudnn"
    for kv in ("fp8", "int8"):  # (8-bit pages: the paged kernel reads a prompt's own keys as stored)
        assert runner_mod.fresh_prefill_default(cuda, torch.bfloat16, 128, kv) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))  # (not measured there: asked only)
    assert runner_mod.fresh_prefill_default(cuda, torch.bfloat16, 128) is None
    monkeypatch.setenv("ZIPAGE_FRESH_PREFILL", "cudnn")
    monkeypatch.setattr(cudnn_prefill, "unavailable", lambda *a: None)
    assert runner_mod.fresh_prefill_default(cuda, torch.bfloat16, 128) == "cudnn"
    monkeypatch.delenv("ZIPAGE_FRESH_PREFILL")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setenv("ZIPAGE_FRESH_PREFILL", "0")  # (the paged kernel when asked)
    assert runner_mod.fresh_prefill_default(cuda, torch.bfloat16, 128) is None
    monkeypatch.delenv("ZIPAGE_FRESH_PREFILL")
    monkeypatch.setattr(cudnn_prefill, "available", lambda *a: False)  # (no frontend, a CPU, float32, ...)
    assert runner_mod.fresh_prefill_default(cuda, torch.bfloat16, 128) is None
    with pytest.raises(ValueError, match="min_bucket=1000: expected a power of two >= 128"):
        cudnn_prefill.CudnnPrefill.__init__(object.__new__(cudnn_prefill.CudnnPrefill), cuda, min_bucket=1000)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype, lens, pad, heads, d, min_bucket, autotune", [
    (torch.bfloat16, [300, 1024, 77, 2049], False, (32, 8), 128, 128, False),
    (torch.float16, [300, 1024, 77, 2049], False, (32, 8), 128, 128, False),
    (torch.bfloat16, [300, 1000, 77], True, (32, 8), 128, 2048, False),  # (the engine's: padded, from 2,048)
    (torch.bfloat16, [5, 700, 130], True, (16, 1), 64, 2048, False),  # (one KV head)
    (torch.bfloat16, [900, 33], True, (12, 12), 96, 2048, False),  # (as many KV heads as query heads)
    (torch.bfloat16, [300, 1024, 77, 2049], False, (32, 8), 128, 128, True),  # (every plan timed, the fastest kept)
    (torch.bfloat16, [5, 700, 130], True, (16, 1), 64, 2048, True)])
def test_cudnn_ragged_attention_matches_dense_math(dtype, lens, pad, heads, d, min_bucket, autotune):
    """Sequences with other rows between them and after the last, keys and values as views of one fused
    projection (row strides of their own), NaN rows past the step's rows: each sequence's rows as dense math,
    no other row written; with the batch padded by empty sequences too, and the engine's length buckets."""
    if not cudnn_prefill.available(torch.device("cuda"), dtype, d):
        pytest.skip("needs `pip install nvidia-cudnn-frontend`")
    hq, hkv = heads
    gaps = [0, 50, 3, 200][: len(lens)]
    T = sum(lens) + sum(gaps) + 5
    g = torch.Generator(device="cuda").manual_seed(0)
    fused = torch.full((T + 64, (hq + 2 * hkv) * d), float("nan"), device="cuda", dtype=dtype)
    fused[:T] = torch.randn(T, fused.shape[1], device="cuda", dtype=dtype, generator=g)
    q = fused[:T, : hq * d].view(T, hq, d)
    k = fused[:T, hq * d : (hq + hkv) * d].view(T, hkv, d)
    v = fused[:T, (hq + hkv) * d :].view(T, hkv, d)
    starts, a = [], 0
    for n, gap in zip(lens, gaps):
        a += gap
        starts.append(a)
        a += n
    prefill = cudnn_prefill.CudnnPrefill(torch.device("cuda"), pad_batch=pad, min_bucket=min_bucket,
                                         autotune=autotune)
    out = torch.full_like(q, 7.0)
    s = torch.tensor(starts + [a], dtype=torch.int32, device="cuda")
    prefill(q, k, v, s, torch.tensor(lens, dtype=torch.int32, device="cuda"), max(lens), d**-0.5, out=out)
    ref = ragged_prefill_reference(q, k, v, starts, lens, d**-0.5)
    rows = torch.cat([torch.arange(st, st + n, device="cuda") for st, n in zip(starts, lens)])
    torch.testing.assert_close(out[rows].float(), ref[rows].float(), atol=2e-2, rtol=2e-2)
    others = torch.ones(T, dtype=torch.bool, device="cuda")
    others[rows] = False
    assert (out[others] == 7).all()
    if autotune:  # (each plan timed or the reason it was skipped; the fastest chosen)
        ((key, times),) = prefill.plan_times.items()
        ran = {name: x for name, x in times.items() if isinstance(x, float)}
        assert ran and min(ran.values()) > 0, times
        assert prefill.chosen_plan[key] == min(ran, key=ran.get)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_on_the_gpu_with_whole_prompts_through_cudnn(monkeypatch):
    """bf16 on CUDA, the real frontend: ragged whole prompts of a step in cuDNN's ragged attention (lengths that
    share no bucket, a cached prefix, chunks and decode rows beside them); the first tokens as the paged kernel's
    (the two attentions round differently in bf16, so a near-tie may flip one)."""
    if not cudnn_prefill.available(torch.device("cuda"), torch.bfloat16, 16):
        pytest.skip("needs `pip install nvidia-cudnn-frontend`")
    model = tiny_model("qwen3").to("cuda", torch.bfloat16)
    shared = prompts_of((40,), seed=3)[0]
    prompts = prompts_of((37, 128, 5, 90, 300, 200, 60), seed=1) + prompts_of((20, 9), seed=2, prefix=shared)
    kw = mixed_steps(None)
    outs = {}
    for route in ("0", "cudnn"):
        monkeypatch.setenv("ZIPAGE_FRESH_PREFILL", route)
        llm = LLM(model, page_size=16, num_pages=256, **kw)
        outs[route] = [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
        if route == "cudnn":
            assert llm.runner.fresh_prefill == "cudnn" and llm.runner.fresh_prefill_tokens >= 37 + 128 + 5
    assert sum(a[0] == b[0] for a, b in zip(outs["0"], outs["cudnn"])) >= len(prompts) - 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_check_at_start_passes_and_catches_a_wrong_answer(monkeypatch):
    """``warm``: cuDNN's answer on two sequences with rows between them agrees with PyTorch's; an answer that
    differs (here: every output row zeroed after the call) is refused with the error it measured."""
    if not cudnn_prefill.available(torch.device("cuda"), torch.bfloat16, 128):
        pytest.skip("needs `pip install nvidia-cudnn-frontend`")
    prefill = cudnn_prefill.CudnnPrefill(torch.device("cuda"), pad_batch=True, min_bucket=2048)
    prefill.warm(32, 8, 128, torch.bfloat16)
    assert prefill.graphs and prefill.build_seconds > 0
    real = cudnn_prefill.CudnnPrefill.__call__

    def wrong(self, *args, out=None, **kw):
        return real(self, *args, out=out, **kw).zero_()

    monkeypatch.setattr(cudnn_prefill.CudnnPrefill, "__call__", wrong)
    with pytest.raises(RuntimeError, match="differs from PyTorch's on a check at start"):
        prefill.warm(32, 8, 128, torch.bfloat16)
