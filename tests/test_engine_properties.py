"""Random operations against the engine: no page leaked or owned twice, no request lost, exact tokens.

The bulk runs on ``SymbolicRunner`` (tests/symbolic_engine.py: no model, every page mix-up changes
the tokens), over many small pools under constant pressure: requests added with shared prefixes and
prompts longer than the budget, cancelled (also while their compression is in flight), steps that
fail in the forward, the sampler or a compression, ``generate()`` calls that are interrupted,
compressions that land several steps after they were launched. After every operation:

- the pool's reference counts equal the page lists of the live sequences (and the destination
  pages of compressions in flight), the free list is exactly the pages nobody holds;
- every request added is finished with a reason or queued exactly once; finished ones hold nothing;
- no request has more tokens than ``max_tokens``, and every greedy request's tokens are a prefix
  of those it gets on its own (equal to them once finished by length or a stop).

No step may raise anything but an injected failure (never "out of pages", never an assertion).
A smaller run does the same with the real runner on a tiny model.
"""

from __future__ import annotations

import dataclasses
import random
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model
from symbolic_engine import FakeEvent, Injected, NoStream, SymbolicRunner, alone
from test_engine import assert_pool_clean

import zipage.engine.core as core_mod
import zipage.engine.llm as llm_mod
from zipage import LLM, SamplingParams
from zipage.engine.sequence import Status
from zipage.memory import BlockManager, OutOfPagesError

VOCAB = 64
REASONS = {"length", "stop", "cancelled", "error"}


