"""The compression-aware scheduler: who runs this step, who is compressed, who waits.

Rules (the Zipage paper's, plus chunked prefill):
- With a budget, a sequence never needs more than ``N_max = ceil((budget + buffer) / page)``
  pages once its prompt is compressed, so at most ``num_pages // N_max`` run at once and every
  admitted request can finish. Without a budget (full KV) concurrency is bounded by
  ``max_num_seqs`` and pages run out: then the newest uncompressed sequences are preempted
  (freed, recomputed later).
- A sequence is compressed before the step in which its next token would pass
  ``budget + buffer``; compressed sequences are never preempted (recomputing them would not
  reproduce the same cache).
- Prefill is chunked: each step carries at most ``max_num_batched_tokens`` tokens, decoding
  sequences first, so a long prompt never stalls decoding.
- Prefix caching: full prompt pages are shared through chained hashes; shared pages are
  never written. A first compression of a sequence holding shared pages compacts into fresh
  pages; so does one holding cached (shareable) pages while the pool has room, which keeps
  the prefix for later requests; otherwise it compacts in place and forgets those hashes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..config import ZipageConfig
from ..memory.block_manager import BlockManager, page_hash
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
        self.max_num_batched_tokens = max_num_batched_tokens
        if zipage_config is not None:
            n_max = -(-zipage_config.capacity // self.page)
            self.max_concurrency = max(1, min(max_num_seqs, blocks.num_pages // n_max))
        else:
            self.max_concurrency = max_num_seqs
        self.free_slots = list(range(self.max_concurrency))[::-1]
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.compressions = 0

    # ----------------------------------------------------------------------------- bookkeeping
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page)

    def needs_compression(self, seq: Sequence) -> bool:
        c = self.cfg
        return c is not None and seq.stored > c.budget and seq.stored + 1 > c.capacity

    def release(self, seq: Sequence) -> None:
        """Give back a sequence's pages and query slot."""
        self.blocks.release(seq.pages)
        seq.pages = []
        seq.cached_pages = 0
        if seq.slot >= 0:
            self.free_slots.append(seq.slot)
            seq.slot = -1

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.release(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    def preempt(self, seq: Sequence) -> None:
        """Free an uncompressed sequence; it is recomputed from its tokens when readmitted."""
        assert seq.compressions == 0, "compressed sequences are never preempted"
        self.running.remove(seq)
        self.release(seq)
        seq.status = Status.WAITING
        seq.num_computed = seq.stored = 0
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _preempt_for(self, pages_needed: int, protect: set[int]) -> bool:
        """Preempt the newest uncompressed running sequences (not in ``protect``) until enough pages are free."""
        while self.blocks.num_free < pages_needed:
            victims = [s for s in self.running if s.compressions == 0 and not s.compressing and id(s) not in protect]
            if not victims:
                return False
            self.preempt(max(victims, key=lambda s: s.arrival))
        return True

    # ----------------------------------------------------------------------------- prefix cache
    def prompt_hashes(self, seq: Sequence, upto: int) -> list[bytes]:
        hashes, prev = [], None
        for i in range(upto):
            prev = page_hash(prev, seq.prompt_token_ids[i * self.page : (i + 1) * self.page])
            hashes.append(prev)
        return hashes

    def _reuse_prefix(self, seq: Sequence) -> None:
        if not self.blocks.enable_prefix_caching:
            return
        reusable = (len(seq.prompt_token_ids) - 1) // self.page  # always compute the last token
        for h in self.prompt_hashes(seq, reusable):
            page = self.blocks.cached(h)
            if page is None:
                break
            self.blocks.acquire(page)
            seq.pages.append(page)
            seq.num_computed += self.page
            seq.stored += self.page
            seq.cached_pages += 1

    def register_prefix(self, seq: Sequence) -> None:
        """After a prefill chunk: make the sequence's newly completed prompt pages shareable."""
        if not self.blocks.enable_prefix_caching or seq.compressions:
            return
        full = min(seq.num_computed, len(seq.prompt_token_ids)) // self.page
        if full <= seq.cached_pages:
            return
        hashes = self.prompt_hashes(seq, full)
        for i in range(seq.cached_pages, full):
            self.blocks.register(seq.pages[i], hashes[i])
        seq.cached_pages = full

    # ----------------------------------------------------------------------------- the decision
    def schedule(self) -> Step:
        step = Step()
        budget_tokens = self.max_num_batched_tokens
        # (a sequence whose last token is still on the device is done: it takes no further step)
        decoding = [s for s in self.running if not s.in_prefill and not s.compressing and not s.last_pending]
        # 1. compressions due before this step, and the pages each decoding sequence needs
        need = {}
        for seq in decoding:
            stored = seq.stored
            if self.needs_compression(seq):
                step.compress.append(seq)
                stored = self.cfg.budget
                shared = any(self.blocks.refs[p] > 1 for p in seq.pages)
                cached = any(self.blocks.is_registered(p) for p in seq.pages)
                fresh_n = self.pages_for(stored + 1)
                # Shared pages are only ever read: compact into fresh pages. Pages that are merely
                # cached are kept intact too while the pool has room, so later requests still find them.
                if shared or (cached and fresh_n + sum(need.values()) <= self.blocks.num_free):
                    step.fresh_pages[id(seq)] = []
                    need[id(seq)] = fresh_n
                    continue
                for p in seq.pages[:fresh_n]:  # rewritten in place: no request may find them cached now
                    self.blocks.unregister(p)
            need[id(seq)] = max(0, self.pages_for(stored + 1) - len(seq.pages))
        total = sum(need.values())
        if total > self.blocks.num_free:
            protect = {id(s) for s in decoding if s.compressions or s in step.compress}
            self._preempt_for(total, protect)
            decoding = [s for s in decoding if s.status is Status.RUNNING]
            step.compress = [s for s in step.compress if s.status is Status.RUNNING]
            total = sum(need[id(s)] for s in decoding)
            if total > self.blocks.num_free:
                # only sequences being compressed are left to free: preempt the newest of them
                while total > self.blocks.num_free and step.compress:
                    victim = max(step.compress, key=lambda s: s.arrival)
                    step.compress.remove(victim)
                    decoding.remove(victim)
                    step.fresh_pages.pop(id(victim), None)
                    total -= need[id(victim)]
                    self.preempt(victim)
                if total > self.blocks.num_free:
                    raise RuntimeError(
                        f"the KV pool ({self.blocks.num_pages} pages of {self.page}) cannot hold the running "
                        "requests; give the engine more pages or a smaller budget"
                    )
        for seq in decoding:
            if id(seq) in step.fresh_pages:
                step.fresh_pages[id(seq)] = self.blocks.allocate(need[id(seq)])
            elif need[id(seq)]:
                seq.pages.extend(self.blocks.allocate(need[id(seq)]))
        step.decode = decoding
        budget_tokens -= len(decoding)
        # 2. prefill chunks: running sequences still in prefill, then new admissions
        for seq in [s for s in self.running if s.in_prefill]:
            if budget_tokens <= 0:
                break
            n = self._chunk(seq, budget_tokens)
            if n:
                step.prefill.append((seq, n))
                budget_tokens -= n
        while self.waiting and budget_tokens > 0 and len(self.running) < self.max_concurrency and self.free_slots:
            seq = self.waiting[0]
            if seq.num_computed == 0 and not seq.pages:
                self._reuse_prefix(seq)
            n = self._chunk(seq, budget_tokens)
            if n == 0:
                if seq.pages:  # waiting sequences hold no pages: give back the prefix it just found
                    self.release(seq)
                    seq.num_computed = seq.stored = 0
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            seq.slot = self.free_slots.pop()
            self.running.append(seq)
            step.prefill.append((seq, n))
            budget_tokens -= n
        return step

    def _chunk(self, seq: Sequence, budget_tokens: int) -> int:
        """Tokens of ``seq`` to prefill now (allocating their pages), limited by the token budget and free pages."""
        n = min(seq.num_tokens - seq.num_computed, budget_tokens)
        have = len(seq.pages) * self.page - seq.stored
        if n > have:
            extra = min(self.pages_for(n - have), self.blocks.num_free)
            n = min(n, have + extra * self.page)
            if n <= 0:
                return 0
            seq.pages.extend(self.blocks.allocate(self.pages_for(n - have) if n > have else 0))
        return n
