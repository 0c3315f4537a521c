"""Whole prompts through PyTorch's fused attention: prompts padded to length buckets and batched.

A prompt with nothing stored before it (no cached prefix, not a later chunk) attends only to its own
keys and values, which the step holds packed ``[T, H_kv, D]`` beside its queries: it needs no page
reads. PyTorch's fused attention (cuDNN on Hopper) runs such prompts faster than the Triton prefill kernel
when it gets them as one batched call of equal lengths; one call per sequence, or its ragged form, builds a
new cuDNN plan for every new shape (50-75 ms of host time each on the H100).

So prompts are grouped by a length *bucket* (:func:`bucket_length`: a multiple of 128 tokens up to 1,024,
then eight buckets to each doubling, at most 1/8 of padding), each group split into batches of a power of
two, and each batch padded at the end to its bucket: the shapes a server meets stay few (a plan each,
built once), and causal attention keeps a real query from ever seeing a padded key (padding follows
every real token). A batch whose prompts all fill their bucket exactly and lie one after another in the
packed rows is read in place (views); others are copied into a zero-padded batch.

Measured on the H100 against gather + SDPA (``benchmarks/prefill_tune.py``, ``benchmarks/results/issue15/s45/``):
batches read in place 1.06-1.33x (prompts of 512-4,096 tokens, one length a case; the Triton kernel 0.64-0.69x);
copied batches slower than the Triton kernel at every length tried (ragged prompts of 384 to 10,240 tokens). The
engine uses this only where ``ZIPAGE_FRESH_PREFILL=1`` asks, and then for batches read in place (``runner.py``).

:func:`plan_fresh` makes the groups on the host from the prompts' lengths (no device sync);
:func:`fresh_prefill_attention` runs them. :func:`fresh_prefill_reference` is the dense PyTorch math.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

MAX_BATCH = 64  # sequences per call at most


def bucket_length(n: int) -> int:
    """The padded length of an ``n``-token prompt: a multiple of 128 up to 1,024, then a multiple of 1/8 of
    the power of two at or below ``n`` (so at most 1/8 of the bucket is padding)."""
    if n < 1:
        raise ValueError(f"bucket_length({n}): a prompt has at least one token")
    if n <= 1024:
        return -(-n // 128) * 128
    step = (1 << (n.bit_length() - 1)) // 8
    return -(-n // step) * step


@dataclasses.dataclass(frozen=True)
class FreshBatch:
    """One fused-attention call: prompts ``seqs`` (indices into the step's prompts), padded to ``length``.
    ``first_row`` is set when the batch is read in place: its prompts fill the bucket exactly and lie one
    after another from that packed row. Otherwise ``src`` holds the prompts' packed rows, in order, and
    ``dst`` their rows in the zero-padded ``[len(seqs) * length]`` batch (int64 tensors on the step's device)."""

    seqs: tuple[int, ...]
    length: int
    first_row: int | None
    src: torch.Tensor | None = None
    dst: torch.Tensor | None = None


def plan_fresh(q_lens: list[int], starts: list[int], device: torch.device | str = "cpu", copy_min: int | None = 0,
               max_batch: int = MAX_BATCH) -> list[FreshBatch]:
    """The calls for prompts of ``q_lens`` tokens whose queries start at packed rows ``starts``: by bucket,
    longest first, each bucket's prompts (those that fill it first) in batches of a power of two (largest first).
    A batch that must be copied (not read in place) is planned only if its bucket is ``copy_min`` tokens or
    longer (``None``: never); the prompts of the batches left out are not in the plan. One host-to-device copy
    for every batch's rows."""
    if len(q_lens) != len(starts):
        raise ValueError(f"plan_fresh: {len(q_lens)} lengths for {len(starts)} starts")
    if max_batch < 1:
        raise ValueError(f"plan_fresh: max_batch={max_batch} (must be >= 1)")
    by_bucket: dict[int, list[int]] = {}
    for i, n in enumerate(q_lens):
        by_bucket.setdefault(bucket_length(n), []).append(i)
    planned, rows, bounds = [], [], []  # (seqs, length, first_row); every copied batch's src + dst rows
    groups = []  # each bucket's prompts that fill it (they may batch in place), then the others
    for length in sorted(by_bucket, reverse=True):
        for fill in (True, False):
            groups.append((length, [i for i in by_bucket[length] if (q_lens[i] == length) == fill]))
    for length, seqs in groups:
        while seqs:
            size = min(1 << (len(seqs).bit_length() - 1), max_batch)
            take, seqs = tuple(seqs[:size]), seqs[size:]
            if all(q_lens[i] == length for i in take) and all(
                    starts[b] == starts[a] + length for a, b in zip(take, take[1:])):
                planned.append((take, length, starts[take[0]]))
            elif copy_min is not None and length >= copy_min:
                src = [r for i in take for r in range(starts[i], starts[i] + q_lens[i])]
                dst = [r for j, i in enumerate(take) for r in range(j * length, j * length + q_lens[i])]
                bounds.append((len(rows), len(src)))
                rows += src + dst
                planned.append((take, length, None))
    flat = torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True) if rows else None
    batches, k = [], 0
    for take, length, first in planned:
        if first is not None:
            batches.append(FreshBatch(take, length, first))
            continue
        a, n = bounds[k]
        k += 1
        batches.append(FreshBatch(take, length, None, flat[a:a + n], flat[a + n:a + 2 * n]))
    return batches


def _attend(qb, kb, vb, scale, backend):
    """SDPA on ``[B, L, H, D]`` batches (views as ``[B, H, L, D]``), causal from the first token."""
    args = (qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2))
    kw = dict(is_causal=True, scale=scale, enable_gqa=qb.shape[2] != kb.shape[2])
    if backend is None:
        return F.scaled_dot_product_attention(*args, **kw)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(*args, **kw)