class Episode:
    """One engine with random settings, driven by random operations, checked after each one."""

    def __init__(self, model, rng: random.Random, symbolic: bool) -> None:
        self.model, self.rng, self.symbolic = model, rng, symbolic
        page = rng.choice([1, 2, 4])
        budget = rng.choice([None, None, 4, 5, 6, 8, 12])
        kw = {}
        if budget is None:
            pages = rng.randint(3, 24)
        else:
            kw = dict(buffer=rng.randint(1, 2 * page), window=rng.randint(1, min(3, budget)))
            n_max = -(-(budget + kw["buffer"]) // page)
            pages = rng.randint(n_max, 4 * n_max + 2)
        self.max_model_len = rng.choice([None, None, rng.randint(8, 60)])  # (None: the model's)
        self.settings = dict(budget=budget, page_size=page, num_pages=pages, enable_prefix_caching=rng.random() < 0.7,
                             max_num_seqs=rng.randint(1, 6), max_num_batched_tokens=rng.choice([1, 3, 8, 16, 64]),
                             max_model_len=self.max_model_len, async_compression=rng.random() < 0.5,
                             async_scheduling=rng.random() < 0.5, **kw)
        self.llm = LLM(model, **self.settings)
        self.max_model_len = self.llm.max_model_len
        self.seqs = []  # every request added, in order
        self.expected = {}  # id(seq) -> its tokens on its own (symbolic runs)
        self.prefixes = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(page, 3 * page))] for _ in range(2)]
        self.fail = 0.03 if rng.random() < 0.4 else 0.0  # probability of a failure in each forward, sampling...
        self.injected = {"forward": 0, "sample": 0, "compress": 0}
        r = self.llm.runner
        if symbolic:
            r.blocks, r.vocab, r.rng = self.llm.blocks, VOCAB, rng
            r.fail_forward = r.fail_compress = self.fail
            if self.llm.async_compression:
                self._delay_compressions()
        else:
            model_call = r._model_call

            def failing_model_call(*a, **k):
                out = model_call(*a, **k)  # (its KV and query-ring writes are in the pools)
                if rng.random() < self.fail:
                    raise Injected("injected failure in forward")
                return out

            r._model_call = failing_model_call
        add = self.llm.add_request

        def tracked_add(prompt, params=None, *a, **k):
            rid = add(prompt, params, *a, **k)
            seq = self.llm.requests[rid]
            self.seqs.append(seq)
            if symbolic:
                cfg = self.llm.zipage_config
                own = cfg.replace(budget=seq.budget) if seq.budget is not None else None  # (resolved by add)
                self.expected[id(seq)] = alone(seq.prompt_token_ids, seq.params, own, VOCAB, self.max_model_len)
            return rid

        self.llm.add_request = tracked_add

    def _delay_compressions(self) -> None:
        """Compressions land when a FakeEvent says so, 0 to 3 steps after their launch."""
        compressions, runner = self.llm.core.compressions, self.llm.runner
        launch = compressions.launch

        def delayed_launch(plan):
            runner.launched, before = [], len(compressions.pending)
            try:
                launch(plan)
            finally:
                jobs, runner.launched = runner.launched, None
                if len(compressions.pending) > before:
                    event, groups = compressions.pending[-1]
                    assert event is None
                    compressions.pending[-1] = (FakeEvent(jobs, self.rng.randint(0, 3)), groups)
                else:
                    assert not jobs

        compressions.launch = delayed_launch

    # ------------------------------------------------------------------------- operations
    def random_prompt(self) -> list[int]:
        rng, page = self.rng, self.llm.blocks.page_size
        limit = max(1, min(self.llm.blocks.num_pages * page, self.max_model_len - 1))
        n = rng.randint(1, limit) if rng.random() < 0.2 else rng.randint(1, min(limit, 3 * page + 2))
        prompt = [rng.randrange(3, VOCAB) for _ in range(n)]
        if rng.random() < 0.5:  # a shared prefix (which some prompts end inside)
            prompt = rng.choice(self.prefixes) + prompt
            if rng.random() < 0.3:
                prompt = prompt[:n]
        return prompt

    def random_params(self) -> SamplingParams:
        rng = self.rng
        stops = rng.sample(range(3, VOCAB), rng.choice([0, 0, 1, 2]))
        max_tokens = rng.randint(1, 40)
        own = {}
        cfg = self.llm.zipage_config
        if cfg is not None and rng.random() < 0.4:  # a budget of its own: smaller, larger, or full KV
            own["budget"] = rng.choice([None] + [b for b in (4, 5, 6, 8, 12) if b >= cfg.window + cfg.sinks])
        return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, stop_token_ids=stops,
                              min_tokens=min(max_tokens, rng.choice([0, 0, 2])), **own)

    def add(self) -> None:
        try:
            self.llm.add_request(self.random_prompt(), self.random_params())
        except ValueError as err:  # a request that could never fit is refused up front
            assert "KV pool has" in str(err) or "context" in str(err), err

    def step(self) -> None:
        previous = core_mod.sample
        if self.rng.random() < self.fail:
            def sample(*a, **k):
                raise Injected("injected failure in sample")

            core_mod.sample = sample
        try:
            self.llm.step()
        except Injected as err:
            self.injected[str(err).split()[3]] += 1
        finally:
            core_mod.sample = previous

    def cancel(self) -> None:
        live = [q for q in self.seqs if not q.finished and self.llm.requests.get(q.request_id) is q]
        if live:  # (not those of an interrupted generate() still waiting for their compression to land)
            self.llm.cancel(self.rng.choice(live).request_id)

    def interrupted_generate(self) -> None:
        """generate() on new prompts, its sampler raising at a random call: its requests are cancelled."""
        calls, fail_at = [0], self.rng.randint(0, 12)
        previous = core_mod.sample

        def sample(*a, **k):
            calls[0] += 1
            if calls[0] == fail_at:
                raise Injected("injected failure in sample")
            return previous(*a, **k)

        core_mod.sample = sample
        try:
            self.llm.generate([self.random_prompt() for _ in range(self.rng.randint(1, 2))], self.random_params(),
                              use_tqdm=False)
        except Injected:
            self.injected["sample"] += 1
        except ValueError as err:
            assert "KV pool has" in str(err) or "context" in str(err), err
        finally:
            core_mod.sample = previous

    def run(self, ops: int) -> int:
        rng, done = self.rng, 0
        while done < ops:
            r = rng.random()
            if r < 0.3:
                self.add()
            elif r < 0.38:
                self.cancel()
            elif r < 0.41:
                self.interrupted_generate()
            else:
                self.step()
            done += 1
            self.check()
        for _ in range(100 * (len(self.seqs) + 10)):  # then everything runs to completion
            if not self.llm.has_unfinished():
                break
            self.step()
            done += 1
            self.check()
        assert not self.llm.has_unfinished(), "the engine never finished (a request is wedged)"
        self.check_final()
        return done

    # ------------------------------------------------------------------------- invariants
    def check(self) -> None:
        llm, s = self.llm, self.llm.scheduler
        queued = list(s.running) + list(s.waiting)
        ids = {id(q) for q in queued}
        assert len(ids) == len(queued), "a request is queued twice"
        assert ids <= {id(q) for q in self.seqs}, "an unknown request is queued"
        for q in self.seqs:
            assert q.finished != (id(q) in ids), f"request {q.request_id} lost or finished yet queued"
            if q.finished:
                assert q.pages == [] and q.slot == -1 and not q.compressing and q.finish_reason in REASONS
            # (the scheduler never ends a request for want of pages; a failure injected names itself)
            assert q.error is None or (q.finish_reason == "error" and q.error.startswith("Injected: ")), q.error
            assert len(q.output_ids) <= q.params.max_tokens
            ref = self.expected.get(id(q))
            if ref is not None:
                assert q.output_ids == ref[: len(q.output_ids)], f"request {q.request_id}: tokens differ"
        in_flight = [pages for _, groups in llm.core.compressions.pending for _, _, fresh in groups if fresh
                     for pages in fresh.values()]
        llm.blocks.check([q.pages for q in queued] + in_flight)
        for q in s.waiting:
            assert q.pages == [] and q.num_computed == q.stored == 0 and q.slot == -1, "a waiting request holds pages"
        slots = [q.slot for q in s.running]
        assert sorted(slots + s.free_slots) == list(range(s.num_slots)), "query slots lost or doubled"
        page = llm.blocks.page_size
        for q in s.running:
            assert len(q.pages) * page >= q.stored
            if q.compressions:
                cap = q.budget + llm.zipage_config.buffer
                assert q.stored <= cap and len(q.pages) <= -(-cap // page)

    def check_final(self) -> None:
        llm = self.llm
        if not any(self.injected.values()):
            assert all(q.finish_reason != "error" for q in self.seqs)
        if not self.symbolic:  # the real model: a sample of the requests, each run on its own
            for q in self.rng.sample(self.seqs, min(3, len(self.seqs))):
                solo = LLM(self.model, **self.settings)
                self.expected[id(q)] = solo.generate([q.prompt_token_ids], q.params, use_tqdm=False)[0].token_ids
        for q in self.seqs:
            ref = self.expected.get(id(q))
            if ref is not None:
                if q.finish_reason in ("length", "stop"):
                    assert q.output_ids == ref, f"request {q.request_id} ({q.finish_reason})"
                else:
                    assert q.output_ids == ref[: len(q.output_ids)], f"request {q.request_id} ({q.finish_reason})"
        if llm.core.inflight is not None:  # the token of a request cancelled after it was sampled: dropped
            assert all(q.finished for q in llm.core.inflight.seqs)
            llm.step()
        assert not llm.core.compressions and llm.core.inflight is None
        assert_pool_clean(llm)
        assert all(r == 0 for r in llm.blocks.refs)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: more threads only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stub_model():
    return tiny_model("llama", vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)


def test_random_operations_keep_the_engine_consistent(monkeypatch, stub_model):
    """12,000 random operations (and then the steps that finish every request) over 100 engines."""
    monkeypatch.setattr(llm_mod, "ModelRunner", SymbolicRunner)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: NoStream())
    total, stats, reasons, injected = drive(stub_model, range(100), 120, symbolic=True)
    assert total >= 12_000
    # (a compressed request sitting out a step for want of pages, "waits", is rare here since cancelled requests'
    # compressions land within cancel(): tests/test_scheduler.py makes one on purpose)
    assert all(v > 0 for k, v in stats.items() if k != "waits") and all(v > 0 for v in injected.values()), (
        stats, injected)
    assert reasons == REASONS


