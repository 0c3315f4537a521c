"""The step loop: schedule, compress, run the model, sample, book; undone when a step fails.

One ``EngineCore.step()`` at a time (a lock orders the threads that drive it). Its parts:
the ``Scheduler`` decides who runs and who is compressed, the ``BlockManager`` owns the pages,
``Compressions`` runs and lands compressions, the ``ModelRunner`` runs the forward, and the
``OutputProcessor`` books each sampled token.

With asynchronous scheduling the tokens a step samples stay on the device and feed the next
step directly; the host reads them while the GPU runs that next step, so scheduling and
bookkeeping overlap the GPU's work. Outputs therefore arrive one step late, and a request
stopped by a token (EOS, a stop id or string) has run one more step, whose token is dropped.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..memory.block_manager import BlockManager
from .compressions import Compressions
from .outputs import OutputProcessor
from .runner import Feed, ModelRunner
from .sampler import LogitEdits, Sampled, TokenHistory, sample
from .scheduler import Scheduler, Step
from .sequence import RequestOutput, Sequence, TokenLogprobs


@dataclass
class Flight:
    """A step's sampled tokens on their way to the host."""

    seqs: list[Sequence]
    feed: Feed  # the tokens on the device, for the next step's inputs
    host: torch.Tensor  # their copy on the host (pinned), valid once ``event`` completed
    event: Any  # torch.cuda.Event, or None on a CPU
    logprobs: Sampled | None = None  # host copies of the log-probabilities, when a request asked
    penalized: tuple[list[Sequence], torch.Tensor] | None = None  # their tokens count once the step stands


