"""A stand-in for the model that makes engine runs cheap and every page mix-up visible.

``SymbolicRunner`` replaces the engine's ``ModelRunner``: its KV pool holds, per slot, the
``(position, token)`` pair written there, its query ring the same per query slot. The next token
of a sequence is a hash of the pairs its page table shows for its stored length, and a compression
keeps tokens by a hash of the pairs and of the window the ring shows. A page written by the wrong
sequence, a compaction reading pages another sequence overwrote, a stale query ring, a wrong
position: each changes the tokens. ``alone`` computes, without the engine, the tokens a request
gets on its own (what ``generate(cache_implementation="zipage")`` does: the whole prompt, then one
token a step, compressing before a step when ``stored > budget`` and ``stored + 1 > capacity``).

With ``delay_compressions`` a compression does not happen when it is launched: it happens when its
``FakeEvent`` (standing for the CUDA event of the side stream) reports it complete, some steps
later, as late as a GPU could run it.
"""

from __future__ import annotations

import random

import torch

from zipage.config import ZipageConfig
from zipage.engine.runner import ModelRunner
from zipage.engine.sequence import Sequence, Status


class Injected(Exception):
    """A failure the tests inject into a step."""


def preferred(stored: list[tuple[int, int]], vocab: int) -> int:
    """The token the stored pairs prefer; the logits rank the others after it: ``t+1``, ``t+2``, ..."""
    return hash(tuple(stored)) % vocab


def next_token(stored: list[tuple[int, int]], vocab: int, banned=()) -> int:
    t = preferred(stored, vocab)
    while t in banned:
        t = (t + 1) % vocab
    return t


def compact(stored: list, window: list, cfg: ZipageConfig) -> list:
    """The stored pairs a compression keeps: the last ``window`` ones, then the best-scored others."""
    w = cfg.window
    rest = range(len(stored) - w)
    key = tuple(window)
    best = sorted(rest, key=lambda i: hash((stored[i], key)))[: cfg.budget - w]
    return [stored[i] for i in sorted(best)] + stored[len(stored) - w :]


def alone(prompt: list[int], params, cfg: ZipageConfig | None, vocab: int, max_model_len: int) -> list[int]:
    """The greedy tokens of one request run on its own (independent of the engine)."""
    stored, seen, out = [], [], []
    for tok in prompt:
        stored.append((len(seen), tok))
        seen.append((len(seen), tok))
    while True:
        tok = next_token(stored, vocab, params.stop_token_ids if len(out) < params.min_tokens else ())
        out.append(tok)
        n = len(out)
        if n >= params.min_tokens and tok in params.stop_token_ids:
            return out
        if n >= params.max_tokens or len(prompt) + n >= max_model_len:
            return out
        if cfg is not None and len(stored) > cfg.budget and len(stored) + 1 > cfg.capacity:
            stored = compact(stored, seen[-cfg.window :], cfg)
        stored.append((len(seen), tok))
        seen.append((len(seen), tok))


class FakeEvent:
    """A side-stream event: complete after ``delay`` queries (or at ``synchronize``); the compactions
    it stands for run then."""

    def __init__(self, jobs: list, delay: int) -> None:
        self.jobs, self.delay = jobs, delay

    def _land(self) -> None:
        jobs, self.jobs = self.jobs, []
        for job in jobs:
            job()

    def query(self) -> bool:
        if self.delay > 0:
            self.delay -= 1
            return False
        self._land()
        return True

    def synchronize(self) -> None:
        self._land()


class NoStream:
    """``torch.cuda.current_stream()`` on a CPU, for the engine's waits on fake events."""

    def wait_event(self, event) -> None:
        assert isinstance(event, FakeEvent) and not event.jobs, "the main stream waits for an unfinished event"

    def wait_stream(self, stream) -> None:
        pass


