"""What rank 0 sends each step, and how the other ranks replay it.

Rank 0 runs the whole engine (scheduler, page allocator, sampler, outputs); its runner is a
``DriverRunner``, which before each piece of device work broadcasts what that work reads: for every
sequence involved a ``Replica`` (its pages, lengths, query slot, the token ids the step feeds), and
for tokens sampled by the previous step that are still on the device (asynchronous scheduling), the
tokens themselves (one device broadcast, no host trip). Every other rank runs ``serve``: it calls
the very same ``ModelRunner`` methods on the replicas, in the same order, so the collectives inside
the forward line up and each rank writes and compresses the same pages of its own KV heads.

Compressions need no communication: every head keeps the same number of tokens, so rank 0's page
table serves every rank, and each rank scores, picks and compacts its own heads. A worker runs
them on its current stream, in order with its forwards, whether rank 0 compressed on a side stream
or not. Sampling happens on rank 0 only; the tokens reach the others as the next step's inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..scoring import get_scorer
from .parallel import Ranks
from .runner import Feed, ModelRunner
from .sequence import Status
from .sharding import shard_model


@dataclass(eq=False)
class Replica:
    """The fields of a ``Sequence`` that the runner reads, as a worker receives them for one call."""

    request_id: str
    num_computed: int
    stored: int
    num_tokens: int
    pending: int
    pages: list[int]
    slot: int
    ring_from: int
    budget: Any
    compressions: int
    compressing: bool
    status: Status
    tokens: list[int] = field(default_factory=list)  # ids from position num_computed on

    def token_at(self, i: int) -> int:
        return self.tokens[i - self.num_computed]

    @staticmethod
    def pack(seq: Any, n: int = 0) -> tuple:
        """``seq`` as the runner sees it, with the ids of the ``n`` tokens a step feeds (those on the
        host), as a plain tuple (it pickles several times faster than an object)."""
        start, known = seq.num_computed, seq.num_tokens - seq.pending
        return (seq.request_id, start, seq.stored, seq.num_tokens, seq.pending, seq.pages, seq.slot, seq.ring_from,
                seq.budget, seq.compressions, seq.compressing, seq.status.value,
                [seq.token_at(t) for t in range(start, min(start + n, known))])

    @classmethod
    def unpack(cls, packed: tuple) -> Replica:
        replica = cls(*packed)
        replica.status = Status(replica.status)
        return replica


def feed_rows(decode: list, feed: Feed | None) -> tuple[int, dict[int, int]] | None:
    """``(tokens, {decode index: row})`` of the decoding sequences whose input is still on the device."""
    if feed is None:
        return None
    rows = {i: feed.rows[id(s)] for i, s in enumerate(decode) if s.pending}
    return (int(feed.tokens.shape[0]), rows) if rows else None


class DriverRunner(ModelRunner):
    """Rank 0's runner: each call first tells the other ranks to make the same one."""

    def __init__(self, *args: Any, ranks: Ranks, **kwargs: Any) -> None:
        super().__init__(*args, tp_size=ranks.size, **kwargs)
        self.ranks = ranks
        if self.scorer is not None:
            self.scorer.head_shard = (ranks.rank, ranks.size)

    def _share_feed(self, decode: list, feed: Feed | None) -> None:
        if feed_rows(decode, feed) is not None:
            dist.broadcast(feed.tokens.contiguous(), src=0, group=self.ranks.data)

    def forward(self, prefill, decode, feed=None):
        with self.ranks.guard("a forward"):
            self.ranks.send(("forward", [(Replica.pack(s, n), n) for s, n in prefill],
                             [Replica.pack(s, 1) for s in decode], feed_rows(decode, feed)))
            self._share_feed(decode, feed)
            return super().forward(prefill, decode, feed)

    def decode_with_graph(self, decode, feed=None):
        b = self.graph_batch(len(decode))
        if b is None or any(len(s.pages) > self.graph_table_width for s in decode):
            return None  # (nothing sent: the step falls back to forward())
        with self.ranks.guard("a decode step"):
            self.ranks.send(("graph", [Replica.pack(s, 1) for s in decode], feed_rows(decode, feed)))
            self._share_feed(decode, feed)
            return super().decode_with_graph(decode, feed)

    def calibrate_query_moments(self, ids, fallback=False):
        with self.ranks.guard("the query weights' calibration"):
            self.ranks.send(("calibrate", ids, fallback))
            super().calibrate_query_moments(ids, fallback)

    def capture_graphs(self, max_batch: int, table_width: int) -> None:
        with self.ranks.guard("the CUDA graph capture"):
            self.ranks.send(("capture", max_batch, table_width))
            super().capture_graphs(max_batch, table_width)

    def compress(self, seqs, dst_pages, first):
        with self.ranks.guard("a compression"):
            self.ranks.send(("compress", [Replica.pack(s) for s in seqs], dst_pages, first))
            super().compress(seqs, dst_pages, first)

    def release_slot(self, slot):
        # (the other ranks hold such a map too; a stopped group has no ranks left to tell)
        if self.kept is not None and slot in self.kept.own and self.ranks.dead is None:
            with self.ranks.guard("a slot's release"):
                self.ranks.send(("release", slot))
        super().release_slot(slot)

    def kept_positions(self, seq, layer_idx):
        mine = super().kept_positions(seq, layer_idx)  # (a bad request raises here, before any message)
        with self.ranks.guard("kept_positions"):
            self.ranks.send(("kept", Replica.pack(seq), layer_idx))
            parts = self.ranks.gather(mine.cpu())
        return torch.cat(parts, dim=0).to(mine.device)

    def close(self) -> None:
        self.ranks.close()


