"""A step that raises (the model, the sampler, a compression, an interrupt) must leave the engine
consistent: the next steps produce the tokens an undisturbed run produces, or the requests whose
state is lost finish with reason "error"; no page leaks and no request is lost."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_engine import assert_pool_clean as pool_clean

import zipage.compress
import zipage.engine.core as engine_core
import zipage.engine.runner as engine_runner
from zipage import LLM, SamplingParams

PARAMS = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)
SETUPS = {
    # full KV: chunked prefill, a shared prefix (prefix caching), a small pool (preemptions)
    "full": dict(budget=None, page_size=4, num_pages=18, max_num_batched_tokens=12),
    # compressions every few tokens, booked at once or (CPU stand-in for the side stream) one step later
    "compress": dict(budget=8, page_size=4, buffer=4, window=2, num_pages=64, max_num_batched_tokens=16),
    "async_compress": dict(budget=8, page_size=4, buffer=4, window=2, num_pages=64, max_num_batched_tokens=16,
                           async_compression=True),
}


class Injected(Exception):
    pass


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen3")


def prompts_of(lengths, seed=0, prefix=()):
    g = torch.Generator().manual_seed(seed)
    return [list(prefix) + torch.randint(3, 96, (n,), generator=g).tolist() for n in lengths]


PROMPTS = prompts_of((9, 21, 5), seed=3, prefix=prompts_of((8,), seed=9)[0])


def assert_pool_clean(llm):
    pool_clean(llm)
    assert not llm.has_unfinished() and llm.core.inflight is None


class Faults:
    """Raise ``exc`` from the model forward / the sampler on chosen attempts (``attempt`` is set by the
    driver: one per ``step()`` call, failed ones included)."""

    def __init__(self, llm, monkeypatch, forward=(), sample=(), sampled=(), exc=Injected):
        self.attempt, self.forward, self.sample, self.exc, self.raised = 0, set(forward), set(sample), exc, []
        self.sampled = set(sampled)  # raise after the sampler drew (its generators advanced)
        model_call, sample = llm.runner._model_call, engine_core.sample

        def failing_model_call(*a, **kw):
            out = model_call(*a, **kw)  # (the forward ran: its KV and query-ring writes are in the pools)
            if not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
                self._maybe("forward", self.forward)  # (eager forwards: a graph capture is not a step's forward)
            return out

        def failing_sample(*a, **kw):
            self._maybe("sample", self.sample)
            out = sample(*a, **kw)
            self._maybe("sampled", self.sampled)
            return out

        monkeypatch.setattr(llm.runner, "_model_call", failing_model_call)
        monkeypatch.setattr(engine_core, "sample", failing_sample)

    def _maybe(self, where, attempts):
        if self.attempt in attempts:
            attempts.discard(self.attempt)
            self.raised.append((where, self.attempt))
            raise self.exc(f"injected failure in {where} at attempt {self.attempt}")


def drive(llm, prompts, faults=None, params=PARAMS):
    """Run ``prompts`` with ``step()`` until nothing is left; failed steps are retried. Returns the
    outputs and the number of steps that succeeded; checks that ``step()`` reported each request
    finished exactly once."""
    plist = params if isinstance(params, list) else [params] * len(prompts)
    ids = [llm.add_request(p, q) for p, q in zip(prompts, plist)]
    reported, steps = {}, 0
    for attempt in range(400):
        if not llm.has_unfinished():
            break
        if faults is not None:
            faults.attempt = attempt
        try:
            outs = llm.step()
        except Injected:
            continue
        steps += 1
        for out in outs:
            if out.finished:
                assert out.request_id not in reported, f"{out.request_id} reported finished twice"
                reported[out.request_id] = out
    else:
        pytest.fail("the engine never finished (a request is wedged)")
    outs = [llm.output(i) for i in ids]
    assert set(reported) == set(ids), "a request finished without step() reporting it"
    assert [reported[i].token_ids for i in ids] == [o.token_ids for o in outs]
    return outs, steps


@pytest.mark.parametrize("async_scheduling", [True, False])
@pytest.mark.parametrize("setup", list(SETUPS))
def test_failed_steps_are_rolled_back(model, monkeypatch, setup, async_scheduling):
    """The forward or the sampler raising on many different steps (prefill chunks, decode steps,
    steps that compress, preempt or readmit): retrying gives the undisturbed tokens."""
    cfg = dict(SETUPS[setup], async_scheduling=async_scheduling)
    ref = LLM(model, **cfg)
    expected, expected_steps = drive(ref, PROMPTS)
    assert all(o.finish_reason == "length" and len(o.token_ids) == PARAMS.max_tokens for o in expected)

    llm = LLM(model, **cfg)
    faults = Faults(llm, monkeypatch, forward=range(2, 60, 5), sample=range(1, 60, 3))
    outs, steps = drive(llm, PROMPTS, faults)
    assert len(faults.raised) >= 10, faults.raised
    assert {w for w, _ in faults.raised} == {"forward", "sample"}
    assert [o.token_ids for o in outs] == [o.token_ids for o in expected]
    # no work beyond the undisturbed run's (a request left past its tokens would spin until preempted)
    assert steps <= expected_steps
    assert llm.stats()["preemptions"] == ref.stats()["preemptions"]
    assert llm.generated_tokens == ref.generated_tokens
    assert [o.finish_reason for o in outs] == ["length"] * len(PROMPTS)
    if setup != "full":
        assert llm.stats()["compressions"] > 0
    assert_pool_clean(llm)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_seeded_sampling_is_the_same_with_a_failure_after_the_draw(model, monkeypatch, async_scheduling):
    """A step that fails after the sampler drew from the seeded generators is undone with them: the
    retried step draws the same random numbers, so seeded requests give the undisturbed tokens."""
    cfg = dict(SETUPS["compress"], async_scheduling=async_scheduling)
    params = [SamplingParams(max_tokens=14, temperature=1.0, seed=s, ignore_eos=True) for s in (1, 2, 3)]
    expected, _ = drive(LLM(model, **cfg), PROMPTS, params=params)
    llm = LLM(model, **cfg)
    faults = Faults(llm, monkeypatch, sampled=range(1, 40, 3))
    outs, _ = drive(llm, PROMPTS, faults, params=params)
    assert len(faults.raised) >= 4, faults.raised
    assert [o.token_ids for o in outs] == [o.token_ids for o in expected]
    assert_pool_clean(llm)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_failed_step_twice_in_a_row_and_on_every_attempt(model, monkeypatch, async_scheduling):
    """Consecutive failures of the same step (the sampler, then the forward, then the sampler again)."""
    cfg = dict(SETUPS["compress"], async_scheduling=async_scheduling)
    expected, expected_steps = drive(LLM(model, **cfg), PROMPTS)
    llm = LLM(model, **cfg)
    faults = Faults(llm, monkeypatch, forward=[5, 6, 12], sample=[3, 4, 7, 8, 9, 10, 11, 13, 14])
    outs, steps = drive(llm, PROMPTS, faults)
    assert len(faults.raised) == 12
    assert [o.token_ids for o in outs] == [o.token_ids for o in expected]
    assert steps == expected_steps
    assert_pool_clean(llm)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_failing_generate_leaves_nothing_behind_and_others_go_on(model, monkeypatch, async_scheduling):
    """generate() raises the original exception (here an interrupt in the sampler), removes its own
    requests and frees their pages; a request of another caller goes on with the undisturbed tokens,
    and the engine serves later generate() calls."""
    cfg = dict(SETUPS["full"], async_scheduling=async_scheduling, num_pages=64)  # (no preemption)
    other_prompt, own = PROMPTS[0], PROMPTS[1:]
    ref = LLM(model, **cfg)
    expected_other = drive(ref, [other_prompt])[0][0]
    expected_own = ref.generate(own, PARAMS, use_tqdm=False)

    llm = LLM(model, **cfg)
    other = llm.add_request(other_prompt, PARAMS)
    llm.step()
    llm.step()
    faults = Faults(llm, monkeypatch, sample=[0], exc=KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt, match="injected failure in sample"):
        llm.generate(own, PARAMS, use_tqdm=False)
    assert faults.raised == [("sample", 0)]
    assert list(llm.requests) == [other]
    for _ in range(PARAMS.max_tokens + 1):
        if llm.output(other).finished:
            break
        llm.step()
    out = llm.output(other)
    assert out.token_ids == expected_other.token_ids and out.finish_reason == "length"
    assert [o.token_ids for o in llm.generate(own, PARAMS, use_tqdm=False)] == [o.token_ids for o in expected_own]
    llm.cancel(other)
    assert_pool_clean(llm)


@pytest.mark.parametrize("async_scheduling", [True, False])
@pytest.mark.parametrize("async_compression", [False, True])
@pytest.mark.parametrize("shared", [False, True])
def test_compression_failing_half_way_finishes_its_requests_with_error(model, monkeypatch, shared, async_compression,
                                                                      async_scheduling):
    """A compression raising after it compacted some layers in place cannot be retried: its requests
    finish with reason "error" (their tokens a prefix of the undisturbed ones, their pages freed) while
    the others go on undisturbed; nothing stays wedged in a compression."""
    cfg = dict(SETUPS["compress"], layer_stride=1, async_scheduling=async_scheduling,
               async_compression=async_compression, enable_prefix_caching=shared)  # (else: compacted in place)
    # different lengths: compressed at different steps; a shared prefix: compacted into fresh pages
    prompts = PROMPTS if shared else prompts_of((6, 12, 30), seed=4)
    expected, _ = drive(LLM(model, **cfg), prompts)

    llm = LLM(model, **cfg)
    calls, into_fresh = [], []
    compress_layers = engine_runner.compress_layers

    def failing_compress_layers(*a, **kw):
        calls.append(1)
        if len(calls) == 4:  # the second layer of the second compression (one layer at a time)
            into_fresh.append(kw["dst_slots"] is not None)
            raise Injected("injected failure in a compression")
        return compress_layers(*a, **kw)

    monkeypatch.setattr(engine_runner, "compress_layers", failing_compress_layers)
    assert zipage.compress.compress_layers is not failing_compress_layers
    outs, _ = drive(llm, prompts)
    assert into_fresh == [shared]
    failed = [i for i, o in enumerate(outs) if o.finish_reason == "error"]
    assert 1 <= len(failed) < len(prompts), [o.finish_reason for o in outs]
    for i, (out, exp) in enumerate(zip(outs, expected)):
        if i in failed:
            assert out.finished and out.token_ids == exp.token_ids[: len(out.token_ids)]
            assert len(out.token_ids) < PARAMS.max_tokens
        else:
            assert out.token_ids == exp.token_ids and out.finish_reason == "length"
    assert_pool_clean(llm)


class _Tokenizer:
    """Decodes ids as letters; raises for any id in ``bad`` (a tokenizer given an id past its vocabulary)."""

    def __init__(self, bad=()):
        self.bad = set(bad)

    def decode(self, ids, skip_special_tokens=True):
        if self.bad & set(ids):
            raise IndexError("piece id out of range")
        return "".join(chr(97 + t % 26) for t in ids)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_a_request_its_tokenizer_cannot_decode_fails_alone(model, async_scheduling):
    """The tokenizer raises on a token one request samples: that request finishes with "error" (its tokens whole,
    its text as far as decoded), and the request that shared its steps gets every token of an undisturbed run."""
    a, b = prompts_of((7, 4), seed=5)
    ref = LLM(model, budget=None, page_size=4, num_pages=64).generate([a, b], PARAMS, use_tqdm=False)
    bad = next(t for t in ref[0].token_ids[3:] if t not in ref[1].token_ids)
    llm = LLM(model, _Tokenizer([bad]), budget=None, page_size=4, num_pages=64, async_scheduling=async_scheduling)
    ra = llm.add_request(a, SamplingParams(max_tokens=14, temperature=0, ignore_eos=True, stop=["zzzz"]))
    rb = llm.add_request(b, PARAMS)
    raised = 0
    for _ in range(100):
        if not llm.has_unfinished():
            break
        try:
            llm.step()
        except IndexError:
            raised += 1
    assert raised == 1
    out_a, out_b = llm.output(ra), llm.output(rb)
    assert out_a.finish_reason == "error" and out_a.token_ids == ref[0].token_ids[:len(out_a.token_ids)]
    assert bad in out_a.token_ids and isinstance(out_a.text, str)
    assert out_b.finish_reason == "length" and out_b.token_ids == ref[1].token_ids
    assert_pool_clean(llm)


def test_a_compression_lands_once_when_finishing_a_request_raises(model, monkeypatch):
    """Two requests compressed in one group into fresh pages; one is cancelled meanwhile and finishing it raises
    as the group lands: the group is not landed again at the next step (which would free the other's pages)."""
    setup = dict(budget=8, buffer=4, window=2, page_size=4, num_pages=64, async_compression=True,
                 async_scheduling=False)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    prompts = prompts_of((16, 16, 3), seed=1)
    alone = LLM(model, **setup).generate([prompts[1]], params, use_tqdm=False)[0].token_ids
    llm = LLM(model, **setup)
    x, y, _ = (llm.add_request(p, params) for p in prompts)
    llm.step()  # the 16-token prompts stored: both due for their first compression
    llm.step()  # their compression launched (one group)
    X, Y = llm.requests[x], llm.requests[y]
    assert X.compressing and Y.compressing
    llm.cancel(x)
    finish = llm.scheduler.finish

    def failing(seq, reason):
        if seq is X:
            monkeypatch.setattr(llm.scheduler, "finish", finish)  # (once)
            finish(seq, reason)
            raise Injected("finishing failed")
        return finish(seq, reason)

    monkeypatch.setattr(llm.scheduler, "finish", failing)
    with pytest.raises(Injected):
        llm.step()
    while llm.has_unfinished():
        llm.step()
    assert llm.output(y).finish_reason == "length" and llm.output(y).token_ids == alone
    assert_pool_clean(llm)


@pytest.mark.parametrize("case", ["fresh pages", "held sample"])
def test_an_interrupt_inside_the_scheduler_loses_no_page_and_no_sample(model, monkeypatch, case):
    """An exception (an interrupt) while the scheduler admits a request: the destination pages it took for a
    compression go back, samples held for their sibling's prompt stay in line, and every request finishes."""
    from zipage.memory.block_manager import BlockManager

    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    if case == "fresh pages":  # a compression into fresh pages is planned before the admission fails
        llm = LLM(model, budget=8, buffer=4, window=2, page_size=4, num_pages=64, async_scheduling=False)
        first = llm.add_request(prompts_of((16,), seed=2)[0], params)
    else:  # sample 1 of an n=2 request waits for sample 0's prompt while the admission fails
        llm = LLM(model, budget=None, page_size=4, num_pages=64, max_num_batched_tokens=8)
        first = llm.add_request(prompts_of((30,), seed=2)[0], SamplingParams(max_tokens=6, temperature=0,
                                                                               ignore_eos=True, n=2))
    llm.step()
    late = llm.add_request(prompts_of((5,), seed=3)[0], params)
    match = BlockManager.match_prefix

    def interrupted(self, seq, *args):
        if seq.request_id == late:
            monkeypatch.setattr(BlockManager, "match_prefix", match)
            raise Injected("interrupted")
        return match(self, seq, *args)

    monkeypatch.setattr(BlockManager, "match_prefix", interrupted)
    with pytest.raises(Injected):
        for _ in range(20):
            llm.step()
    while llm.has_unfinished():
        llm.step()
    assert all(s.finish_reason == "length" and len(s.output_ids) == 6 for s in llm.samples(first))
    assert llm.output(late).finish_reason == "length"
    assert_pool_clean(llm)


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="needs a CUDA GPU")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("async_compression", [True, False])
def test_a_compression_whose_booking_raises_fails_its_requests_only(model, monkeypatch, async_compression, device):
    """Booking a compression raises (an interrupt while the first of its groups lands): that group's request
    finishes with "error" naming the cause; the groups landing after it in the same step are still booked (they
    were left compressing for ever: pages leaked, the engine never finished) and give an undisturbed run's tokens."""
    cfg = dict(budget=8, page_size=4, buffer=4, window=2, num_pages=64, max_num_batched_tokens=64,
               async_compression=async_compression, async_scheduling=False, enable_prefix_caching=False)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    prompts = prompts_of((16, 14, 12), seed=1)
    if device == "cuda":  # (a side stream: the compressions land by their events, a step or more later)
        model = tiny_model("qwen3").cuda()
        cfg["enforce_eager"] = False
    expected = LLM(model, **cfg).generate(prompts, params, use_tqdm=False)
    llm = LLM(model, **cfg)
    compacted, calls = llm.blocks.compacted, []

    def failing(seq, kept, fresh):
        calls.append(seq.request_id)
        if len(calls) == 1:
            raise Injected(f"interrupted while booking {seq.request_id}")
        return compacted(seq, kept, fresh)

    monkeypatch.setattr(llm.blocks, "compacted", failing)
    outs, _ = drive(llm, prompts, params=params)
    failed = [i for i, o in enumerate(outs) if o.finish_reason == "error"]
    assert failed == [0]
    assert outs[0].error == "Injected: interrupted while booking 0"
    for out, exp in zip(outs[1:], expected[1:]):
        assert out.finish_reason == "length" and out.token_ids == exp.token_ids and out.error is None
    assert_pool_clean(llm)