def test_random_operations_with_the_real_runner(stub_model):
    """The same on a tiny model: its KV pages, query rings and compressions (fewer operations)."""
    total, stats, reasons, _ = drive(stub_model, range(1000, 1012), 50, symbolic=False)
    assert stats["compressions"] > 0 and stats["preemptions"] > 0 and stats["prefix_cache_hits"] > 0, stats
    assert {"length", "cancelled"} <= reasons


def drive(model, seeds, ops: int, symbolic: bool):
    total, stats = 0, {"preemptions": 0, "compressions": 0, "prefix_cache_hits": 0, "waits": 0}
    reasons, injected = set(), {"forward": 0, "sample": 0, "compress": 0}
    for seed in seeds:
        ep = Episode(model, random.Random(seed), symbolic)
        total += ep.run(ops)
        for k in stats:
            stats[k] += ep.llm.stats()[k] if k != "waits" else ep.llm.scheduler.waits
        reasons |= {q.finish_reason for q in ep.seqs}
        for k in injected:
            injected[k] += ep.injected[k]
    print(f"{total} operations; {stats}; injected {injected}")
    return total, stats, reasons, injected


def test_block_manager_invariants():
    rng = random.Random(0)
    for _ in range(50):
        blocks = BlockManager(16, 4)
        owners: list[list[int]] = []
        for _ in range(100):
            op, x = rng.choice(["alloc", "release", "register", "hit"]), rng.randrange(64)
            if op == "alloc":
                n = x % 4
                if n <= blocks.num_free:
                    owners.append(blocks.allocate(n))
                else:
                    with pytest.raises(OutOfPagesError):
                        blocks.allocate(n)
            elif op == "release" and owners:
                blocks.release(owners.pop(x % len(owners)))
            elif op == "register" and owners and owners[x % len(owners)]:
                # the first page of an owner holds the prompt page [x] * 4 (plus one token to compute)
                seq = SimpleNamespace(request_id="r", prompt_token_ids=[x] * 5, pages=owners[x % len(owners)][:1],
                                      num_computed=4, stored=4, compressions=0, cached_pages=0)
                blocks.register_prefix(seq)
            elif op == "hit":
                seq = SimpleNamespace(request_id="r", prompt_token_ids=[x] * 5, pages=[], num_computed=0, stored=0,
                                      cached_pages=0)
                blocks.match_prefix(seq)
                if seq.pages:
                    owners.append(seq.pages)
            blocks.check(owners)
        for pages in owners:
            blocks.release(pages)
        blocks.check([])
        assert blocks.num_free == 16


