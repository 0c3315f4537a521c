"""Which logical positions each running request keeps, per layer and KV head (``LLM.kept_positions``).

Before a request's first compression, stored slot ``j`` holds position ``j``; after one, the slots
past the compacted prefix ``[0, budget)`` hold one new token each, so slot ``j >= budget`` holds
position ``num_computed - stored + j``. Only the compacted prefix needs a map: one
``[L, H_kv, budget]`` int32 map per query slot, gathered with the kept indices at every
compression (on the stream the compression runs on), never touched by a decode step. A request
with a budget of its own (``SamplingParams.budget``) keeps its map apart, of its own width, until its query
slot is given back.
"""

from __future__ import annotations

import torch

from .sequence import Sequence, Status


class KeptPositions:
    """The logical positions of the compacted prefix of every query slot's request."""

    def __init__(self, layers: int, num_slots: int, heads: int, budget: int, device: torch.device) -> None:
        self.budget = budget
        self.map = torch.zeros(layers, num_slots, heads, budget, dtype=torch.int32, device=device)
        self.own: dict[int, torch.Tensor] = {}  # slot -> [L, H, b]: a request with a budget b of its own

    def of(self, seq: Sequence) -> torch.Tensor:
        """``[L, H, budget]`` map of ``seq``'s query slot (a view)."""
        if seq.budget == self.budget:
            return self.map[:, seq.slot]
        own = self.own.get(seq.slot)
        if own is None or own.shape[-1] != seq.budget:
            L, _, H, _ = self.map.shape
            own = self.own[seq.slot] = torch.zeros(L, H, seq.budget, dtype=self.map.dtype, device=self.map.device)
        return own

    def release(self, slot: int) -> None:
        """Drop the map of a budget of its own that ``slot``'s request held (called as the slot is given back,
        after the request's compressions landed: no kernel writes it any more)."""
        self.own.pop(slot, None)

    @staticmethod
    def bytes_per_slot(config, budget: int) -> int:
        cfg = config.get_text_config(decoder=True)
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        return cfg.num_hidden_layers * heads * budget * 4

    def compressed(self, seqs: list[Sequence], keeps: list[tuple[slice, torch.Tensor]], first: bool) -> None:
        """Follow a compression of ``seqs`` (same stored length): ``keeps`` holds, per group of layers,
        its ``[L_g, n, H, budget]`` kept indices into the stored slots."""
        dev = keeps[0][1].device
        stored, budget = seqs[0].stored, seqs[0].budget
        if budget != self.budget:  # (maps of their own: one request at a time)
            for i, seq in enumerate(seqs):
                self._compressed_own(seq, [(layers, keep[:, i : i + 1]) for layers, keep in keeps], first)
            return
        slot_base = torch.tensor([[s.slot, s.num_computed - stored] for s in seqs], device=dev)
        slots, base = slot_base[:, 0], slot_base[:, 1]
        start = 0 if first else self.budget
        positions = base[:, None] + torch.arange(start, stored, device=dev)  # [n, stored - start]
        for layers, keep in keeps:
            Lg, n, H, _ = keep.shape
            view = self.map[layers]
            tail = positions[None, :, None, :].expand(Lg, n, H, -1)
            before = tail if first else torch.cat([view.index_select(1, slots).long(), tail], dim=3)
            view.index_copy_(1, slots, before.gather(3, keep).to(view.dtype))

    def _compressed_own(self, seq: Sequence, keeps: list[tuple[slice, torch.Tensor]], first: bool) -> None:
        own = self.of(seq)
        dev = own.device
        start = 0 if first else seq.budget
        positions = seq.num_computed - seq.stored + torch.arange(start, seq.stored, device=dev)
        for layers, keep in keeps:  # keep: [L_g, 1, H, budget]
            view = own[layers]
            tail = positions[None, None, :].expand(view.shape[0], view.shape[1], -1)
            before = tail if first else torch.cat([view.long(), tail], dim=2)
            view.copy_(before.gather(2, keep[:, 0]).to(view.dtype))


def kept_positions(seq: Sequence, layer_idx: int, num_layers: int, heads: int, kept: KeptPositions | None,
                   device: torch.device) -> torch.Tensor:
    """``[heads, stored]`` int64 logical positions of ``seq``'s stored slots in layer ``layer_idx``, on
    ``device`` (``kept`` is None for a full-KV engine, whose requests are never compressed)."""
    if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or not 0 <= layer_idx < num_layers:
        raise IndexError(f"layer_idx={layer_idx!r} is out of range: the model has {num_layers} layers")
    if seq.status is Status.FINISHED:
        raise ValueError(f"request {seq.request_id!r} has finished: its kept positions went with its pages")
    if seq.compressing:
        raise ValueError(f"request {seq.request_id!r} is being compressed: its kept positions are known once "
                         "the compression lands (a later step)")
    end, stored = seq.num_computed, seq.stored
    n = seq.budget if seq.compressions and kept is not None else 0
    tail = torch.arange(end - stored + n, end, device=device).expand(heads, -1)
    if n == 0:
        return tail.clone()
    return torch.cat([kept.of(seq)[layer_idx].long().to(device), tail], dim=1)
