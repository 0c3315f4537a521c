"""Property-based tests: the page pool and the scheduler under random admit / step / cancel sequences.

A stand-in for the model runner moves no tensors but checks every write: each new token must
land in a page its sequence alone holds (shared pages are never written), and each
compression must read pages the sequence holds. After every action the invariants hold:
reference counts equal the page lists of the live sequences, the free list is exactly the
pages nobody holds, no request is lost or duplicated, finished requests hold nothing.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import zipage.engine.llm as llm_mod
from zipage import LLM, SamplingParams
from zipage.engine.runner import ModelRunner
from zipage.engine.sequence import Status
from zipage.memory import BlockManager, OutOfPagesError

VOCAB = 96
STOP_IDS = [3, 7, 11, 13, 17]  # random logits pick one of them every ~20 tokens


class CheckingRunner(ModelRunner):
    """Like the real runner (it changes no sequence); instead of tensors, assertions about what would be written."""

    def __init__(self, model, num_pages, page_size, zipage_config, scorer, num_slots, fuse_ops=True):
        self.page_size = page_size
        self.zipage_config = zipage_config
        self.scorer = scorer
        self.num_slots = num_slots
        self.device = torch.device("cpu")
        self.blocks = None  # set by the test
        self.writes = 0

    def forward(self, prefill, decode, feed=None):
        for seq, n in prefill:
            assert seq.num_computed + n <= seq.num_tokens - seq.pending, "prefill of a token still on the device"
        for seq in decode:
            if seq.pending:
                assert feed is not None and id(seq) in feed.rows, "a pending input token with nothing to feed it"
        for seq, n in prefill + [(s, 1) for s in decode]:
            assert seq.status is Status.RUNNING and 0 <= seq.slot < self.num_slots
            assert len(seq.pages) * self.page_size >= seq.stored + n, "writing past the sequence's pages"
            for j in range(seq.stored, seq.stored + n):
                page = seq.pages[j // self.page_size]
                assert self.blocks.refs[page] == 1, "a shared page was written"
                self.writes += 1
        g = torch.Generator().manual_seed(self.writes)
        return torch.randn(len(prefill) + len(decode), VOCAB, generator=g)

    def compress(self, seqs, dst_pages, first):
        for i, seq in enumerate(seqs):
            assert len(seq.pages) * self.page_size >= seq.stored
            if dst_pages is not None:
                assert all(self.blocks.refs[p] == 1 for p in dst_pages[i]), "compaction into a shared page"
                assert not set(dst_pages[i]) & set(seq.pages)
            else:
                keep = -(-(self.zipage_config.budget + 1) // self.page_size)
                assert all(self.blocks.refs[p] == 1 for p in seq.pages[:keep]), "in-place compaction of a shared page"


def check_invariants(llm: LLM, added: set[str]) -> None:
    s = llm.scheduler
    live = list(s.running) + list(s.waiting)
    ids = [q.request_id for q in live]
    assert len(ids) == len(set(ids)), "a request is queued twice"
    finished = {rid for rid, q in llm.requests.items() if q.finished}
    assert set(ids) | finished == added and not set(ids) & finished, "a request was lost"
    in_flight = [pages for _, groups in llm.core.compressions.pending for _, _, fresh in groups if fresh
                 for pages in fresh.values()]
    llm.blocks.check([q.pages for q in live] + in_flight)
    for q in llm.requests.values():
        if q.finished:
            assert q.pages == [] and q.slot == -1
    assert all(q.pages == [] and q.num_computed == 0 for q in s.waiting), "a waiting request holds pages"
    slots = [q.slot for q in s.running]
    assert len(slots) == len(set(slots)) and all(q.slot == -1 for q in s.waiting)
    assert len(s.running) <= s.max_concurrency
    if llm.zipage_config is not None:
        cap = llm.zipage_config.capacity
        for q in s.running:
            if q.compressions:
                assert q.stored <= cap and len(q.pages) <= -(-cap // llm.blocks.page_size)


actions = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 40), st.integers(1, 30), st.integers(0, 2)),
        st.tuples(st.just("step"), st.integers(1, 6)),
        st.tuples(st.just("cancel"), st.integers(0, 50)),
    ),
    min_size=5,
    max_size=40,
)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_hidden_layers=1)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    acts=actions,
    budget=st.sampled_from([None, 8, 16]),
    page=st.sampled_from([2, 4, 8]),
    pages=st.integers(8, 30),
    prefix=st.booleans(),
    max_seqs=st.integers(1, 6),
    chunk=st.sampled_from([4, 16, 64]),
    async_compression=st.booleans(),
    async_scheduling=st.booleans(),
    stops=st.booleans(),
)
def test_scheduler_and_pool_invariants(monkeypatch, model, acts, budget, page, pages, prefix, max_seqs, chunk,
                                       async_compression, async_scheduling, stops):
    monkeypatch.setattr(llm_mod, "ModelRunner", CheckingRunner)
    kw = {} if budget is None else {"buffer": page, "window": 2}
    try:
        llm = LLM(model, budget=budget, page_size=page, num_pages=pages, enable_prefix_caching=prefix,
                  max_num_seqs=max_seqs, max_num_batched_tokens=chunk, async_compression=async_compression,
                  async_scheduling=async_scheduling, **kw)
    except ValueError:
        return
    llm.runner.blocks = llm.blocks
    shared = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]  # a common prefix, so prefix caching has work
    added: set[str] = set()
    for act in acts:
        if act[0] == "add":
            _, n, max_tokens, kind = act
            prompt = (shared[: n % len(shared)] if kind == 0 else []) + [20 + (n * 7 + i) % 70 for i in range(n)]
            try:
                params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True,
                                        stop_token_ids=STOP_IDS if stops else [])
                rid = llm.add_request(prompt, params)
            except ValueError as err:  # a request that could never fit in the pool is refused up front
                assert "KV pool has" in str(err)
                continue
            added.add(rid)
        elif act[0] == "step":
            for _ in range(act[1]):
                try:
                    llm.step()
                except (RuntimeError, OutOfPagesError) as err:  # only a pool too small for one request
                    assert "cannot hold" in str(err) or isinstance(err, OutOfPagesError)
                    return
                check_invariants(llm, added)
        else:
            live = sorted(q.request_id for q in llm.scheduler.running) + [q.request_id for q in llm.scheduler.waiting]
            if live:
                llm.cancel(live[act[1] % len(live)])
        check_invariants(llm, added)
    for _ in range(2000):  # everything still admitted runs to completion
        if not llm.has_unfinished():
            break
        try:
            llm.step()
        except RuntimeError as err:
            assert "cannot hold" in str(err)
            return
        check_invariants(llm, added)
    assert not llm.has_unfinished()
    stats = llm.stats()
    for name in ("compressions", "preemptions", "prefix_cache_hits"):
        event(f"{name} > 0: {stats[name] > 0}")
    event(f"cancelled: {any(q.finish_reason == 'cancelled' for q in llm.requests.values())}")
    for rid in added:
        q = llm.requests[rid]
        assert q.finish_reason in ("length", "cancelled", "stop")
        assert q.pending == 0 or q.finish_reason != "length"
        if q.finish_reason == "length":
            assert len(q.output_ids) == q.params.max_tokens
            assert not set(q.output_ids) & set(q.params.stop_token_ids)
        if q.finish_reason == "stop":  # the stop token ends the output, nothing after it
            assert q.output_ids[-1] in STOP_IDS and not set(q.output_ids[:-1]) & set(STOP_IDS)
            assert len(q.output_ids) <= q.params.max_tokens
    assert llm.blocks.num_free == llm.blocks.num_pages


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "release", "register", "hit"]), st.integers(0, 63)),
                max_size=200))
def test_block_manager_invariants(ops):
    blocks = BlockManager(16, 4)
    owners: list[list[int]] = []
    for op, x in ops:
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