def _symbolic_llm(model, **settings):
    llm = LLM(model, **settings)
    llm.runner.blocks, llm.runner.vocab, llm.runner.rng = llm.blocks, VOCAB, random.Random(0)
    return llm


def test_a_later_sample_is_admitted_before_requests_that_arrived_after_it(monkeypatch, stub_model):
    """Request A (n=2) then B, two seats: A's second sample waits while its first computes the prompt, and B,
    behind it in line, took the seat meanwhile (A's second sample then waited a whole request, 500 steps). Now
    the seat and pages of a held sample are kept for it: it runs beside its first sample, B after them."""
    monkeypatch.setattr(llm_mod, "ModelRunner", SymbolicRunner)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: NoStream())
    for chunk, gap in ((64, 0), (16, 1)):
        llm = _symbolic_llm(stub_model, budget=16, page_size=4, buffer=4, window=2, num_pages=64, max_num_seqs=2,
                            max_num_batched_tokens=chunk, async_scheduling=False)
        params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=100)
        a = llm.add_request(list(range(3, 43)), dataclasses.replace(params, n=2))
        for _ in range(gap):
            llm.step()
        b = llm.add_request(list(range(10, 20)), params)
        admitted, step = {}, 0
        while llm.has_unfinished():
            llm.step()
            step += 1
            for seq in llm.samples(a) + llm.samples(b):
                if seq.status is Status.RUNNING or seq.finished:
                    admitted.setdefault(seq.request_id, step)
        first, second = (admitted[s.request_id] for s in llm.samples(a))
        assert second < 10 and admitted[llm.samples(b)[0].request_id] > 100, (chunk, admitted)
        assert_pool_clean(llm)


def test_no_request_is_admitted_in_a_step_that_preempted(monkeypatch, stub_model):
    """Full KV under page pressure: a step that preempts a request admits nobody (the victim, first in line, took
    back the pages just freed and was preempted again at the next shortage: most preemptions were such round trips)."""
    monkeypatch.setattr(llm_mod, "ModelRunner", SymbolicRunner)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: NoStream())
    llm = _symbolic_llm(stub_model, budget=None, page_size=4, num_pages=24, max_num_seqs=8, async_scheduling=False)
    rng = random.Random(5)
    for i in range(24):
        llm.add_request([rng.randrange(3, VOCAB) for _ in range(rng.randint(4, 20))],
                        SamplingParams(temperature=0, ignore_eos=True, max_tokens=rng.randint(10, 60)))
    schedule, preempt, victims, admitted_after = llm.scheduler.schedule, llm.scheduler.preempt, [], []

    depth = []

    def watched():  # (called again from inside a schedule() that preempted a request stuck in its prefill)
        if not depth:
            victims.clear()
        depth.append(1)
        try:
            waiting = {id(s) for s in llm.scheduler.waiting}
            step = schedule()
        finally:
            depth.pop()
        if victims and not depth:  # (this step preempted: nothing that waited, the victims included, may start)
            admitted_after.append([s.request_id for s, _ in step.prefill if id(s) in waiting or s in victims])
        return step

    def recorded(seq):
        victims.append(seq)
        return preempt(seq)

    llm.scheduler.preempt = recorded
    llm.scheduler.schedule = watched
    while llm.has_unfinished():
        llm.step()
    assert llm.scheduler.preemptions > 0 and admitted_after and not any(admitted_after), admitted_after
    assert_pool_clean(llm)
