"""The sampler: every row of a step in one batched pass on the device.

Per row, in vLLM's order: ``allowed_token_ids``, ``logit_bias``, ``min_tokens`` masks, penalties
(repetition over prompt + output, presence and frequency over the output), then greedy rows take the
argmax; sampled rows are divided by their temperature, filtered by ``min_p``, ``top_k`` and ``top_p``
(one sort of the rows that filter by rank, or a top-k when every row has a ``top_k``) and drawn by
inverting their cumulative distribution at one uniform number per row. A seeded row draws its number from its
own generator (one draw per step whatever else runs beside it, so its tokens do not depend on
the batch); unseeded rows share one batched draw. The only Python loop left runs over the
seeded rows, to call their generators. (An exponential race, ``argmax(probs / E)``, would need
``V`` random numbers per row: slower on a CPU, the same on a GPU.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .sampling import SamplingParams
from .sequence import Sequence

@dataclass
class Penalties:
    """The token history of the penalized rows of a step (``rows`` index the logits)."""

    rows: list[int]  # [m] rows of the logits
    in_prompt: torch.Tensor  # [m, V] bool
    counts: torch.Tensor  # [m, V] float32: occurrences in the output so far


@dataclass
class Sampled:
    """A step's tokens, and their log-probabilities when a row asked for them."""

    tokens: torch.Tensor  # [n] int64
    logprobs: torch.Tensor | None = None  # [n] float32: the sampled tokens'
    top_ids: torch.Tensor | None = None  # [n, k] int64: the most likely tokens, best first
    top_logprobs: torch.Tensor | None = None  # [n, k] float32


@dataclass
class LogitEdits:
    """A request's ``allowed_token_ids`` and ``logit_bias`` on the device, made once (the engine keeps them on
    the request)."""

    allowed: torch.Tensor | None  # [a] int64: the only tokens it may take
    tokens: torch.Tensor | None  # [k] int64: biased tokens
    values: torch.Tensor | None  # [k] float32: their biases

    @classmethod
    def of(cls, params: SamplingParams, device: torch.device) -> LogitEdits:
        allowed = bias = None
        if params.allowed_token_ids:
            allowed = torch.tensor(params.allowed_token_ids, dtype=torch.int64, device=device)
        if params.logit_bias:
            bias = (torch.tensor(list(params.logit_bias), dtype=torch.int64, device=device),
                    torch.tensor(list(params.logit_bias.values()), dtype=torch.float32, device=device))
        return cls(allowed, *(bias or (None, None)))


