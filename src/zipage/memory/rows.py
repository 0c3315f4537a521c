"""Row-contiguous KV storage for ``generate()``: sized from the config, grown one layer at a time.

``generate()`` feeds every row of a batch the same number of tokens per step, so all rows and
layers of a ``ZipageCache`` store the same number ``S`` of tokens. Each layer keeps its keys and
values as ``[B, capacity, H, D]`` with row ``b``'s tokens at ``[b, :S]``, in order:

- attention reads ``[:, :S]`` as a view, so no step copies the stored tokens;
- in-place compaction keeps that order (kept indices ascend), so it needs no page table;
- the paged kernels read the same memory as pages of ``KERNEL_PAGE`` tokens (``as_pages``)
  through a page table that only counts (``row_page_table``).

Where no paged kernel reads them (the CPU, and 16-bit rows on CUDA, which SDPA attends), keys and
values are ``[B, H, capacity, D]`` in memory and the layer holds them as the ``[B, capacity, H, D]``
view of that (``resized(..., head_major=True)``): the same indexing, but attention reads each head's
``[:S]`` as one block, as from a ``DynamicCache``.

How much to hold (``plan_capacity``): a row never stores more than ``budget + buffer`` tokens
once its prompt is in (a longer prompt is compressed before the next token), nor more than the
tokens it will ever see, which ``generate()`` knows (``max_length``). Growth reallocates one
layer at a time in that layer's own update, so at most one layer's copy is in flight, like the
concatenation a ``DynamicCache`` does for one layer at every step; it adds ``1 / (2 * layers)``
of the length as slack, about one layer's worth of tokens across the model, and never goes past
the limit, so once the run reaches ``max_length`` the storage is exactly what the longest stored
state needs. That holds on the GPU too: where the run's end sets the limit and it is not a whole
number of kernel pages, the rows take exactly the limit and the last few steps attend densely from
the same storage (``plan_capacity(..., exact=True)``), rather than round every row of every layer
up to a page no token will fill. A compression that leaves less to hold (a long prompt compressed to the budget)
shrinks the storage the same way.
"""

from __future__ import annotations

import torch

KERNEL_PAGE = 16  # tokens per page as the CUDA paged kernels see a row (the smallest they take)
MIN_SLACK = 16  # a growth adds at least this many tokens, so short rows do not regrow every step


def stored_limit(stored: int, q: int, capacity: int, remaining: int | None) -> int:
    """The most tokens a row may store from this step on: it stores ``stored`` now (after any
    compression this step), takes ``q`` more, and will see ``remaining`` more tokens in all,
    this step's included (None: unknown). Past ``capacity`` (``budget + buffer``), a row is
    compressed before its next token, so it never grows beyond what it holds now."""
    peak = stored + q
    if peak > capacity:
        return peak
    limit = capacity if remaining is None else min(capacity, stored + max(remaining, q))
    return max(peak, limit)


def plan_capacity(current: int, need: int, limit: int, layers: int, granule: int = 1, decode: bool = True,
                  exact: bool = False) -> int:
    """Tokens per row to hold this step, rounded up to a multiple of ``granule`` (the kernels' page):
    when ``need`` does not fit in ``current``, ``need`` plus slack (``need / (2 * layers)``, at least
    ``MIN_SLACK``; none for a prefill, ``decode`` False, whose activations make the peak) capped at
    ``limit``; ``limit`` when ``current`` holds more than that slack beyond it (a compression left
    less to hold); else ``current``. ``exact``: ``limit`` is the last token the run will store, so it
    is never rounded up: rows grow in whole granules up to the last one that fits, and take exactly
    ``limit`` (the one result that may not be a multiple of ``granule``) only for the tokens past it;
    it only changes how rows grow."""
    up = lambda n: -(-n // granule) * granule  # noqa: E731
    slack = lambda n: max(n // (2 * layers), MIN_SLACK)  # noqa: E731
    cap = up(limit)
    if need > current:
        if exact:
            cap = limit // granule * granule
            if need > cap:
                return limit
        return min(up(need + slack(need)) if decode else up(need), cap)
    if current > cap + slack(cap):
        return cap
    return current


def resized(t: torch.Tensor | None, capacity: int, keep: int, head_major: bool = False) -> torch.Tensor | None:
    """``t`` (``[B, cap, ...]``) reallocated to ``capacity`` tokens per row, its first ``keep``
    copied. The slots past ``keep`` are left uninitialised: nothing reads beyond the stored tokens.
    ``head_major`` (``t`` ``[B, cap, H, D]``): the new memory is ``[B, H, capacity, D]``, returned as
    its ``[B, capacity, H, D]`` view."""
    if t is None or t.shape[1] == capacity:
        return t
    return _copied(t, capacity, keep, head_major)


def head_major_copy(t: torch.Tensor, keep: int) -> torch.Tensor:
    """``t`` (``[B, cap, H, D]``) moved to new ``[B, H, cap, D]`` memory (returned as its ``[B, cap, H, D]``
    view), its first ``keep`` tokens per row copied, the rest uninitialised (as in ``resized``)."""
    return _copied(t, t.shape[1], keep, True)


def _copied(t: torch.Tensor, capacity: int, keep: int, head_major: bool) -> torch.Tensor:
    if head_major:
        B, _, H, D = t.shape
        out = torch.empty(B, H, capacity, D, dtype=t.dtype, device=t.device).transpose(1, 2)
    else:
        out = torch.empty(t.shape[0], capacity, *t.shape[2:], dtype=t.dtype, device=t.device)
    out[:, :keep] = t[:, :keep]
    return out


def as_pages(t: torch.Tensor, page: int = KERNEL_PAGE) -> torch.Tensor:
    """``[B, cap, ...]`` seen as ``[B * cap / page, page, ...]`` (``cap`` a multiple of ``page``)."""
    return t.view(t.shape[0] * t.shape[1] // page, page, *t.shape[2:])


def row_page_table(batch: int, capacity: int, device, page: int = KERNEL_PAGE) -> torch.Tensor:
    """``[B, capacity / page]`` page ids of ``as_pages``: row ``b`` owns pages ``b * n .. b * n + n - 1``."""
    n = capacity // page
    return torch.arange(batch * n, device=device).view(batch, n)


def row_slots(batch: int, capacity: int, stored: int, device) -> torch.Tensor:
    """``[B, stored]`` flat slot ids of the stored tokens (``b * capacity + j``)."""
    return (torch.arange(batch, device=device) * capacity)[:, None] + torch.arange(stored, device=device)