@pytest.mark.parametrize("async_compression", [True, False])
def test_the_only_request_a_failed_step_ends_is_reported(model, monkeypatch, async_compression):
    """The step that fails the only request raises; its "error" output (naming the cause) still comes from a
    later step(): has_unfinished() says so until then (a `while has_unfinished(): step()` loop, and the
    server's, never saw it: a client waited for ever)."""
    llm = LLM(model, budget=8, page_size=4, buffer=4, window=2, num_pages=64, async_compression=async_compression)

    def failing(*a, **kw):
        raise Injected("the scorer failed")

    monkeypatch.setattr(llm.runner.scorer, "score", failing)
    rid = llm.add_request(prompts_of((30,))[0], PARAMS)
    reported, raised = [], 0
    for _ in range(50):
        if not llm.has_unfinished():
            break
        try:
            reported += [o for o in llm.step() if o.finished]
        except Injected:
            raised += 1
    assert raised == 1
    assert [(o.request_id, o.finish_reason, o.error) for o in reported] == [(rid, "error", "Injected: the scorer failed")]
    assert_pool_clean(llm)


def test_agenerate_and_stream_of_a_request_beside_a_failed_one_go_on(model, monkeypatch):
    """Request A's compression fails in a step request B's call happens to drive: B's agenerate() (and its
    stream()) finishes B undisturbed instead of raising A's error and cancelling B; A comes back with "error"
    and the cause."""
    import asyncio

    cfg = dict(budget=8, page_size=4, buffer=4, window=2, num_pages=64, max_num_batched_tokens=64)
    a, b = prompts_of((30, 5), seed=4)
    expected = LLM(model, **cfg).generate([a, b], PARAMS, use_tqdm=False)

    def engine_failing_once():
        llm = LLM(model, **cfg)
        score, calls = llm.runner.scorer.score, []

        def failing(x):
            calls.append(1)
            if len(calls) == 1:
                raise Injected("A's compression failed")
            return score(x)

        monkeypatch.setattr(llm.runner.scorer, "score", failing)
        return llm

    llm = engine_failing_once()

    async def both():
        return await asyncio.gather(llm.agenerate(a, PARAMS), llm.agenerate(b, PARAMS), return_exceptions=True)

    out_a, out_b = asyncio.run(both())
    assert not isinstance(out_b, BaseException), out_b
    assert out_b.finish_reason == "length" and out_b.token_ids == expected[1].token_ids
    assert out_a.finish_reason == "error" and out_a.error == "Injected: A's compression failed"
    assert_pool_clean(llm)

    llm = engine_failing_once()
    ra, rb = llm.add_request(a, PARAMS), llm.add_request(b, PARAMS)
    streamed = [t for new in llm.stream(rb) for t in new]
    assert streamed == expected[1].token_ids and llm.output(rb).finish_reason == "length"
    assert llm.output(ra).finish_reason == "error"
    with pytest.raises(RuntimeError, match="A's compression failed"):
        list(llm.stream(ra))  # (ended by a step it did not drive: its stream names the cause)
    while llm.has_unfinished():
        llm.step()
    assert_pool_clean(llm)


