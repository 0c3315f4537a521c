"""The page allocator: ids of fixed-size KV pages, with reference counts.

This is the one page allocator of the project: the engine's ``BlockManager`` wraps a fixed one and
adds prefix caching. (``generate()``'s cache needs no allocator: its rows are contiguous, see
``zipage.memory.rows``.)
The pool only hands out integers: the tensors that hold the pages live with whoever owns the
storage. A page is free when its reference count is zero; shared pages (prefix caching) have a
count above one. Free pages are handed out least recently freed first, so a freed page that
still holds a cached prefix survives as long as possible and can be taken back (``revive``).
"""

from __future__ import annotations

from collections import OrderedDict


class OutOfPagesError(RuntimeError):
    """Raised when a pool of fixed size has fewer free pages than requested."""


class PagePool:
    """A pool of ``num_pages`` page ids with reference counts.

    Args:
        num_pages: initial number of pages.
        growable: when True, ``allocate`` grows the pool by exactly the missing pages instead of
            failing; the engine uses a fixed pool.
    """

    def __init__(self, num_pages: int = 0, growable: bool = False) -> None:
        if isinstance(num_pages, bool) or not isinstance(num_pages, int) or num_pages < 0:
            raise ValueError(f"PagePool(num_pages={num_pages!r}): expected an int >= 0")
        self.growable = growable
        self._refs: list[int] = [0] * num_pages
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_pages))
        self.peak_used = 0

    # -- queries -----------------------------------------------------------------------------
    @property
    def num_pages(self) -> int:
        return len(self._refs)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._refs) - len(self._free)

    @property
    def refs(self) -> list[int]:
        """Every page's reference count (a copy)."""
        return list(self._refs)

    def refcount(self, page: int) -> int:
        self._check(page)
        return self._refs[page]

    def is_free(self, page: int) -> bool:
        return page in self._free

    # -- changes -----------------------------------------------------------------------------
    def grow(self, extra: int) -> None:
        """Add ``extra`` free pages at the end of the id range."""
        start = len(self._refs)
        self._refs.extend([0] * extra)
        self._free.update(OrderedDict.fromkeys(range(start, start + extra)))

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free pages (reference count 1 each), least recently freed first."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            if not self.growable:
                raise OutOfPagesError(f"asked for {n} pages, only {len(self._free)} of {self.num_pages} are free")
            self.grow(n - len(self._free))
        pages = [self._free.popitem(last=False)[0] for _ in range(n)]
        for p in pages:
            self._refs[p] = 1
        self.peak_used = max(self.peak_used, self.num_used)
        return pages

    def share(self, page: int) -> None:
        """Add a reference to a page that is already in use."""
        self._check(page)
        if self._refs[page] == 0:
            raise ValueError(f"page {page} is free and cannot be shared")
        self._refs[page] += 1

    def revive(self, page: int) -> None:
        """Take a free page back by its id (its content is still wanted: a cached prefix)."""
        self._check(page)
        if self._refs[page] != 0:
            raise ValueError(f"page {page} is in use and cannot be revived")
        del self._free[page]
        self._refs[page] = 1
        self.peak_used = max(self.peak_used, self.num_used)

    def free(self, pages: list[int]) -> None:
        """Drop one reference to each page; pages reaching zero go back to the pool."""
        for p in pages:
            self._check(p)
            if self._refs[p] == 0:
                raise ValueError(f"page {p} freed twice (released more often than it was taken)")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free[p] = None

    def check(self, owners: list[list[int]]) -> None:
        """Assert the invariants against every owner's page list (tests use this): each page's
        count is the number of times the owners hold it, and the free pages are those at zero."""
        counts = [0] * self.num_pages
        for pages in owners:
            for p in pages:
                counts[p] += 1
        assert counts == self._refs, "reference counts differ from the owners' page lists"
        assert set(self._free) == {p for p in range(self.num_pages) if self._refs[p] == 0}, "free list out of sync"

    def _check(self, page: int) -> None:
        if not 0 <= page < len(self._refs):
            raise IndexError(f"page id {page} outside the pool (0..{len(self._refs) - 1})")

    def __repr__(self) -> str:
        return f"PagePool(num_pages={self.num_pages}, used={self.num_used}, free={self.num_free})"