def _row_index(rows: list[int], sizes: list[int], device: torch.device) -> torch.Tensor:
    """``rows[j]`` repeated ``sizes[j]`` times, on the device (without a wait for the sizes)."""
    return torch.repeat_interleave(torch.tensor(rows, device=device), torch.tensor(sizes, device=device),
                                   output_size=sum(sizes))


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           suppress: list[list[int] | None] | None = None, penalties: Penalties | None = None,
           edits: list[LogitEdits | None] | None = None) -> Sampled:
    """One token per row of ``logits`` ([n, V]). ``suppress[i]`` lists token ids row ``i`` may not take
    (EOS and stop ids before ``min_tokens``). ``edits[i]``: row ``i``'s ``allowed_token_ids`` and
    ``logit_bias`` made already (``LogitEdits.of``), or ``[]`` when no row has either; left out (None), they
    are made here from the params."""
    if edits is None:
        edits = [LogitEdits.of(p, logits.device) if p.logit_bias or p.allowed_token_ids else None
                 for p in params] if any(p.logit_bias or p.allowed_token_ids for p in params) else []
    if (not edits and all(p.greedy and p.logprobs is None for p in params) and penalties is None
            and not (suppress and any(suppress))):
        return Sampled(logits.argmax(dim=-1))  # (each float upcast is exact: the same argmax, without a copy)
    raw = logits.float()
    dev = raw.device
    x = raw
    edited = [(i, e) for i, e in enumerate(edits) if e is not None]
    allowed = [(i, e.allowed) for i, e in edited if e.allowed is not None]
    if allowed:  # every other token of those rows -inf (the rows' allowed logits kept, the rows filled, put back)
        rows = _row_index([i for i, _ in allowed], [len(a) for _, a in allowed], dev)
        cols = torch.cat([a for _, a in allowed])
        kept = x[rows, cols]
        x = x.index_fill(0, torch.tensor([i for i, _ in allowed], device=dev), float("-inf"))
        x = x.index_put((rows, cols), kept)
    biased = [(i, e) for i, e in edited if e.tokens is not None]
    if biased:  # (one index_put for every biased row: the rows' token ids and values joined on the device)
        rows = _row_index([i for i, _ in biased], [len(e.tokens) for _, e in biased], dev)
        x = x.index_put((rows, torch.cat([e.tokens for _, e in biased])), torch.cat([e.values for _, e in biased]),
                        accumulate=True)
    if suppress is not None and any(suppress):
        rows = [i for i, ids in enumerate(suppress) if ids for _ in ids]
        cols = [t for ids in suppress if ids for t in ids]
        x = x.index_put((torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)),
                        torch.tensor(float("-inf"), device=dev))
    if penalties is not None:
        x = apply_penalties(x, penalties, [params[i] for i in penalties.rows])
    out = x.argmax(dim=-1)  # greedy rows are exact; a row whose probabilities break falls back to it
    picked = [i for i, p in enumerate(params) if not p.greedy]
    if picked:
        every = len(picked) == len(params)
        idx = None if every else torch.tensor(picked, device=dev)
        sub = x if every else x.index_select(0, idx)
        tokens = _draw(sub, [params[i] for i in picked], [generators[i] for i in picked])
        fallback = out if every else out.index_select(0, idx)
        tokens = torch.where(tokens < 0, fallback, tokens)
        out = tokens if every else out.index_copy(0, idx, tokens)
    result = Sampled(out)
    want = [p.logprobs for p in params if p.logprobs is not None]
    if want:
        lp = torch.log_softmax(raw, dim=-1)
        result.logprobs = lp.gather(1, out[:, None])[:, 0]
        k = min(max(want), lp.shape[-1])
        if k:
            result.top_logprobs, result.top_ids = lp.topk(k, dim=-1)
    return result


def apply_penalties(x: torch.Tensor, pen: Penalties, params: list[SamplingParams]) -> torch.Tensor:
    """Repetition (prompt + output), presence and frequency (output) penalties, as vLLM applies them."""
    dev = x.device
    knobs = torch.tensor([[p.repetition_penalty, p.presence_penalty, p.frequency_penalty] for p in params],
                         dtype=torch.float32).to(dev, non_blocking=True)
    rep, presence, frequency = knobs[:, :1], knobs[:, 1:2], knobs[:, 2:3]
    rows = torch.tensor(pen.rows, device=dev)
    sub = x.index_select(0, rows)
    seen = pen.in_prompt | (pen.counts > 0)
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - frequency * pen.counts - presence * (pen.counts > 0).float()
    return x.index_copy(0, rows, sub)


def _draw(x: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    """Sample every row of ``x`` (all rows sample, none greedy); -1 where a row's probabilities break
    (non-finite logits: the caller falls back to the argmax)."""
    n, V = x.shape
    dev = x.device
    knobs = torch.tensor([[p.temperature, p.top_p, math.log(p.min_p) if p.min_p > 0 else -math.inf,
                           p.top_k if 0 < p.top_k < V else V] for p in params],
                         dtype=torch.float32).to(dev, non_blocking=True)
    x = x / knobs[:, :1]
    if any(p.min_p > 0 for p in params):  # p < min_p * p_max  <=>  logit < max logit + log(min_p)
        x = x.masked_fill(x < x.amax(dim=-1, keepdim=True) + knobs[:, 2:3], float("-inf"))
    by_rank = any(p.top_p < 1 for p in params) or any(0 < p.top_k < V for p in params)
    if by_rank:
        # every row has a top_k: only the best max(top_k) tokens can survive, no need to sort them all
        k = max(p.top_k for p in params) if all(0 < p.top_k < V for p in params) else V
        ordered, order = x.topk(k, dim=-1) if k < V else x.sort(dim=-1, descending=True)
        drop = torch.arange(k, device=dev)[None, :] >= knobs[:, 3:4]  # beyond top_k
        if any(p.top_p < 1 for p in params):
            probs = torch.softmax(ordered.masked_fill(drop, float("-inf")), dim=-1)
            drop |= probs.cumsum(dim=-1) - probs > knobs[:, 1:2]  # the mass before a token already reaches top_p
        x = torch.full_like(x, float("-inf")).scatter_(1, order, ordered.masked_fill(drop, float("-inf")))
    cdf = torch.softmax(x, dim=-1).cumsum_(dim=-1)
    r = torch.empty(n, 1, device=dev)
    seeded = [i for i, g in enumerate(generators) if g is not None]
    if len(seeded) < n:
        r.uniform_()
    for i in seeded:
        r[i].uniform_(generator=generators[i])
    # the first token whose cumulative probability reaches u, with u in (0, total]: never a token of
    # probability 0 (its cumulative probability equals the one before it)
    u = (1.0 - r) * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, u)[:, 0].clamp_(max=V - 1)
    return torch.where(cdf[:, -1].isnan(), -1, tokens)