def test_a_request_that_stopped_while_compressing_is_reported_when_a_booking_beside_it_raises(model):
    """B reaches its stop token while its compression is in flight; as that compression lands, the booking of
    another group raises. B finishes "stop" and its output still comes from a step (it was finished and never
    reported: a client waited for ever)."""
    params_a = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    cfg = dict(budget=8, page_size=4, buffer=4, window=2, num_pages=64, max_num_batched_tokens=64,
               async_compression=True, enable_prefix_caching=False)
    pa, pb = prompts_of((16, 14), seed=1)
    ref = LLM(model, **cfg).generate([pb], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True),
                                     use_tqdm=False)[0].token_ids
    for stop_at in range(1, 30):
        if ref[stop_at] in ref[:stop_at]:
            continue
        llm = LLM(model, **cfg)
        comps, compacted = llm.core.compressions, llm.blocks.compacted
        state = {"victim": None, "stopped": None, "fired": False}

        def collect(block, changed=None, collect=comps.collect, comps=comps, state=state):
            if not state["fired"]:
                groups = [g for _, gs in comps.pending for g in gs]
                stopped = [s for g in groups for s in g[0] if s.finish_requested not in (None, "error")]
                if stopped and groups[0][0][0] is not stopped[0]:
                    state["stopped"], state["victim"] = stopped[0], groups[0][0][0]
            return collect(block, changed)

        def failing(seq, kept, fresh, compacted=compacted, state=state):
            if seq is state["victim"] and not state["fired"]:
                state["fired"] = True
                raise Injected(f"booking {seq.request_id} failed")
            return compacted(seq, kept, fresh)

        comps.collect, llm.blocks.compacted = collect, failing
        ra = llm.add_request(pa, params_a)
        rb = llm.add_request(pb, SamplingParams(max_tokens=40, temperature=0, stop_token_ids=[ref[stop_at]]))
        reported = {}
        for _ in range(300):
            if not llm.has_unfinished():
                break
            try:
                reported.update({o.request_id: o.finish_reason for o in llm.step() if o.finished})
            except Injected:
                pass
        if state["fired"]:
            break
    else:
        pytest.fail("no case where a stopped request landed beside a failing booking")
    stopped = state["stopped"].request_id
    assert reported[stopped] == "stop" and llm.output(stopped).token_ids == ref[: stop_at + 1]
    assert reported[state["victim"].request_id] == "error" and set(reported) == {ra, rb}
    assert_pool_clean(llm)


