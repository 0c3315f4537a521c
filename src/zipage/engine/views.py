"""Read-only views of a request's append-only lists, so a step's outputs cost O(1) per request.

A streaming engine reports every running request at every step; copying each one's tokens each time
costs O(n) per step and O(n^2) over an n-token answer (at 256 requests x 16K tokens, milliseconds
per step). A request's output ids (and prompt ids and log-probabilities) are only ever appended to,
so the first ``n`` items of the list are a snapshot that never changes: a view of them is as good as
a copy. Finished outputs are plain lists (copied once)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice
from typing import Any


class ListView(Sequence):
    """The first ``n`` items of an append-only list, read-only. Compares equal to a list or tuple
    with the same items; slicing gives a list; ``list(view)`` and ``view.copy()`` copy (a view is no
    ``list`` instance: ``json.dumps`` takes the copy)."""

    __slots__ = ("_items", "_n")

    def __init__(self, items: list, n: int | None = None) -> None:
        self._items = items
        self._n = len(items) if n is None else n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            start, stop, step = i.indices(self._n)
            if step > 0:
                return self._items[start:stop:step]
            return [self._items[k] for k in range(start, stop, step)]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError("index out of range")
        return self._items[i]

    def __iter__(self):
        return islice(self._items, self._n)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (ListView, list, tuple)):
            return len(other) == self._n and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  (like a list)

    def copy(self) -> list:
        """The items as a new list (as ``list.copy``)."""
        return self._items[: self._n]

    def __add__(self, other: Any) -> list:
        return list(self) + list(other)

    def __radd__(self, other: Any) -> list:
        return list(other) + list(self)

    def __repr__(self) -> str:
        return repr(list(self))