# ------------------------------------------------------------------------------------ the workers
def prepare(model: torch.nn.Module, ranks: Ranks) -> torch.nn.Module:
    """Keep this rank's shard of ``model`` (in place) on this rank's device."""
    shard_model(model, ranks.rank, ranks.size, ranks.data, device=ranks.device)
    return model.to(ranks.device).eval()


@dataclass
class WorkerJob:
    """What a spawned rank runs: get the model, keep its shard, then ``serve``."""

    source: Any  # a model object (pickled to the rank), or a Hub id / local folder each rank loads
    dtype: Any = None

    def __call__(self, ranks: Ranks) -> None:
        model = self.source
        if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            from .loading import load_model

            model, _ = load_model(model, dtype=self.dtype, with_tokenizer=False)
        serve(ranks, prepare(model, ranks))


def _receive(ranks: Ranks) -> Any:
    box = [None]
    dist.broadcast_object_list(box, src=0, group=ranks.control)
    return box[0]


def _feed(ranks: Ranks, decode: list[Replica], rows: tuple[int, dict[int, int]] | None) -> Feed | None:
    if rows is None:
        return None
    n, where = rows
    tokens = torch.empty(n, dtype=torch.long, device=ranks.device)
    dist.broadcast(tokens, src=0, group=ranks.data)
    return Feed(tokens, {id(decode[i]): row for i, row in where.items()})


def serve(ranks: Ranks, model: torch.nn.Module) -> None:
    """A worker's loop: build its runner as rank 0 says, then replay every call until ``stop``."""
    ranks.gather(None)  # sharded: what it received of rank 0's model is let go (see tensor_parallel.start_ranks)
    message = _receive(ranks)
    if message[0] == "stop":  # rank 0 gave up before building its runner
        return
    setup = message[1]
    cfg = setup["zipage_config"]
    scorer = get_scorer(cfg.scorer, cfg) if cfg is not None else None
    if scorer is not None:
        scorer.head_shard = (ranks.rank, ranks.size)
    runner = ModelRunner(model, setup["num_pages"], setup["page_size"], cfg, scorer, setup["num_slots"],
                         fuse_ops=setup["fuse_ops"], kv_cache_dtype=setup["kv_cache_dtype"], tp_size=ranks.size,
                         exact_tail=setup["exact_tail"],
                         kv_rotation=setup["kv_rotation"])
    ranks.gather(None)  # built: rank 0 goes on
    while True:
        message = _receive(ranks)
        kind = message[0]
        if kind == "stop":
            return
        if kind == "forward":
            _, prefill, decode, rows = message
            prefill = [(Replica.unpack(s), n) for s, n in prefill]
            decode = [Replica.unpack(s) for s in decode]
            runner.forward(prefill, decode, _feed(ranks, decode, rows))
        elif kind == "graph":
            decode = [Replica.unpack(s) for s in message[1]]
            if runner.decode_with_graph(decode, _feed(ranks, decode, message[2])) is None:
                raise RuntimeError("rank 0 replayed a decode graph this rank does not have")
        elif kind == "capture":
            runner.capture_graphs(message[1], message[2])
        elif kind == "calibrate":
            runner.calibrate_query_moments(message[1], message[2])
        elif kind == "compress":
            _, seqs, dst_pages, first = message
            runner.compress([Replica.unpack(s) for s in seqs], dst_pages, first)
        elif kind == "kept":
            ranks.gather(runner.kept_positions(Replica.unpack(message[1]), message[2]).cpu())
        elif kind == "release":
            runner.release_slot(message[1])
        else:
            raise RuntimeError(f"unknown message {kind!r} from rank 0")