def test_stream_of_a_request_finishing_in_a_step_that_failed_another_ends_normally(model, monkeypatch):
    """The step that books B's last token fails A (A's token cannot be booked): B's stream yields every token and
    ends (it raised A's error and dropped B's last token)."""
    cfg = dict(budget=None, page_size=4, num_pages=64)
    a, b = prompts_of((12, 5), seed=4)
    params_a = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    params_b = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    expected = LLM(model, **cfg).generate([b], params_b, use_tqdm=False)[0].token_ids
    llm = LLM(model, **cfg)
    ra, rb = llm.add_request(a, params_a), llm.add_request(b, params_b)
    A, B = llm.requests[ra], llm.requests[rb]
    append, fired = llm.core.outputs.append, []

    def failing(seq, token, lp):
        if seq is A and not fired and len(B.output_ids) + 1 == B.params.max_tokens:
            fired.append(1)
            raise Injected("A's token could not be booked")
        return append(seq, token, lp)

    monkeypatch.setattr(llm.core.outputs, "append", failing)
    assert [t for new in llm.stream(rb) for t in new] == expected and fired
    assert llm.output(rb).finish_reason == "length"
    assert llm.output(ra).finish_reason == "error" and llm.output(ra).error == "Injected: A's token could not be booked"
    # (the failed step's outputs, A's and B's last, come from the step after it)
    assert sorted(o.request_id for o in llm.step()) == sorted([ra, rb])
    assert_pool_clean(llm)
