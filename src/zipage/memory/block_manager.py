"""The engine's page owner: every change to a sequence's pages goes through ``BlockManager``.

It wraps the one allocator (``PagePool``, fixed size) and keeps prefix caching beside it
(vLLM / nano-vllm style): every full prompt page gets a hash chained from the previous page's
hash and its own token ids. A page whose hash is registered can be shared by later requests
with the same prefix (reference count above one). A page whose count drops to zero goes back
to the free list but keeps its hash, so a later request can revive it until the page is handed
out for something else. Shared pages are never written: new tokens always go to pages of their
own, and a sequence whose pages are shared is compacted into fresh pages.

A model with sliding-window layers keeps their pages apart (``window_blocks.WindowBlocks``, in
``self.window``): reserved before each step, trimmed to the window when a step stands, freed with
the sequence. Prefix caching is off for such models (a cached prefix would need the sliding layers'
KV of the tokens just before its end, which they dropped).

Who calls what: the scheduler decides (``reserve``, ``free``, ``match_prefix``,
``fresh_pages``, ``prepare_in_place``), the step loop records what a forward wrote
(``append``, ``register_prefix``) and what a compaction left (``compacted``). Nothing else
writes ``seq.pages``, ``seq.stored`` or ``seq.cached_pages``.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from .pool import PagePool
from .window_blocks import WindowBlocks

if TYPE_CHECKING:  # (the engine's Sequence; memory/ imports nothing from the engine at run time)
    from ..engine.sequence import Sequence


def page_hash(prev: bytes | None, tokens: list[int]) -> bytes:
    """Hash of a full page of token ids, chained to the hash of the page before it."""
    h = hashlib.blake2b(digest_size=16)
    h.update(prev or b"\0")
    h.update(b",".join(str(t).encode() for t in tokens))
    return h.digest()


class BlockManager:
    """Pages of the engine's sequences: allocation, reference counts, prefix hashes."""

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True,
                 window: WindowBlocks | None = None) -> None:
        if num_pages < 1:
            raise ValueError(f"the KV pool needs at least one page, got num_pages={num_pages}")
        self.pool = PagePool(num_pages)
        self.page_size = page_size
        self.window = window  # the sliding-window layers' pages, for a model that has such layers
        self.enable_prefix_caching = enable_prefix_caching and window is None
        self.hash_of: list[bytes | None] = [None] * num_pages
        self.page_of: dict[bytes, int] = {}
        self.hits = 0  # prompt pages served from the cache

    # ----------------------------------------------------------------------------- pages
    @property
    def num_pages(self) -> int:
        return self.pool.num_pages

    @property
    def num_free(self) -> int:
        return self.pool.num_free

    @property
    def num_used(self) -> int:
        return self.pool.num_used

    @property
    def refs(self) -> list[int]:
        return self.pool.refs

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` pages (least recently freed first); their old hashes are forgotten."""
        pages = self.pool.allocate(n)
        for p in pages:
            self._forget(p)
        return pages

    def release(self, pages: list[int]) -> None:
        """Drop one reference to each page; at zero it is free again (its hash stays, for revival)."""
        self.pool.free(pages)

    def is_shared(self, page: int) -> bool:
        return self.pool.refcount(page) > 1

    def is_registered(self, page: int) -> bool:
        return self.hash_of[page] is not None

    # ----------------------------------------------------------------------------- sequences
    def reserve(self, seq: Sequence, tokens: int) -> None:
        """Make ``seq`` hold pages for ``tokens`` stored tokens (it may already hold more)."""
        need = self.pages_for(tokens) - len(seq.pages)
        if need > 0:
            seq.pages.extend(self.allocate(need))

    def free(self, seq: Sequence) -> None:
        """Give back every page of ``seq``."""
        self.release(seq.pages)
        seq.pages = []
        seq.cached_pages = 0
        if self.window is not None:
            self.window.free(seq)

    def reserve_window(self, seq: Sequence, n: int) -> None:
        """Before a forward that computes ``seq``'s next ``n`` tokens: their sliding-window pages."""
        if self.window is not None:
            self.window.reserve(seq, seq.num_computed + n)

    def append(self, seq: Sequence, n: int) -> None:
        """Record that a forward wrote the KV of ``seq``'s next ``n`` tokens into its pages."""
        if seq.stored + n > len(seq.pages) * self.page_size:
            raise RuntimeError(f"request {seq.request_id!r} wrote past its pages")
        seq.num_computed += n
        seq.stored += n
        if self.window is not None:  # the pages that left the window of its next query go back
            self.window.trim(seq)

    def fresh_pages(self, tokens: int) -> list[int]:
        """Destination pages of a compaction into fresh pages."""
        return self.allocate(self.pages_for(tokens))

    def prepare_in_place(self, seq: Sequence, kept: int) -> None:
        """Before compacting ``seq`` in place: the pages it keeps are rewritten (the tail page
        too, by the next token), so no request may find them cached any more."""
        for p in seq.pages[: self.pages_for(kept + 1)]:
            self._forget(p)

    def compacted(self, seq: Sequence, kept: int, fresh: list[int] | None) -> None:
        """After a compaction that kept ``kept`` tokens (in place, or into ``fresh`` pages)."""
        if fresh is not None:
            self.release(seq.pages)
            seq.pages = fresh
        else:  # the surplus pages go back (the tail page keeps room for the next token)
            keep = self.pages_for(kept + 1)
            self.release(seq.pages[keep:])
            del seq.pages[keep:]
        seq.stored = kept
        seq.cached_pages = 0

    # ----------------------------------------------------------------------------- prefix cache
    def prompt_hashes(self, prompt: list[int], pages: int) -> list[bytes]:
        hashes, prev = [], None
        p = self.page_size
        for i in range(pages):
            prev = page_hash(prev, prompt[i * p : (i + 1) * p])
            hashes.append(prev)
        return hashes

    def match_prefix(self, seq: Sequence, recompute_tail: int = 0) -> None:
        """Give a new sequence the cached pages of its prompt's longest cached prefix. The last
        prompt token, and the last ``recompute_tail`` ones, are always computed again."""
        if not self.enable_prefix_caching:
            return
        n = len(seq.prompt_token_ids)
        reusable = max(0, min(n - 1, n - recompute_tail)) // self.page_size
        for h in self.prompt_hashes(seq.prompt_token_ids, reusable):
            page = self.page_of.get(h)
            if page is None:
                break
            if self.pool.is_free(page):
                self.pool.revive(page)
            else:
                self.pool.share(page)
            self.hits += 1
            seq.pages.append(page)
            seq.num_computed += self.page_size
            seq.stored += self.page_size
            seq.cached_pages += 1

    def register_prefix(self, seq: Sequence) -> None:
        """After a prefill chunk: make the sequence's newly completed prompt pages shareable."""
        if not self.enable_prefix_caching or seq.compressions:
            return
        full = min(seq.num_computed, len(seq.prompt_token_ids)) // self.page_size
        if full <= seq.cached_pages:
            return
        hashes = self.prompt_hashes(seq.prompt_token_ids, full)
        for i in range(seq.cached_pages, full):
            page, h = seq.pages[i], hashes[i]
            if h not in self.page_of and self.hash_of[page] is None:
                self.hash_of[page] = h
                self.page_of[h] = page
        seq.cached_pages = full

    def _forget(self, page: int) -> None:
        h = self.hash_of[page]
        if h is not None:
            self.hash_of[page] = None
            if self.page_of.get(h) == page:
                del self.page_of[h]

    def check(self, owners: list[list[int]]) -> None:
        """Assert the invariants against the page lists of every live sequence (tests use this)."""
        self.pool.check(owners)
        for h, p in self.page_of.items():
            assert self.hash_of[p] == h, "hash table out of sync"