class SymbolicRunner(ModelRunner):
    """The runner's interface on a symbolic pool (set ``blocks``, ``vocab``, ``rng`` after building).
    Like the real runner it changes no sequence: the step loop books what a forward wrote."""

    def __init__(self, model, num_pages, page_size, zipage_config, scorer, num_slots, fuse_ops=True,
                 **options):  # (kv_cache_dtype, window_blocks: nothing to store symbolically)
        self.page_size = page_size
        self.zipage_config = zipage_config
        self.scorer = scorer
        self.num_slots = num_slots
        self.device = torch.device("cpu")
        self.graphs = {}
        self.exact_k = self.exact_v = None  # (exact tails: none here)
        self.kept = None  # (no kept-position maps either)
        self.kv: list[tuple[int, int] | None] = [None] * ((num_pages + 1) * page_size)
        w = zipage_config.window if zipage_config is not None else 1
        self.ring: list[list[tuple[int, int] | None]] = [[None] * w for _ in range(num_slots + 1)]
        self.blocks = None
        self.vocab = 64
        self.rng = random.Random(0)
        self.fail_forward = self.fail_compress = 0.0  # probabilities of an injected failure
        self.delay_compressions = False
        self.launched: list | None = None  # compactions launched by the step in progress (delayed mode)
        self.forwards = self.compactions = 0

    def slot(self, seq: Sequence, j: int) -> int:
        return seq.pages[j // self.page_size] * self.page_size + j % self.page_size

    def stored_pairs(self, seq: Sequence, n: int) -> list:
        return [self.kv[self.slot(seq, j)] for j in range(n)]

    def forward(self, prefill, decode, feed=None):
        w = self.zipage_config.window if self.zipage_config is not None else 0
        rows = []
        for seq, n in prefill + [(s, 1) for s in decode]:
            assert seq.status is Status.RUNNING and not seq.compressing and 0 <= seq.slot < self.num_slots
            assert len(seq.pages) * self.page_size >= seq.stored + n, "writing past the sequence's pages"
            known = seq.num_tokens - seq.pending
            if (seq, n) in prefill:
                assert seq.num_computed + n <= known, "a prefill chunk reaches a token still on the device"
            start = seq.num_computed
            for t in range(start, start + n):
                if t < known:
                    tok = seq.token_at(t)
                else:  # the pending token, fed on the device
                    assert feed is not None and id(seq) in feed.rows, "a pending input token with no feed"
                    tok = int(feed.tokens[feed.rows[id(seq)]])
                j = seq.stored + t - start
                page = seq.pages[j // self.page_size]
                assert self.blocks.refs[page] == 1, "a shared page was written"
                self.kv[self.slot(seq, j)] = (t, tok)
                if w and t >= start + n - w:
                    self.ring[seq.slot][t % w] = (t, tok)
            rows.append(preferred(self.stored_pairs(seq, seq.stored + n), self.vocab))
        self.forwards += 1
        if self.rng.random() < self.fail_forward:  # (after the writes, as a model failing late would)
            raise Injected("injected failure in forward")
        return -((torch.arange(self.vocab)[None] - torch.tensor(rows)[:, None]) % self.vocab).float()

    def compress(self, seqs, dst_pages, first):
        cfg = self.zipage_config.replace(budget=seqs[0].budget)  # (a request may have a budget of its own)
        w, p = cfg.window, self.page_size
        jobs = []
        for i, seq in enumerate(seqs):
            S, L = seq.stored, seq.num_computed
            assert S == seqs[0].stored and seq.budget == cfg.budget and len(seq.pages) * p >= S
            ring = [self.ring[seq.slot][(L - w + k) % w] for k in range(w)]
            assert [r[0] if r else None for r in ring] == list(range(L - w, L)), "the ring holds other queries"
            if dst_pages is not None:
                dst = dst_pages[i]
                assert all(self.blocks.refs[q] == 1 for q in dst) and not set(dst) & set(seq.pages)
                assert len(dst) * p >= cfg.budget
                dst_slots = [dst[j // p] * p + j % p for j in range(cfg.budget)]
            else:
                keep = -(-(cfg.budget + 1) // p)
                assert all(self.blocks.refs[q] == 1 for q in seq.pages[:keep]), "in-place compaction of a shared page"
                dst_slots = [self.slot(seq, j) for j in range(cfg.budget)]
            src_slots = [self.slot(seq, j) for j in range(S)]

            def job(src=src_slots, dst=dst_slots, ring=ring):
                kept = compact([self.kv[s] for s in src], ring, cfg)
                for s, pair in zip(dst, kept):
                    self.kv[s] = pair
                self.compactions += 1

            jobs.append(job)
        if self.rng.random() < self.fail_compress:  # half-way: the first sequence's pages are compacted
            jobs[0]()
            raise Injected("injected failure in compress")
        if self.launched is not None:
            self.launched.extend(jobs)
        else:
            for job in jobs:
                job()
