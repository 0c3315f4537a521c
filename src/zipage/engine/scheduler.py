"""The compression-aware scheduler: who runs this step, who is compressed, who waits.

Rules (the Zipage paper's, plus chunked prefill):
- With a budget, a sequence never needs more than ``N_max = ceil((budget + buffer) / page)``
  pages once its prompt is compressed, so at most ``num_pages // N_max`` run at once. Without a
  budget (full KV) concurrency is bounded by ``max_num_seqs``.
- Short of pages, the newest uncompressed sequence is preempted (freed, recomputed later): one
  not yet due for compression first, else one due for it. A compressed sequence is never
  preempted (recomputing it would not reproduce its cache), nor one whose compression is in
  flight. Before its first compression a sequence may hold more than ``N_max`` pages (a prompt
  longer than ``budget + buffer``, or a first compression compacting into fresh pages while it
  still holds the old ones); once no uncompressed sequence is left to preempt, the only ones
  beyond ``N_max`` pages are those whose compression is in flight, and they give pages back when
  it lands. Until then the newest compressed sequences that need a page sit out, keeping their
  pages, and no request is admitted. Without compressions in flight, the running sequences (at
  most ``num_pages // N_max``, each within ``N_max`` pages) always fit, so nobody waits forever.
  Without a budget every sequence can be preempted, and one alone always fits (``add_request``
  refuses a request whose peak exceeds the pool). So the scheduler never fails for want of pages;
  were nothing ever able to run with nothing in flight, it would end the newest request with
  reason ``"error"`` and say why in ``RequestOutput.error`` rather than spin (the property tests
  check that this does not happen).
- A sequence is compressed exactly where ``generate(cache_implementation="zipage")`` compresses
  it, whatever the chunking: generate prefills the whole prompt in one step and then stores one
  token per step, compressing before a step when ``stored > budget`` and ``stored + 1 > budget +
  buffer``; so the first compression comes at ``max(len(prompt), budget + 1, budget + buffer)``
  stored tokens, later ones at ``max(budget + 1, budget + buffer)`` (``compress_at``). A prefill
  chunk never carries a sequence past that point (a prompt prefill never reaches it; a recompute
  after a preemption stops there, is compressed, then goes on), and a sequence is never compressed
  before it (a prompt whose chunk stops one token short is not compressed early).
- Prefill is chunked: each step carries at most ``max_num_batched_tokens`` tokens, decoding
  sequences first, so a long prompt never stalls decoding.
- Per-request budgets: each sequence has its own budget (``SamplingParams.budget``; None is full
  KV), so its own compression point and worst case. With an engine budget, a request is admitted
  only if the pages set aside for the worst cases of the running ones plus its own fit in the
  pool (``worst_case_pages``), so every admitted request can finish; full-KV requests among them
  are preempted like the requests of a full-KV engine when pages run short. A full-KV engine
  (no budget) admits as long as its prefill fits and preempts when pages run out.
- ``n`` samples of one prompt: the later samples wait until the first has registered its prompt
  pages, then find them in the prefix cache.
- Prefix caching: full prompt pages are shared through chained hashes; shared pages are
  never written. A first compression of a sequence holding shared pages compacts into fresh
  pages; so does one holding cached (shareable) pages while the pool has room, which keeps
  the prefix for later requests; otherwise it compacts in place and forgets those hashes.
  When the scorer reads the window queries, the last ``window`` prompt tokens are always
  recomputed (never taken from the cache): the query ring of the request's slot must hold their
  queries, not those of the slot's previous occupant.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import ZipageConfig
from ..memory.block_manager import BlockManager
from ..scoring import get_scorer
from .sampling import ENGINE_BUDGET
from .sequence import Sequence, Status


@dataclass
class Step:
    """One scheduling decision."""

    compress: list[Sequence] = field(default_factory=list)
    fresh_pages: dict[int, list[int]] = field(default_factory=dict)  # id(seq) -> destination pages
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.prefill or self.decode)


class Scheduler:
    def __init__(self, blocks: BlockManager, zipage_config: ZipageConfig | None, max_num_seqs: int,
                 max_num_batched_tokens: int) -> None:
        self.blocks = blocks
        self.cfg = zipage_config
        self.page = blocks.page_size
        self.on_finish: Callable[[Sequence], None] | None = None  # (the engine's: the text of every finished one)
        self.on_release: Callable[[int], None] | None = None  # a query slot given back (the runner's per-slot state)
        self.max_num_batched_tokens = max_num_batched_tokens
        if zipage_config is not None:
            n_max = -(-zipage_config.capacity // self.page)
            # requests at the engine's budget that run at once; smaller budgets let more run
            self.max_concurrency = max(1, min(max_num_seqs, blocks.num_pages // n_max))
            self.num_slots = max(1, min(max_num_seqs, blocks.num_pages))
        else:
            self.max_concurrency = self.num_slots = max_num_seqs
        self.max_model_len = 1 << 62  # set by the engine (the longest logical length)
        self.reserved = 0  # pages set aside for the worst cases of the running sequences
        # tokens at the end of a prompt that prefix caching must recompute: the scorer reads their queries
        self.recompute_tail = 0
        if zipage_config is not None and get_scorer(zipage_config.scorer, zipage_config).needs_queries:
            self.recompute_tail = zipage_config.window
        self.free_slots = list(range(self.num_slots))[::-1]
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.compressions = 0
        self.evicted_tokens = 0  # tokens dropped by compressions
        self.waits = 0  # times a compressed sequence sat out a step for want of pages
        self.ended: list[Sequence] = []  # requests the scheduler itself ended, for the engine to report

    # ----------------------------------------------------------------------------- bookkeeping
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def budget(self, seq: Sequence) -> int | None:
        """``seq``'s budget, the engine's unless it has its own (resolved once, here)."""
        if seq.budget is ENGINE_BUDGET:
            seq.budget = self.cfg.budget if self.cfg is not None else None
        return seq.budget

    def pages_for(self, tokens: int) -> int:
        return self.blocks.pages_for(tokens)

    def compress_at(self, seq: Sequence) -> int:
        """Stored length at which ``seq`` is compressed before it stores another token: where
        generate() compresses (``ZipageConfig.next_compression`` at the sequence's own budget: the whole
        prompt first, then ``stored > budget`` and ``stored + 1 > budget + buffer``), independent of how
        its tokens were chunked."""
        b = self.budget(seq)
        return max(b if seq.compressions else len(seq.prompt_token_ids), b + 1, b + self.cfg.buffer)

    def needs_compression(self, seq: Sequence) -> bool:
        return self.budget(seq) is not None and seq.stored >= self.compress_at(seq)

    def worst_case_pages(self, seq: Sequence) -> int:
        """Pages set aside for ``seq`` while it runs: its whole length (prompt + ``max_tokens``, within
        ``max_model_len``), and with a budget no more than ``budget + buffer`` tokens or its prompt, whichever
        is longer (a request that ends before its budget is reached is never compressed: it needs only its
        length)."""
        whole = min(len(seq.prompt_token_ids) + seq.params.max_tokens, self.max_model_len)
        if self.budget(seq) is None:
            return self.pages_for(whole)
        return self.pages_for(min(whole, max(len(seq.prompt_token_ids) + 1, seq.budget + self.cfg.buffer)))

    def release(self, seq: Sequence) -> None:
        """Give back a sequence's pages and query slot."""
        self.blocks.free(seq)
        if seq.slot >= 0:
            slot, seq.slot = seq.slot, -1
            self.free_slots.append(slot)
            if self.on_release is not None:  # (after the slot is back: a hook that raises loses nothing)
                self.on_release(slot)

    def _unreserve(self, seq: Sequence) -> None:
        self.reserved -= seq.reserved
        seq.reserved = 0

    def finish(self, seq: Sequence, reason: str) -> None:
        self._unreserve(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        try:
            self.release(seq)
        finally:  # (a release hook that raised, a tensor-parallel group gone: the request is finished all the same)
            seq.status = Status.FINISHED
            seq.finish_reason = reason
            if self.on_finish is not None:
                self.on_finish(seq)

    def preempt(self, seq: Sequence) -> None:
        """Free an uncompressed sequence; it is recomputed from its tokens when readmitted."""
        if seq.compressions or seq.compressing:
            raise ValueError(f"request {seq.request_id!r} cannot be preempted: it has been compressed or its "
                             "compression is in flight (a recompute would not reproduce its cache)")
        self.running.remove(seq)
        self._unreserve(seq)
        self.release(seq)
        seq.status = Status.WAITING
        seq.num_computed = seq.stored = 0
        self.waiting.appendleft(seq)
        self.preemptions += 1

    # ----------------------------------------------------------------------------- the decision
    def schedule(self) -> Step:
        step, held = Step(), []
        try:
            return self._schedule(step, held)
        except BaseException:  # (an interrupt): the pages it took for nobody yet back, held samples back in line
            for pages in step.fresh_pages.values():
                if pages:
                    self.blocks.release(pages)
            self.waiting.extendleft(reversed(held))
            raise

    def _schedule(self, step: Step, held: list[Sequence]) -> Step:
        budget_tokens = self.max_num_batched_tokens
        # (a sequence whose last token is still on the device is done: it takes no further step)
        # A sequence due for compression goes this way even with several tokens left to compute (a
        # recompute whose prefill stopped at its compression point): compressed, then one token.
        decoding = [s for s in self.running if not s.compressing and not s.last_pending
                    and (not s.in_prefill or self.needs_compression(s))]
        # 1. compressions due before this step, and the pages each decoding sequence needs; short of
        # pages, free one uncompressed sequence at a time (``_victim``) and plan again: freeing a
        # sequence may end the sharing of another's pages, which can then be compacted in place. With
        # none left to free, the pages are held by compressions in flight: the newest compressed
        # sequence that needs a page sits out this step, keeping its pages, and no request is admitted.
        need = self._plan_pages(decoding, step)
        # ``deferred``: no request is admitted this step, as a sequence sits out for want of pages or one was
        # preempted (readmitted at once, the victim would take back the pages just freed and be preempted again)
        deferred = False
        while sum(need.values()) > self.blocks.num_free:
            victim = self._victim(step)
            deferred = True
            if victim is None:
                victim = max((s for s in decoding if need[id(s)]), key=lambda s: s.arrival)
                self.waits += 1
            else:
                self.preempt(victim)
            decoding = [s for s in decoding if s is not victim]
            need = self._plan_pages(decoding, step)
        compress = {id(s) for s in step.compress}
        for seq in decoding:
            if id(seq) in step.fresh_pages:
                step.fresh_pages[id(seq)] = self.blocks.fresh_pages(seq.budget + 1)
            elif id(seq) in compress:
                self.blocks.prepare_in_place(seq, seq.budget)
                self.blocks.reserve(seq, seq.budget + 1)
            else:
                self.blocks.reserve(seq, seq.stored + 1)
        step.decode = decoding
        budget_tokens -= len(decoding)
        # 2. prefill chunks: running sequences still in prefill, then new admissions
        for seq in [s for s in self.running if s.in_prefill and not s.compressing and not self.needs_compression(s)]:
            if budget_tokens <= 0:
                break
            n = self._chunk(seq, budget_tokens)
            if n:
                step.prefill.append((seq, n))
                budget_tokens -= n
        # ``held``: samples waiting for their first sibling's prompt pages. Their turn comes first: requests
        # behind them are admitted only with a slot and pages left over for them (``held_pages``)
        held_pages = 0
        while self.waiting and not deferred and budget_tokens > 0 and len(self.free_slots) > len(held):
            seq = self.waiting[0]
            worst = self.worst_case_pages(seq) if self.cfg is not None else 0
            if self._held(seq):
                held.append(self.waiting.popleft())
                held_pages += worst
                continue
            if self.reserved + held_pages + worst > self.blocks.num_pages:
                break  # admitted, it might not finish: it waits for running requests to end
            if seq.num_computed == 0 and not seq.pages:
                self.blocks.match_prefix(seq, self.recompute_tail)
            n = self._chunk(seq, budget_tokens)
            if n == 0:
                if seq.pages:  # waiting sequences hold no pages: give back the prefix it just found
                    self.blocks.hits -= seq.cached_pages  # (they served nobody: counted again when they do)
                    self.release(seq)
                    seq.num_computed = seq.stored = 0
                break
            self.waiting.popleft()
            seq.reserved = worst
            self.reserved += worst
            seq.status = Status.RUNNING
            seq.slot = self.free_slots.pop()
            seq.ring_from = seq.num_computed
            self.running.append(seq)
            step.prefill.append((seq, n))
            budget_tokens -= n
        self.waiting.extendleft(reversed(held))
        held.clear()
        if step.empty and self.running and not any(s.compressing or s.pending for s in self.running):
            # Nothing runs, nothing is in flight: every running sequence is stuck in its prefill for
            # want of pages the others hold. Free the newest uncompressed one so the older ones go on.
            victim = self._victim(step) if len(self.running) > 1 else None
            if victim is None:
                # Cannot happen (see the module docstring); rather than spin, end one request.
                victim = max(self.running, key=lambda s: s.arrival)
                victim.error = (f"the KV pool ({self.blocks.num_pages} pages of {self.page}) cannot hold the "
                                "running requests; give the engine more pages or a smaller budget")
                self.finish(victim, "error")
                self.ended.append(victim)
            else:
                self.preempt(victim)
            return self.schedule()
        return step

    def _held(self, seq: Sequence) -> bool:
        """A later sample of a request waits while its first sample computes the prompt (whose
        pages it will then share through the prefix cache)."""
        lead = seq.leader
        return (lead is not None and self.blocks.enable_prefix_caching and lead.status is Status.RUNNING
                and lead.num_computed < len(lead.prompt_token_ids) - 1)

    def _victim(self, step: Step) -> Sequence | None:
        """The sequence to preempt: the newest uncompressed one not due for compression, else the
        newest uncompressed one due for it; never a compressed one (recomputing it would not
        reproduce its cache), nor one whose compression is in flight (its pages are being read)."""
        due = {id(s) for s in step.compress}
        free = [s for s in self.running if s.compressions == 0 and not s.compressing]
        return max([s for s in free if id(s) not in due] or free, key=lambda s: s.arrival, default=None)

    def _plan_pages(self, decoding: list[Sequence], step: Step) -> dict[int, int]:
        """Fill ``step.compress`` / ``step.fresh_pages`` for ``decoding``; returns the pages each needs."""
        step.compress, step.fresh_pages = [], {}
        need: dict[int, int] = {}
        optional = []
        for seq in decoding:
            if self.needs_compression(seq):
                step.compress.append(seq)
                fresh_n = self.pages_for(seq.budget + 1)
                if any(self.blocks.is_shared(p) for p in seq.pages):
                    # shared pages are only ever read: compact into fresh pages
                    step.fresh_pages[id(seq)] = []
                    need[id(seq)] = fresh_n
                    continue
                if any(self.blocks.is_registered(p) for p in seq.pages):
                    optional.append(seq)
                need[id(seq)] = max(0, fresh_n - len(seq.pages))
            else:
                need[id(seq)] = max(0, self.pages_for(seq.stored + 1) - len(seq.pages))
        # Pages that are merely cached are kept intact too (compaction into fresh pages) while the
        # pool has room to spare, so later requests still find them; never at the cost of a preemption.
        spare = self.blocks.num_free - sum(need.values())
        for seq in optional:
            fresh_n = self.pages_for(seq.budget + 1)
            if fresh_n > spare:
                break
            step.fresh_pages[id(seq)] = []
            spare -= fresh_n - need[id(seq)]
            need[id(seq)] = fresh_n
        return need

    def _chunk(self, seq: Sequence, budget_tokens: int) -> int:
        """Tokens of ``seq`` to prefill now (allocating their pages), limited by the token budget, free
        pages and the sequence's next compression point (a chunk never stores past it)."""
        n = min(seq.num_tokens - seq.num_computed, budget_tokens)
        if self.budget(seq) is not None:
            n = min(n, self.compress_at(seq) - seq.stored)
            if n <= 0:
                return 0
        have = len(seq.pages) * self.page - seq.stored
        if n > have:
            extra = min(self.pages_for(n - have), self.blocks.num_free)
            n = min(n, have + extra * self.page)
            if n <= 0:
                return 0
            self.blocks.reserve(seq, seq.stored + n)
        return n
