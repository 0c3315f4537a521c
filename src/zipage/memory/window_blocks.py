"""The engine's pages for sliding-window layers: each sequence keeps only its window.

A model whose ``config.layer_types`` mixes ``sliding_attention`` and ``full_attention`` layers
keeps the KV of its sliding layers in a pool of their own, with a page table per sequence
(``seq.window_pages``) whose slot 0 holds logical position ``seq.window_offset``. Before a step,
``reserve`` gives the sequence the pages its new tokens need; once the step stands, ``trim`` frees
the pages that lie wholly before the window of the sequence's next query (positions
``< num_computed - window + 1``). Those layers are never scored nor compacted.

So a running sequence holds at most ``pages_for(window) + 2`` pages between steps, plus the pages
of the tokens a step adds (at most ``max_num_batched_tokens`` over all sequences), and the pool is
sized for that worst case (``pool_pages``): it never runs out, and the scheduler, which plans the
full layers' pages, never has to look at it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .pool import PagePool

if TYPE_CHECKING:
    from ..engine.sequence import Sequence


class WindowBlocks:
    """Sliding-window pages of the engine's sequences (see the module docstring)."""

    def __init__(self, num_pages: int, page_size: int, window: int) -> None:
        self.pool = PagePool(num_pages)
        self.page_size = page_size
        self.window = window

    @staticmethod
    def pool_pages(max_num_seqs: int, max_num_batched_tokens: int, page_size: int, window: int) -> int:
        """Pages that the running sequences can hold at once, at most."""
        per_seq = -(-window // page_size) + 3  # the window, misaligned, its next token's page, a partial chunk page
        return max_num_seqs * per_seq + -(-max_num_batched_tokens // page_size)

    def table_width(self) -> int:
        """Most pages a decoding sequence holds (the window, misaligned, and the new token)."""
        return -(-(self.window + self.page_size) // self.page_size) + 1

    def offset_for(self, seen: int) -> int:
        """Slot 0's position for a sequence whose next query is at position ``seen``: the start of the
        page holding the first key that query sees."""
        return max(0, seen - self.window + 1) // self.page_size * self.page_size

    def reserve(self, seq: Sequence, end: int) -> None:
        """Make ``seq`` hold pages for positions up to ``end`` (exclusive)."""
        need = -(-(end - seq.window_offset) // self.page_size) - len(seq.window_pages)
        if need > 0:
            seq.window_pages.extend(self.pool.allocate(need))

    def trim(self, seq: Sequence) -> None:
        """Free the pages that left the window of ``seq``'s next query."""
        offset = self.offset_for(seq.num_computed)
        drop = (offset - seq.window_offset) // self.page_size
        if drop > 0:
            self.pool.free(seq.window_pages[:drop])
            del seq.window_pages[:drop]
            seq.window_offset = offset

    def free(self, seq: Sequence) -> None:
        self.pool.free(seq.window_pages)
        seq.window_pages = []
        seq.window_offset = 0

    def slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Flat slots of positions ``start..end-1`` of ``seq``."""
        p, off, pages = self.page_size, seq.window_offset, seq.window_pages
        return [pages[(t - off) // p] * p + (t - off) % p for t in range(start, end)]
