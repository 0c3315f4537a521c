"""The sliding-window layers of a ``ZipageCache``: they keep exactly their window, never scored.

A model that mixes ``sliding_attention`` and ``full_attention`` layers (``config.layer_types``:
Gemma 3, GPT-OSS, Qwen2 with ``use_sliding_window``) has its full layers compressed to the budget
by ``ZipageCache`` and its sliding layers here: one page table per batch row for all of them (every
row and sliding layer holds the same positions), pools stacked over the sliding layers. Slot 0
holds logical position ``offset``; before each step, the pages that lie wholly before the window of
the step's first query (positions ``< seen - window + 1``) are freed and ``offset`` moves on by
whole pages, so a row never holds more than ``window - 1 + q`` tokens plus one partial page.

The model's own attention runs on the dense keys and values of the stored slots, with the mask
transformers builds from ``get_mask_sizes``: ``(stored + q, offset)``, so its sliding-window mask
(and the padding columns of a 2-D attention mask) line up with the stored positions exactly, as
with ``DynamicSlidingWindowLayer``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import CacheLayerMixin

from .kernels import gather_kv, slot_indices, store_kv
from .memory.pool import PagePool

if TYPE_CHECKING:
    from .cache import ZipageCache


class WindowPages:
    """Pages of the sliding layers of one cache: a growable pool, one page table per row."""

    def __init__(self, num_layers: int, window: int, page_size: int) -> None:
        self.num_layers = num_layers
        self.window = window
        self.page_size = page_size
        self.pool = PagePool(0, growable=True)
        self.rows: list[list[int]] = []
        self.table: torch.Tensor | None = None  # [B, pages] int64
        self.offset = 0  # logical position of slot 0
        self.k_pool: torch.Tensor | None = None  # [L_sliding, num_pages, page_size, H_kv, D]
        self.v_pool: torch.Tensor | None = None
        self.slots: torch.Tensor | None = None  # [B, stored + q] flat slots of this step

    def offset_for(self, seen: int) -> int:
        """Slot 0's position once a step starts with ``seen`` tokens: the page holding the first key
        that the step's first query can see (``seen - window + 1``)."""
        first = max(0, seen - self.window + 1)
        return first // self.page_size * self.page_size

    def begin(self, batch: int, q: int, seen: int, like: torch.Tensor) -> None:
        """Before a step of ``q`` tokens: free the pages that left the window, give every row the pages
        the step needs, and compute the step's slots."""
        if not self.rows:
            self.rows = [[] for _ in range(batch)]
        offset = self.offset_for(seen)
        drop = (offset - self.offset) // self.page_size
        if drop > 0:
            for pages in self.rows:
                self.pool.free(pages[:drop])
                del pages[:drop]
            if self.k_pool is not None and self.pool.num_pages > 2 * self.pool.num_used + 2:
                self._shrink()  # (a long prompt's pages left the window: hold what the window needs, not them)
        self.offset = offset
        end = seen + q - offset
        need = -(-end // self.page_size) - len(self.rows[0])
        if need > 0:
            for pages in self.rows:
                pages.extend(self.pool.allocate(need))
            self._grow(like)
        if drop > 0 or need > 0 or self.table is None:
            self.table = torch.tensor(self.rows, dtype=torch.long, device=like.device)
        self.slots = slot_indices(self.table, 0, end, self.page_size)

    def _grow(self, like: torch.Tensor) -> None:
        n = self.pool.num_pages
        if self.k_pool is None:
            shape = (self.num_layers, n, self.page_size, like.shape[1], like.shape[3])  # like: [B, H, q, D]
            self.k_pool = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self.v_pool = torch.zeros(shape, dtype=like.dtype, device=like.device)
        elif n > self.k_pool.shape[1]:
            grow = lambda t: torch.cat([t, t.new_zeros(t.shape[0], n - t.shape[1], *t.shape[2:])], dim=1)  # noqa: E731
            self.k_pool, self.v_pool = grow(self.k_pool), grow(self.v_pool)

    def _shrink(self) -> None:
        """Move the pages in use to the front of new, smaller pools (ids renumbered in every row): the freed pages
        of a prompt longer than the window would otherwise stay allocated for the rest of the run, and the
        sliding layers would hold more than a full cache's (which keeps only the window)."""
        live = [p for pages in self.rows for p in pages]
        index = torch.tensor(live, dtype=torch.long, device=self.k_pool.device)
        self.k_pool = self.k_pool.index_select(1, index)
        self.v_pool = self.v_pool.index_select(1, index)
        self.pool = PagePool(len(live), growable=True)
        self.pool.allocate(len(live))  # ids 0 .. len(live) - 1, in the order of ``live``
        renumber = {old: new for new, old in enumerate(live)}
        self.rows = [[renumber[p] for p in pages] for pages in self.rows]
        self.table = None  # (rebuilt by begin)

    def store(self, index: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one layer's ``q`` new keys and values (``[B, H, q, D]``) after its kept ones; returns
        the dense keys and values of every stored slot (``[B, H, stored + q, D]``)."""
        q = keys.shape[2]
        if (keys.shape[1], keys.shape[3]) != tuple(self.k_pool.shape[3:]):
            raise ValueError(f"zipage needs the same number of KV heads and head dim in every sliding layer; got "
                             f"{(keys.shape[1], keys.shape[3])} after {tuple(self.k_pool.shape[3:])}")
        kp, vp = self.k_pool[index], self.v_pool[index]
        store_kv(kp, self.slots[:, -q:], keys.transpose(1, 2), vp, values.transpose(1, 2))
        return gather_kv(kp, self.slots).transpose(1, 2), gather_kv(vp, self.slots).transpose(1, 2)

    def reorder(self, idx: torch.Tensor) -> None:
        """Beam search: row ``i`` becomes old row ``idx[i]``."""
        if self.k_pool is None or self.slots is None:
            return
        slots = self.slots
        L, P, p = self.k_pool.shape[:3]
        for pool in (self.k_pool, self.v_pool):
            flat = pool.view(L, P * p, *pool.shape[3:])
            flat[:, slots] = flat[:, slots].index_select(1, idx.to(slots.device))

    def reset(self) -> None:
        self.pool = PagePool(0, growable=True)  # (a new pool: the next run allocates what it needs, not this one's)
        self.rows, self.table, self.slots, self.offset = [], None, None, 0
        self.k_pool = self.v_pool = None


class SlidingLayer(CacheLayerMixin):
    """A ``sliding_attention`` layer of a ``ZipageCache``: its window of keys and values, in pages."""

    is_sliding = True
    is_compileable = False
    is_croppable = False

    def __init__(self, cache: ZipageCache, layer_idx: int, index: int, pages: WindowPages) -> None:
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.index = index  # this layer's slice of the sliding pools
        self.pages = pages
        self.sliding_window = pages.window
        self.seen = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.cache._before_update(self.layer_idx, key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self.pages.store(self.index, key_states, value_states)
        self.seen += key_states.shape[2]
        return keys, values

    def stored(self) -> int:
        return self.seen - self.pages.offset

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        offset = self.pages.offset_for(self.seen)
        return self.seen - offset + query_length, offset

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.seen = 0
        self.keys = self.values = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("ZipageCache cannot be cropped (its sliding layers drop the tokens that left "
                                  "their window)")