class TokenHistory:
    """Each penalized request's token history on the device: which tokens its prompt holds and how
    often each appears in its output. Counts are added on the device from the sampled tokens, so
    they are right even while those tokens are still on their way to the host (asynchronous
    scheduling). A request keeps its row through preemptions; finished requests give it back."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.in_prompt: torch.Tensor | None = None  # [R, V] bool
        self.counts: torch.Tensor | None = None  # [R, V] float32
        self.row_of: dict[int, int] = {}  # id(seq) -> row
        self.owners: dict[int, Sequence] = {}
        self.free_rows: list[int] = []

    def __len__(self) -> int:
        return len(self.row_of)

    def penalties(self, seqs: list[Sequence], vocab: int) -> tuple[Penalties, list[Sequence]] | None:
        """The ``Penalties`` of a step's sampled sequences (rows of the penalized ones), or None."""
        self.sweep()
        picked = [i for i, s in enumerate(seqs) if s.params.penalized]
        if not picked:
            return None
        rows = [self._row(seqs[i], vocab) for i in picked]
        index = torch.tensor(rows, device=self.device)
        pen = Penalties(picked, self.in_prompt.index_select(0, index),
                        self.counts.index_select(0, index))
        return pen, [seqs[i] for i in picked]

    def add(self, seqs: list[Sequence], tokens: torch.Tensor) -> None:
        """Count each sequence's newly sampled token (``tokens`` on the device, one per sequence)."""
        rows = torch.tensor([self.row_of[id(s)] for s in seqs], device=self.device)
        self.counts.index_put_((rows, tokens), torch.ones((), device=self.device), accumulate=True)

    def sweep(self) -> None:
        """Give back the rows of finished requests."""
        for key in [k for k, s in self.owners.items() if s.finished]:
            self.free_rows.append(self.row_of.pop(key))
            del self.owners[key]

    def _row(self, seq: Sequence, vocab: int) -> int:
        row = self.row_of.get(id(seq))
        if row is not None:
            return row
        if not self.free_rows:
            self._grow(vocab)
        row = self.free_rows.pop()
        self.in_prompt[row] = False
        self.in_prompt[row, torch.tensor(seq.prompt_token_ids, device=self.device)] = True
        self.counts[row] = 0
        if seq.output_ids:  # (a request whose history starts late: its tokens so far)
            ids = torch.tensor(seq.output_ids, device=self.device)
            self.counts[row].index_add_(0, ids, torch.ones(len(seq.output_ids), device=self.device))
        self.row_of[id(seq)] = row
        self.owners[id(seq)] = seq
        return row

    def _grow(self, vocab: int) -> None:
        old = 0 if self.counts is None else self.counts.shape[0]
        new = max(8, 2 * old)
        in_prompt = torch.zeros(new, vocab, dtype=torch.bool, device=self.device)
        counts = torch.zeros(new, vocab, dtype=torch.float32, device=self.device)
        if old:
            in_prompt[:old] = self.in_prompt
            counts[:old] = self.counts
        self.in_prompt, self.counts = in_prompt, counts
        self.free_rows.extend(range(new - 1, old - 1, -1))
