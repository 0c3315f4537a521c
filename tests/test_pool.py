"""The page pool: allocation, reference counts and errors."""

from __future__ import annotations

import pytest

from zipage import OutOfPagesError, PagePool


def test_allocate_free_and_refcounts():
    pool = PagePool(4)
    a = pool.allocate(3)
    assert sorted(a) == [0, 1, 2] and pool.num_free == 1 and pool.num_used == 3
    pool.share(a[0])
    assert pool.refcount(a[0]) == 2
    pool.free(a)
    assert pool.num_free == 3 and pool.refcount(a[0]) == 1
    pool.free([a[0]])
    assert pool.num_free == 4 and pool.peak_used == 3


def test_fixed_pool_runs_out_and_growable_grows():
    with pytest.raises(OutOfPagesError, match="asked for 5 pages, only 4"):
        PagePool(4).allocate(5)
    pool = PagePool(2, growable=True)
    pages = pool.allocate(7)
    assert len(set(pages)) == 7 and pool.num_pages >= 7


def test_misuse_is_refused():
    pool = PagePool(2)
    with pytest.raises(ValueError, match="freed twice"):
        pool.free([0])
    with pytest.raises(ValueError, match="free and cannot be shared"):
        pool.share(1)
    with pytest.raises(IndexError, match="outside the pool"):
        pool.refcount(9)
    with pytest.raises(ValueError, match="num_pages"):
        PagePool(-1)
