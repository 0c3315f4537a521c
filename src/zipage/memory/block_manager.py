"""The engine's page pool: fixed size, reference counts, and prefix caching.

Prefix caching (vLLM / nano-vllm style): every full prompt page gets a hash
chained from the previous page's hash and its own token ids. A page whose hash
is registered can be shared by later requests with the same prefix (reference
count above one). A page whose count drops to zero goes back to the free list
but keeps its hash, so a later request can revive it until the page is handed
out for something else. Shared pages are never written: new tokens always go
to pages of their own, and a sequence's first compression writes its kept
tokens into fresh pages.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from .pool import OutOfPagesError


def page_hash(prev: bytes | None, tokens: list[int]) -> bytes:
    """Hash of a full page of token ids, chained to the hash of the page before it."""
    h = hashlib.blake2b(digest_size=16)
    h.update(prev or b"\0")
    h.update(b",".join(str(t).encode() for t in tokens))
    return h.digest()


class BlockManager:
    """Page ids with reference counts, an LRU free list and a hash table of cached pages."""

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True) -> None:
        if num_pages < 1:
            raise ValueError(f"the KV pool needs at least one page, got num_pages={num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.refs = [0] * num_pages
        self.free: OrderedDict[int, None] = OrderedDict((p, None) for p in range(num_pages))
        self.hash_of: list[bytes | None] = [None] * num_pages
        self.page_of: dict[bytes, int] = {}
        self.hits = 0  # prompt pages served from the cache

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self.free)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` pages (least recently freed first); their old hashes are forgotten."""
        if n > len(self.free):
            raise OutOfPagesError(f"asked for {n} pages, only {len(self.free)} of {self.num_pages} are free")
        pages = []
        for _ in range(n):
            p, _ = self.free.popitem(last=False)
            self._forget(p)
            self.refs[p] = 1
            pages.append(p)
        return pages

    def release(self, pages: list[int]) -> None:
        """Drop one reference to each page; at zero it is free again (its hash stays, for revival)."""
        for p in pages:
            if self.refs[p] <= 0:
                raise ValueError(f"page {p} released more often than it was taken")
            self.refs[p] -= 1
            if self.refs[p] == 0:
                self.free[p] = None

    def cached(self, h: bytes) -> int | None:
        """The page holding the prefix with hash ``h``, if any (in use or free but not yet reused)."""
        return self.page_of.get(h) if self.enable_prefix_caching else None

    def acquire(self, page: int) -> None:
        """Take a reference to a cached page (reviving it from the free list if needed)."""
        if self.refs[page] == 0:
            del self.free[page]
        self.refs[page] += 1
        self.hits += 1

    def register(self, page: int, h: bytes) -> None:
        """Record that ``page`` holds the full prompt page with hash ``h``."""
        if not self.enable_prefix_caching or h in self.page_of or self.hash_of[page] is not None:
            return
        self.hash_of[page] = h
        self.page_of[h] = page

    def is_registered(self, page: int) -> bool:
        return self.hash_of[page] is not None

    def unregister(self, page: int) -> None:
        """Forget a page's hash (its content is about to change)."""
        self._forget(page)

    def _forget(self, page: int) -> None:
        h = self.hash_of[page]
        if h is not None:
            self.hash_of[page] = None
            if self.page_of.get(h) == page:
                del self.page_of[h]

    def check(self, owners: list[list[int]]) -> None:
        """Assert the invariants against the page lists of every live sequence (tests use this)."""
        counts = [0] * self.num_pages
        for pages in owners:
            for p in pages:
                counts[p] += 1
        assert counts == self.refs, "reference counts differ from the owners' page lists"
        assert set(self.free) == {p for p in range(self.num_pages) if self.refs[p] == 0}, "free list out of sync"
        for h, p in self.page_of.items():
            assert self.hash_of[p] == h, "hash table out of sync"
