"""The scheduler short of pages: only uncompressed sequences are preempted; compressed ones wait.

Each test builds the scheduler's state by hand (sequences, their pages, the pool) in a situation
an engine reaches, and checks one decision of ``Scheduler.schedule``.
"""

from __future__ import annotations

import pytest

from zipage import SamplingParams
from zipage.config import ZipageConfig
from zipage.engine.scheduler import Scheduler
from zipage.engine.sequence import Sequence, Status
from zipage.memory import BlockManager

CFG = ZipageConfig(budget=4, buffer=4, page_size=2, window=1)  # capacity 8: N_max = 4 pages


def scheduler(num_pages: int) -> Scheduler:
    return Scheduler(BlockManager(num_pages, CFG.page_size), CFG, max_num_seqs=8, max_num_batched_tokens=64)


def running(s: Scheduler, rid: str, prompt: list[int], outputs: int, stored: int, arrival: int,
            compressions: int = 0, shared: list[int] = ()) -> Sequence:
    """A running sequence that decodes next (all its tokens but the last computed), holding the
    pages ``shared`` (taken from the cache) and fresh ones for the rest of ``stored``."""
    seq = Sequence(rid, list(prompt), SamplingParams(max_tokens=100), arrival=arrival)
    seq.output_ids = [7] * outputs
    seq.num_computed, seq.stored, seq.compressions = seq.num_tokens - 1, stored, compressions
    for p in shared:
        s.blocks.pool.share(p)
    seq.pages = list(shared) + s.blocks.allocate(s.pages_for(stored) - len(shared))
    seq.cached_pages = len(shared)
    seq.status, seq.slot = Status.RUNNING, s.free_slots.pop()
    s.running.append(seq)
    return seq


def check_pool(s: Scheduler, step) -> None:
    s.blocks.check([q.pages for q in s.running] + list(step.fresh_pages.values()))


def test_short_of_pages_a_compressed_sequence_is_never_preempted():
    """D and B share their 9-token prompt's pages and are both due for their first compression,
    which must compact into fresh pages (3 each); C, newer but already compressed (B was preempted
    and recomputed after C came), is due for its second. 2 pages are free: B, the newest
    uncompressed sequence, is preempted (its pages no longer shared, D compacts as planned); the
    newest sequence overall, C, is not (it was, hitting an assertion)."""
    s = scheduler(12)
    prompt = list(range(10, 19))
    d = running(s, "D", prompt, outputs=1, stored=9, arrival=0)
    s.blocks.register_prefix(d)  # its 4 full prompt pages become shareable
    b = running(s, "B", prompt, outputs=1, stored=9, arrival=1, shared=d.pages[:4])
    c = running(s, "C", [3, 4, 5], outputs=11, stored=8, arrival=2, compressions=1)
    assert s.blocks.num_free == 2 and s.max_concurrency == 3
    step = s.schedule()
    assert b.status is Status.WAITING and b.pages == [] and s.preemptions == 1
    assert c in s.running and c.compressions == 1
    assert {id(q) for q in step.compress} == {id(d), id(c)} and step.decode == [d, c]
    check_pool(s, step)


def test_a_compressed_sequence_waits_for_a_compression_in_flight():
    """A (compressed) needs a page; B's compression (its 10-token prompt, 5 pages) is in flight and
    holds the rest of the pool. A sits out, keeping its pages, and nothing is admitted (it was a
    "cannot hold" error); once B's compression lands, A goes on."""
    s = scheduler(8)
    a = running(s, "A", [3, 4, 5], outputs=4, stored=6, arrival=0, compressions=1)
    b = running(s, "B", list(range(20, 30)), outputs=1, stored=10, arrival=1)
    b.compressing = True
    s.add(Sequence("E", [3, 4], SamplingParams(max_tokens=5), arrival=2))
    assert s.blocks.num_free == 0
    pages = list(a.pages)
    step = s.schedule()
    assert step.empty and not step.compress and a.pages == pages and s.preemptions == 0 and s.waits == 1
    assert [q.request_id for q in s.running] == ["A", "B"] and len(s.waiting) == 1
    # B's compression lands (what the engine books then): 3 pages kept, 2 freed
    s.blocks.release(b.pages[3:])
    del b.pages[3:]
    b.compressing, b.stored, b.compressions = False, CFG.budget, 1
    step = s.schedule()
    assert step.decode == [a, b] and len(a.pages) == 4 and s.preemptions == 0
    check_pool(s, step)


def test_preempting_a_compressed_sequence_is_refused():
    s = scheduler(12)
    c = running(s, "C", [3, 4, 5], outputs=6, stored=6, arrival=0, compressions=1)
    with pytest.raises(ValueError, match="cannot be preempted: it has been compressed"):
        s.preempt(c)
    assert c in s.running and c.pages


def test_a_request_that_can_never_run_ends_with_an_error_instead_of_spinning():
    """Pages taken from the pool behind the scheduler's back (a state the engine never reaches):
    the one running request cannot get a page and nothing is in flight; it ends with reason
    "error" and says why, rather than every later step doing nothing."""
    s = scheduler(6)
    a = running(s, "A", list(range(20, 27)), outputs=1, stored=4, arrival=0)
    a.num_computed = 4  # in its prefill
    s.blocks.allocate(s.blocks.num_free)
    step = s.schedule()
    assert step.empty and a.finish_reason == "error" and "cannot hold" in a.output().error
    assert a.pages == [] and not s.running
    assert s.ended == [a]


def test_the_engine_reports_a_request_the_scheduler_ended(llama):
    from zipage import LLM

    llm = LLM(llama, num_pages=6, max_num_batched_tokens=4, async_scheduling=False, **{
        "budget": 4, "buffer": 4, "page_size": 2, "window": 1})
    rid = llm.add_request(list(range(20, 27)), SamplingParams(max_tokens=5, temperature=0))
    llm.step()  # a first chunk of its prompt
    llm.blocks.allocate(llm.blocks.num_free)  # (behind the scheduler's back)
    outs = llm.step()
    assert llm.output(rid).finish_reason == "error"
    assert [(o.request_id, o.finish_reason) for o in outs] == [(rid, "error")]
    assert "cannot hold" in outs[0].error