def fresh_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batches: list[FreshBatch],
                            scale: float, out: torch.Tensor | None = None, backend=None) -> torch.Tensor:
    """Causal attention of each planned prompt over its own keys and values. ``q`` ``[T, Hq, D]``, ``k`` and
    ``v`` ``[T, Hkv, D]``, packed; ``batches`` from :func:`plan_fresh`; the rows of the planned prompts of
    ``out`` (``[T, Hq, D]``, new if not given) are written, no other. ``backend``: an ``SDPBackend`` (or list)
    to hold SDPA to, or ``None`` for PyTorch's choice. With no ``out`` and one in-place batch of every row, the
    result is SDPA's own output seen packed (no copy where SDPA writes it in the queries' layout)."""
    Hq, D = q.shape[1:]
    Hkv = k.shape[1]
    whole = len(batches) == 1 and batches[0].first_row == 0 and len(batches[0].seqs) * batches[0].length == len(q)
    if out is None and whole:
        n, L = len(batches[0].seqs), batches[0].length
        o = _attend(q.reshape(n, L, Hq, D), k.reshape(n, L, Hkv, D), v.reshape(n, L, Hkv, D), scale, backend)
        return o.transpose(1, 2).reshape(n * L, Hq, D)
    if out is None:
        out = torch.empty_like(q)
    for b in batches:
        n = len(b.seqs)
        if b.first_row is not None:
            rows = slice(b.first_row, b.first_row + n * b.length)
            o = _attend(q[rows].reshape(n, b.length, Hq, D), k[rows].reshape(n, b.length, Hkv, D),
                        v[rows].reshape(n, b.length, Hkv, D), scale, backend)
            out[rows] = o.transpose(1, 2).reshape(n * b.length, Hq, D)
            continue
        src, dst = b.src, b.dst
        padded = []
        for x, h in ((q, Hq), (k, Hkv), (v, Hkv)):
            p = x.new_zeros(n * b.length, h, D)
            p.index_copy_(0, dst, x.index_select(0, src))
            padded.append(p.view(n, b.length, h, D))
        o = _attend(*padded, scale, backend)
        out.index_copy_(0, src, o.transpose(1, 2).reshape(n * b.length, Hq, D).index_select(0, dst))
    return out


def fresh_prefill_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lens: list[int],
                            scale: float) -> torch.Tensor:
    """Dense float32 causal attention, one prompt after another (the packed rows in order)."""
    out = torch.empty_like(q)
    G = q.shape[1] // k.shape[1]
    a = 0
    for n in q_lens:
        qs, ks, vs = (x[a:a + n].float().transpose(0, 1) for x in (q, k, v))  # [H, n, D]
        ks, vs = ks.repeat_interleave(G, 0), vs.repeat_interleave(G, 0)
        s = qs @ ks.transpose(1, 2) * scale
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        out[a:a + n] = (s.softmax(-1) @ vs).transpose(0, 1).to(q.dtype)
        a += n
    return out
