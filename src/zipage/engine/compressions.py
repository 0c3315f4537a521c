"""Compressions in flight: launched by a step, landed (booked) by a later one.

A step's plan names the sequences due for compression. They are compressed in groups (same
stored length, same budget, same first-ness, same kind of destination), either at once on the current
stream or, with asynchronous compression, on a side CUDA stream while the other requests go on
decoding: a sequence being compressed sits out the steps until its group's event completes.
On a CPU the same bookkeeping runs with compressions that complete at once.

Each sequence's pages change only when its compression lands (``BlockManager.compacted``). A
group that raises leaves its pages possibly compacted half-way: its sequences are failed
(finished with reason ``"error"``); groups that never ran are simply planned again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from ..memory.block_manager import BlockManager
from .runner import ModelRunner
from .scheduler import Scheduler, Step
from .sequence import Sequence

# (sequences, first compression?, destination pages per sequence id or None for in place)
Group = tuple[list[Sequence], bool, "dict[int, list[int]] | None"]


class Compressions:
    """Runs the plan's compressions and books them when they land."""

    def __init__(self, runner: ModelRunner, scheduler: Scheduler, blocks: BlockManager,
                 side_stream: Any, on_error: Callable[[Sequence, BaseException | None], None]) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.blocks = blocks
        self.side_stream = side_stream  # a torch.cuda.Stream, or None: compress on the current stream
        self.on_error = on_error  # finishes a sequence whose pages a failed compression left unknown
        self.pending: list[tuple[Any, list[Group]]] = []  # (event or None, groups) not yet booked

    def __bool__(self) -> bool:
        return bool(self.pending)

    def sequences(self) -> list[Sequence]:
        return [s for _, groups in self.pending for seqs, _, _ in groups for s in seqs]

    # ----------------------------------------------------------------------------- launching
    @staticmethod
    def groups(plan: Step) -> list[Group]:
        """The plan's compressions, grouped; the plan's destination pages move into the groups."""
        by_key: dict[tuple, list[Sequence]] = {}
        for seq in plan.compress:
            key = (seq.stored, seq.budget, seq.compressions == 0, id(seq) in plan.fresh_pages)
            by_key.setdefault(key, []).append(seq)
        groups = [(seqs, first, {id(s): plan.fresh_pages[id(s)] for s in seqs} if fresh else None)
                  for (_, _, first, fresh), seqs in by_key.items()]
        plan.fresh_pages.clear()
        return groups

    def run(self, plan: Step) -> None:
        """Compress now, on the current stream, and book each group as it completes."""
        groups = self.groups(plan)
        for k, group in enumerate(groups):
            try:
                self._compress(group)
                self._landed(group)
            except BaseException as e:
                self.abort(groups[k : k + 1], groups[k + 1 :], e)
                raise

    def launch(self, plan: Step) -> None:
        """Start the plan's compressions (on the side stream); their sequences leave the plan's decode
        list and sit out until they land (``collect``)."""
        groups = self.groups(plan)
        for seqs, _, _ in groups:
            for seq in seqs:
                seq.compressing = True
        plan.decode = [s for s in plan.decode if not s.compressing]
        event, launched = None, 0
        side = self.side_stream
        try:
            if side is not None:
                side.wait_stream(torch.cuda.current_stream())  # their last tokens are written
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                for group in groups:
                    self._compress(group)
                    launched += 1
                if side is not None:
                    event = torch.cuda.Event()
                    event.record(side)
        except BaseException as e:
            self.abort(groups[launched : launched + 1], groups[launched + 1 :], e)
            if side is not None:
                try:  # pages just freed are reused on the main stream only after the side stream's work
                    torch.cuda.current_stream().wait_stream(side)
                    event = torch.cuda.Event()
                    event.record(side)
                except BaseException:  # (a dead device): the launched ones cannot be trusted either
                    self.abort(groups[:launched], [], e)
                    launched = 0
            if launched:  # the groups launched before the failure land as usual
                self.pending.append((event, groups[:launched]))
            raise
        self.pending.append((event, groups))

    def _compress(self, group: Group) -> None:
        seqs, first, fresh = group
        self.runner.compress(seqs, [fresh[id(s)] for s in seqs] if fresh else None, first)

    # ----------------------------------------------------------------------------- landing
    def collect(self, block: bool, changed: list | None = None) -> None:
        """Book the compressions whose event completed (or all of them, with ``block``); the outputs of the
        sequences that could only finish now (stopped or cancelled while compressing) go to ``changed`` as they
        finish (so a raise below loses none of them; None: not wanted). An entry leaves
        ``pending`` as it lands, before anything that may raise, so that no compression lands twice; a
        group whose booking raises is failed (its pages may be compacted already) and a sequence that fails
        to finish does not keep the others from landing and finishing (the first error is raised)."""
        error = None
        i = 0
        while i < len(self.pending):
            event, groups = self.pending[i]
            if event is not None and not event.query():
                if not block:
                    i += 1
                    continue
                event.synchronize()
            del self.pending[i]  # (landed from here on)
            for group in groups:
                for seq in group[0]:
                    seq.compressing = False
                try:
                    self._landed(group)
                except BaseException as e:  # (e.g. Ctrl-C): its requests cannot go on; the other groups still land
                    error = error if error is not None else e
                    try:
                        self.abort([group], [], e)
                    except BaseException:  # (finishing them failed too: the first error goes up)
                        pass
            if event is not None:  # the main stream must see the compacted pages before using them
                torch.cuda.current_stream().wait_event(event)
            for seq in (seq for group in groups for seq in group[0]):
                if seq.finished:
                    continue
                reason = "cancelled" if seq.cancel_requested else seq.finish_requested
                if reason is None:
                    continue
                try:
                    self.scheduler.finish(seq, reason)
                except BaseException as e:
                    error = error if error is not None else e
                    continue
                if changed is not None:
                    changed.append(seq.output())
        if error is not None:
            raise error

    def _landed(self, group: Group) -> None:
        seqs, _, fresh = group
        for seq in seqs:
            self.scheduler.evicted_tokens += seq.stored - seq.budget
            self.blocks.compacted(seq, seq.budget, fresh[id(seq)] if fresh is not None else None)
            seq.compressions += 1
        self.scheduler.compressions += len(seqs)

    def abort(self, failed: list[Group], skipped: list[Group], cause: BaseException | None = None) -> None:
        """Compressions that raised ``cause`` (``failed``: pages possibly compacted half-way, the sequences
        are failed) or never ran (``skipped``: planned again by a later step)."""
        for groups, fail in ((failed, True), (skipped, False)):
            for seqs, _, fresh in groups:
                for seq in seqs:
                    seq.compressing = False
                    if fresh is not None and fresh[id(seq)] is not seq.pages:
                        self.blocks.release(fresh[id(seq)])  # not handed to the sequence yet
                    if fail:
                        self.on_error(seq, cause)

    def drop_cancelled(self) -> None:
        """Land at once compressions whose every sequence was cancelled (nobody waits for them)."""
        if self.pending and all(s.cancel_requested for s in self.sequences()):
            self.collect(block=True)