class EngineCore:
    """Drives the steps of one engine; every part is built by ``LLM`` and handed in."""

    def __init__(self, scheduler: Scheduler, blocks: BlockManager, runner: ModelRunner,
                 outputs: OutputProcessor, *, async_compression: bool,
                 async_scheduling: bool, use_graphs: bool, graph_table_width: int) -> None:
        self.scheduler = scheduler
        self.blocks = blocks
        self.runner = runner
        self.outputs = outputs
        scheduler.on_finish = outputs.finished  # cancelled and failed requests get their text too
        scheduler.on_release = runner.release_slot  # (per-slot state of the runner that outlives no request)
        self.async_compression = async_compression
        self.async_scheduling = async_scheduling
        self.use_graphs = use_graphs
        self.graph_table_width = graph_table_width
        side = None
        if async_compression and runner.device.type == "cuda":
            side = torch.cuda.Stream(runner.device)
        self.compressions = Compressions(runner, scheduler, blocks, side, self.fail)
        self.inflight: Flight | None = None  # the last step's tokens, not yet on the host
        self.history = TokenHistory(runner.device)  # token counts of the requests with penalties
        # One step at a time, whichever thread (agenerate's workers, a server loop) drives the engine.
        self.lock = threading.RLock()
        # the thread holding the lock through ``holding()`` (a step, kept_positions): its own cancels (a stream or
        # agenerate collected by the garbage collector meanwhile) wait until it lets go, as another thread's do
        # (the lock is re-entrant; with several ranks a cancel's message would land inside the holder's exchange)
        self.holder: int | None = None
        self.to_cancel: list[Sequence] = []  # cancellations waiting for the step in progress to end
        # the outputs of the step in progress, as they come; those of a step that raised stay for the next
        self.undelivered: list[RequestOutput] = []

    def has_unfinished(self) -> bool:
        s = self.scheduler
        # (a failed request's output waiting for the next step counts: it is reported by that step)
        return bool(s.waiting or s.running or self.compressions or self.to_cancel or self.undelivered)

    # ----------------------------------------------------------------------------- cancellation
    def cancel(self, seq: Sequence) -> None:
        """Stop ``seq`` now, or as soon as the step in progress (another thread's) returns."""
        self.to_cancel.append(seq)
        self.apply_cancels()

    def apply_cancels(self) -> None:
        """Carry out the queued cancellations unless a step or an exchange holds the lock, in another thread
        or in this one (the holder does them when it is done: every full release of the lock is followed by
        this call); then land compressions of cancelled requests only and drop a finished token flight."""
        if self.holder == threading.get_ident():
            return  # (called while this thread holds the lock in a step or an exchange: its end does them)
        while self.to_cancel and self.lock.acquire(blocking=False):
            try:
                while self.to_cancel:
                    seq = self.to_cancel.pop(0)
                    if seq.compressing:  # its pages are still being read and written on the side stream
                        seq.cancel_requested = True
                    elif not seq.finished:
                        self.scheduler.finish(seq, "cancelled")
                try:  # compressions of cancelled requests only: land them now (nobody may step again for them)
                    self.compressions.drop_cancelled()
                except Exception:  # (a dead device): the next step deals with it
                    pass
                self._drop_dead_flight()
            finally:
                self.lock.release()

    def fail(self, seq: Sequence, cause: BaseException | None = None) -> None:
        """Finish a request a failure (``cause``) left in an unknown state (reason "error", ``cause`` named in its
        output's ``error``; its pages freed); its output goes with the step's."""
        if seq.finished or seq.cancel_requested or seq.finish_requested is not None:
            return  # finishing anyway
        if cause is not None and seq.error is None:
            seq.error = describe_error(cause)
        if seq.compressing:  # its pages are still being read and written on the side stream
            seq.finish_requested = "error"
            return
        self.scheduler.finish(seq, "error")
        self.undelivered.append(seq.output())

    def drop_abandoned(self, known: set[str]) -> None:
        """After a failed ``generate()``: let go at once of what only cancelled requests still hold
        (a token flight of finished requests, compressions of cancelled ones, outputs of requests
        not in ``known``) rather than at the next step. Skipped while another thread is stepping."""
        if not self.lock.acquire(blocking=False):
            return
        try:
            self._drop_dead_flight()
            self.compressions.drop_cancelled()
            self.undelivered = [o for o in self.undelivered if o.request_id in known]
        except Exception:  # (a dead device): the next step deals with it; the original error goes up
            pass
        finally:
            self.lock.release()

    # ----------------------------------------------------------------------------- one step
    def step(self) -> list[RequestOutput]:
        """One scheduling step; returns the requests that got new tokens or finished.

        A step that raises (the model, the sampler, an interrupt) leaves the engine consistent:
        nothing it scheduled has moved (every request keeps its counters, pages and seeded
        generator), so the next ``step()`` goes on and produces the same tokens; a request whose
        state cannot be restored (its compression failed half-way, its tokens were lost with the
        device) is finished with reason ``"error"`` and its pages are freed. Outputs the failed
        step had already produced are returned by the next step."""
        try:
            with self.holding():
                try:
                    changed = self.undelivered
                    self._step(changed)
                    self.undelivered = []
                finally:
                    self._drop_dead_flight()
        finally:  # (a step that raised too: cancels made meanwhile take effect)
            self.apply_cancels()
        return changed

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """The lock, with this thread named as its holder until the outermost ``holding()`` ends."""
        with self.lock:
            outer, self.holder = self.holder, threading.get_ident()
            try:
                yield
            finally:
                self.holder = outer

    def _drop_dead_flight(self) -> None:
        """Let go of a token flight whose every request has finished (a stop seen in the step before it): their
        tokens are dropped anyway, and the engine may go idle holding it."""
        flight = self.inflight
        if flight is not None and all(s.finished for s in flight.seqs):
            self.inflight = None
            for seq in flight.seqs:
                seq.pending -= 1

    def _step(self, changed: list[RequestOutput]) -> None:
        self.compressions.collect(False, changed)
        plan = self.scheduler.schedule()
        if self.scheduler.ended:  # requests the scheduler itself had to end (reason "error")
            changed += [s.output() for s in self.scheduler.ended]
            self.scheduler.ended.clear()
        try:
            if self.inflight is not None and any(s.pending for s, _ in plan.prefill):
                # a request preempted and readmitted at once: its prompt must be complete on the host
                flight, self.inflight = self.inflight, None
                self._resolve(flight, changed)
                self._drop_finished(plan)
            if plan.compress:
                if self.async_compression:
                    self.compressions.launch(plan)
                else:
                    self.compressions.run(plan)
        finally:  # destination pages of compressions that never ran (the step failed first): back
            for pages in plan.fresh_pages.values():
                self.blocks.release(pages)
            plan.fresh_pages.clear()
        if plan.empty:
            if self.inflight is not None:
                flight, self.inflight = self.inflight, None
                self._resolve(flight, changed)
            elif self.compressions:  # nothing else to run: wait for a compression to land
                self.compressions.collect(True, changed)
            return
        previous = self.inflight
        launched = self._forward_and_sample(plan, previous)
        if not self.async_scheduling:
            self.inflight = None
        try:
            if previous is not None:  # the previous step's tokens: the GPU is busy with this one meanwhile
                self._resolve(previous, changed)
        finally:
            if not self.async_scheduling and launched is not None:
                self._resolve(launched, changed)

    def _forward_and_sample(self, plan: Step, previous: Flight | None) -> Flight | None:
        """Run the plan's forward and sample; nothing is booked on the host unless both succeed
        (the KV a failed forward wrote lies past each sequence's stored length and is rewritten
        before it is read; its query-ring rows are rewritten before a compression reads them; the
        tokens of ``previous`` are still on the device to be fed again)."""
        scheduled = [(s, n) for s, n in plan.prefill] + [(s, 1) for s in plan.decode]
        for seq, n in scheduled:  # (sliding-window layers: the pages of the new tokens)
            self.blocks.reserve_window(seq, n)
        feed = previous.feed if previous is not None else None
        logits = None
        if self.use_graphs and not plan.prefill:
            if not self.runner.graphs:
                self.runner.capture_graphs(self.scheduler.num_slots, self.graph_table_width)
            logits = self.runner.decode_with_graph(plan.decode, feed)
        if logits is None:
            logits = self.runner.forward(plan.prefill, plan.decode, feed)
        # a sequence whose whole prompt (or decode token) went through gets a token
        rows = [i for i, (s, n) in enumerate(scheduled) if s.num_computed + n == s.num_tokens]
        seqs = [scheduled[i][0] for i in rows]
        flight = self._launch_sampling(logits, rows, seqs) if seqs else None
        # committed: from here on the step's work stands
        for seq, n in scheduled:
            self.blocks.append(seq, n)
            self.blocks.register_prefix(seq)  # (a page registered is shared, never rewritten)
        if flight is not None and flight.penalized is not None:
            self.history.add(*flight.penalized)
        for seq in seqs:
            seq.pending += 1
            if (len(seq.output_ids) + seq.pending >= seq.params.max_tokens
                    or seq.num_tokens >= self.outputs.max_model_len):
                seq.last_pending = True  # that token ends it whatever its value: schedule it no more
        self.inflight = flight
        return flight

    def _launch_sampling(self, logits: torch.Tensor, rows: list[int], seqs: list[Sequence]) -> Flight:
        """Sample on the device and start copying the tokens to the host. A failure leaves each seeded
        request's generator where it was."""
        if len(rows) < logits.shape[0]:
            logits = logits[torch.tensor(rows, device=logits.device)]
        gens = [s.generator for s in seqs]
        saved = [(g, g.get_state()) for g in gens if g is not None]
        try:
            history = self.history.penalties(seqs, logits.shape[-1])
            edits = []  # (each request's allowed_token_ids and logit_bias on the device, made once)
            if any(s.params.logit_bias or s.params.allowed_token_ids for s in seqs):
                for s in seqs:
                    if s.logit_edits is None and (s.params.logit_bias or s.params.allowed_token_ids):
                        s.logit_edits = LogitEdits.of(s.params, logits.device)
                edits = [s.logit_edits for s in seqs]
            sampled = sample(logits, [s.params for s in seqs], gens, [self.outputs.suppressed(s) for s in seqs],
                             history[0] if history is not None else None, edits)
            tokens = sampled.tokens
            host, logprobs, event = _to_host(tokens), None, None
            if sampled.logprobs is not None:
                logprobs = Sampled(host, _to_host(sampled.logprobs),
                                   *(_to_host(t) if t is not None else None for t in (sampled.top_ids,
                                                                                       sampled.top_logprobs)))
            if tokens.device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
            penalized = None
            if history is not None:
                penalized = (history[1], tokens.index_select(0, torch.tensor(history[0].rows, device=tokens.device)))
        except BaseException:
            for g, state in saved:
                g.set_state(state)
            raise
        return Flight(seqs, Feed(tokens, {id(s): i for i, s in enumerate(seqs)}), host, event, logprobs, penalized)

    def _resolve(self, flight: Flight, changed: list[RequestOutput]) -> None:
        """Wait for a step's tokens on the host and book them (stop checks included). Every token
        of the flight is accounted for even when something raises: a request whose token cannot be
        read or booked is finished with reason "error"; the first exception is raised at the end."""
        try:
            if flight.event is not None:
                flight.event.synchronize()
            tokens = flight.host.tolist()
            logprobs = _logprobs(flight.logprobs, [s.params.logprobs for s in flight.seqs])
        except BaseException as e:  # the tokens are lost: their requests cannot go on
            for seq in flight.seqs:
                seq.pending -= 1
                self._fail_booking(seq, e)
            raise
        error = None
        for seq, token, lp in zip(flight.seqs, tokens, logprobs):
            seq.pending -= 1
            if seq.finished or seq.finish_requested is not None or seq.cancel_requested:
                continue  # stopped earlier (cancelled, or by an earlier token): this token is dropped
            try:
                reason = self.outputs.append(seq, token, lp)
                if reason is not None:
                    if seq.compressing:  # its pages are still being read and written on the side stream
                        seq.finish_requested = reason
                    else:
                        self.scheduler.finish(seq, reason)
                changed.append(seq.output())
            except BaseException as e:  # (e.g. the tokenizer's decode): this request only
                error = error if error is not None else e
                error = self._fail_booking(seq, e) or error
        if error is not None:
            raise error

    def _fail_booking(self, seq: Sequence, cause: BaseException) -> BaseException | None:
        """``fail(seq, cause)`` while a flight is booked: what it raises is returned, not raised, so that the
        other requests' tokens are still booked."""
        try:
            self.fail(seq, cause)
        except BaseException as e:
            return e
        return None

    def _drop_finished(self, plan: Step) -> None:
        """Take requests that finished while the plan was made out of it (their fresh pages back)."""
        for seq in [s for s in plan.compress if s.finished]:
            plan.compress.remove(seq)
            self.blocks.release(plan.fresh_pages.pop(id(seq), []))
        plan.decode = [s for s in plan.decode if not s.finished]
        plan.prefill = [(s, n) for s, n in plan.prefill if not s.finished]


def describe_error(e: BaseException) -> str:
    """A failure as a request's ``error`` reports it: the exception's type and message."""
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """Start copying a device tensor to (pinned) host memory; a CPU tensor is its own copy."""
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def _logprobs(sampled: Sampled | None, wanted: list[int | None]) -> list[TokenLogprobs | None]:
    """Each row's log-probabilities as the requests asked for them (``wanted[i]`` top tokens, or None)."""
    if sampled is None:
        return [None] * len(wanted)
    tokens, lps = sampled.tokens.tolist(), sampled.logprobs.tolist()
    ids = sampled.top_ids.tolist() if sampled.top_ids is not None else None
    tops = sampled.top_logprobs.tolist() if sampled.top_logprobs is not None else None
    return [None if k is None else TokenLogprobs(tokens[i], lps[i], list(zip(ids[i][:k], tops[i][:k])) if k else [])
            for i, k in enumerate(wanted)]
