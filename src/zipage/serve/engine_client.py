"""The server's one engine loop: a thread that owns the engine and drives ``LLM.step()``.

Requests enter and leave through a thread-safe queue of operations (add, cancel) applied between
steps, so nothing touches the engine while a step runs. Each step's new tokens go to the
requests' asyncio queues on the event loop (``call_soon_threadsafe``, one call per step). A
request whose consumer goes away (client disconnected, stream cancelled) is cancelled, and its
pages are back in the pool after the step in progress.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..engine import LLM, RequestOutput, SamplingParams
from ..engine.sequence import TokenLogprobs

log = logging.getLogger("zipage.serve")
MAX_FAILED_STEPS = 3  # consecutive failing steps before the in-flight requests are ended with an error
PROBE_INTERVAL_S = 10.0  # while unhealthy and idle: how often the engine's own request is tried again
JOIN_TOKENS = 1024  # the most tokens (all samples') of a slow consumer's backlog joined into one event


class EngineDead(RuntimeError):
    """The engine loop stopped (shutdown) or its steps keep failing."""


@dataclass
class Delta:
    """What one step added to one sample of a request."""

    index: int
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None  # set on the sample's last delta
    text: str | None = None  # the sample's final text (stop strings cut), on its last delta
    error: str | None = None  # why the engine ended the sample, when its finish reason is "error"


@dataclass
class _Request:
    rid: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    n: int
    arrival: float
    sent: list[int] = field(default_factory=list)  # tokens delivered per sample
    last: list[float] = field(default_factory=list)  # when each sample last got tokens
    ended: list[bool] = field(default_factory=list)  # samples finished
    reasons: list[str | None] = field(default_factory=list)  # each sample's finish reason, once it finished
    first_token: bool = False  # the request's first token was delivered (time to first token)
    cancelled: bool = False
    errored: bool = False  # a sample ended with "error" (its siblings are then cancelled: counted as an error)


def join_deltas(steps: list[list[Delta]]) -> list[Delta]:
    """Several steps' deltas of one request as one step's: per sample, the tokens (and log-probabilities) of
    all, in order, and the last one's ending (linear in the tokens)."""
    tokens: dict[int, list[int]] = {}
    logprobs: dict[int, list[TokenLogprobs]] = {}
    last: dict[int, Delta] = {}
    for deltas in steps:
        for d in deltas:
            tokens.setdefault(d.index, []).extend(d.token_ids)
            if d.logprobs is not None:
                logprobs.setdefault(d.index, []).extend(d.logprobs)
            last[d.index] = d
    return [Delta(i, tokens[i], logprobs.get(i), d.finish_reason, d.text, d.error) for i, d in last.items()]


class RequestStream:
    """One request's deltas as they come (``async for``). ``close()`` cancels it unless it finished:
    call it when the consumer goes away (a ``finally`` around the iteration)."""

    def __init__(self, engine: AsyncEngine, req: _Request) -> None:
        self.engine = engine
        self.req = req
        self.done = 0  # samples finished (seen by this side)
        self.finished = False
        self.closed = False
        self._held: list[Delta] | BaseException | None = None  # taken off the queue, for the next call

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> list[Delta]:
        """The next deltas: those delivered since the last call, joined into one delta per sample, at most
        ``JOIN_TOKENS`` tokens unless one step brings more. A consumer slower than the engine (a client that
        stops reading) gets its backlog in a few large events, not one per step, each small enough to leave
        the event loop free between them."""
        if self.finished:
            raise StopAsyncIteration
        if self._held is not None:
            item, self._held = self._held, None
        else:
            item = await self.req.queue.get()
        if not isinstance(item, BaseException) and not self.req.queue.empty():
            steps, tokens = [item], sum(len(d.token_ids) for d in item)
            while not self.req.queue.empty():
                more = self.req.queue.get_nowait()
                if isinstance(more, BaseException) or tokens + sum(len(d.token_ids) for d in more) > JOIN_TOKENS:
                    self._held = more  # (the deltas before it come now, it on the next call)
                    break
                steps.append(more)
                tokens += sum(len(d.token_ids) for d in more)
            item = join_deltas(steps) if len(steps) > 1 else item
        if isinstance(item, BaseException):
            self.finished = True  # the engine has let go of it already
            raise item
        self.done += sum(d.finish_reason is not None for d in item)
        self.finished = self.done >= self.req.n
        return item

    def close(self) -> None:
        if not self.finished and not self.closed:
            self.closed = True
            self.engine._submit(("cancel", self.req))


class AsyncEngine:
    """Owns an ``LLM`` and one thread that steps it; ``add`` is the asyncio side.

    Args:
        llm: the engine (nothing else may touch it once this starts).
        metrics: an object with ``request_added(prompt_tokens)``, ``tokens(n, ttft, itl)`` and
            ``request_finished(reasons, seconds)`` (``metrics.ServerMetrics``; a finish reason per sample), or None.
    """

    def __init__(self, llm: LLM, metrics: Any = None) -> None:
        self.llm = llm
        self.metrics = metrics
        self._ops: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._requests: dict[str, _Request] = {}  # engine thread only
        self._ids = itertools.count()
        # samples of adds submitted (or reserved by ``reserve``) and not yet applied: read by the handlers for
        # --max-waiting, with the published stats' waiting samples (republished as soon as adds are applied)
        self._incoming = 0
        self._lock = threading.Lock()
        self._stopping = False
        self._closed = False  # the loop has ended and drained its queue: adds are refused
        self.dead: str | None = None  # why the loop stopped
        # why the engine is not healthy while it runs: its steps kept failing and a request of its own failed too
        # (cleared by the next step that runs); /health answers 503 meanwhile
        self.failing: str | None = None
        self.stats: dict[str, Any] = llm.stats()  # published after every step, read by /metrics
        self.thread = threading.Thread(target=self._run, name="zipage-engine", daemon=True)

    # ----------------------------------------------------------------------------- life
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Abort every request in flight (their streams end with finish reason "abort") and let the
        loop end, without waiting for it (a signal handler calls this)."""
        self._stopping = True
        self._wake.set()

    def shutdown(self, timeout: float = 30.0) -> None:
        """``stop()`` and wait for the loop to end."""
        self.stop()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout)

    @property
    def waiting(self) -> int:
        """Requests queued and not running yet (their samples counted one by one)."""
        return self.stats.get("waiting", 0) + self._incoming

    def reserve(self, samples: int, limit: int | None) -> bool:
        """Count ``samples`` as waiting now, unless that would make more than ``limit`` wait (False: nothing
        counted). The adds that follow pass ``reserved=True``; what is never added goes back by ``unreserve``."""
        with self._lock:
            if limit is not None and self.waiting + samples > limit:
                return False
            self._incoming += samples
            return True

    def unreserve(self, samples: int) -> None:
        with self._lock:
            self._incoming -= samples

    # ----------------------------------------------------------------------------- the asyncio side
    async def add(self, prompt: list[int], params: SamplingParams, reserved: bool = False) -> RequestStream:
        """Queue a request; returns its stream once the engine took it, or raises what
        ``LLM.add_request`` raised for a bad request (``ValueError``, ``TypeError``). ``reserved``: its
        samples were counted by ``reserve`` already."""
        return (await self.add_many([prompt], [params], reserved))[0]

    async def add_many(self, prompts: list[list[int]], params: list[SamplingParams],
                       reserved: bool = False) -> list[RequestStream]:
        """Queue several requests at once, all or none (``LLM.add_requests`` on the engine thread, in one of its
        rounds: a bad prompt refuses them all before any reaches the engine or its metrics, and they are queued
        together); returns their streams, or raises what the engine raised (``ValueError``, ``TypeError``,
        naming the prompt's index). ``reserved``: their samples were counted by ``reserve`` already."""
        if len(prompts) != len(params):
            raise ValueError(f"add_many: {len(prompts)} prompts and {len(params)} SamplingParams")
        if not prompts:
            return []
        samples = sum(p.n for p in params)
        if self.dead is not None:
            if reserved:  # (never queued: its samples are not waiting)
                self.unreserve(samples)
            raise EngineDead(self.dead)
        loop, now = asyncio.get_running_loop(), time.monotonic()
        reqs = [_Request(f"req-{next(self._ids)}", loop, asyncio.Queue(), p.n, now) for p in params]
        with self._lock:  # (the loop's last drain holds it too: an add is either drained and answered, or refused)
            if self._closed:
                if reserved:
                    self._incoming -= samples
                raise EngineDead(self.dead or "the server is shutting down")
            if not reserved:
                self._incoming += samples
            self._ops.put(("add", reqs, prompts, params))
        self._wake.set()
        try:
            answer = await reqs[0].queue.get()  # None (taken), or why not: the first request's queue answers
        except BaseException:  # (cancelled while waiting for the engine thread)
            for req in reqs:
                self._submit(("cancel", req))
            raise
        if isinstance(answer, BaseException):
            raise answer
        return [RequestStream(self, req) for req in reqs]

    def _submit(self, op: tuple) -> None:
        self._ops.put(op)
        self._wake.set()

    # ----------------------------------------------------------------------------- the engine thread
    def _run(self) -> None:
        failures = 0
        try:
            while True:
                self._apply_ops()
                if self._stopping:
                    break
                if not self.llm.has_unfinished():
                    self._publish()
                    # (while unhealthy with nothing to run, the engine's own request is tried again now and then)
                    if not self._wake.wait(PROBE_INTERVAL_S if self.failing is not None else None):
                        self._check_health()
                    self._wake.clear()
                    continue
                try:
                    outs = self.llm.step()
                    failures = 0
                    self.failing = None
                except Exception as e:  # the step is undone; a few in a row end what is in flight
                    failures += 1
                    log.exception("engine step failed (%d in a row)", failures)
                    if failures >= MAX_FAILED_STEPS:
                        self.failing = f"the engine's steps keep failing: {e!r}"  # (before the requests hear it)
                        self._end_all(EngineDead(self.failing))
                        failures = 0
                        self._check_health()  # (a request of its own tells a broken engine from breaking requests)
                        if self.failing is not None:
                            log.error("the engine failed a request of its own too: unhealthy until one runs")
                    continue
                self._deliver(outs)
                self._publish()
        except BaseException as e:  # never expected: say so to every waiting client
            self.dead = f"the engine loop stopped: {e!r}"
            log.exception("engine loop stopped")
        finally:
            crashed = self.dead is not None
            self.dead = self.dead or "the server is shutting down"
            self._end_all(EngineDead(self.dead) if crashed else None)
            with self._lock:  # anything submitted meanwhile is refused, and nothing is submitted after
                self._closed = True
                for op in self._queued_ops():
                    if op[0] == "add":
                        self._incoming -= sum(p.n for p in op[3])  # (never applied: no longer waiting)
                        self._send(op[1][0], EngineDead(self.dead))

    def _queued_ops(self) -> Iterator[tuple]:
        """The operations submitted so far, taken off the queue."""
        while True:
            try:
                yield self._ops.get_nowait()
            except queue.Empty:
                return

    def _apply_ops(self) -> None:
        added = 0  # samples handed to the engine: counted by the stats from here on (published below)
        cancelled = False
        for op in self._queued_ops():
            if op[0] == "add":
                _, reqs, prompts, params = op
                added += sum(p.n for p in params)
                if self._stopping:  # (the loop ends after this: a 503 now, not a 200 aborted at once)
                    self._send(reqs[0], EngineDead("the server is shutting down"))
                    continue
                try:  # (all or none: every prompt checked before any is queued)
                    self.llm.add_requests(prompts, params, request_ids=[req.rid for req in reqs])
                except Exception as e:  # a bad request: its handler answers 400
                    self._send(reqs[0], e)
                    continue
                for req, prompt in zip(reqs, prompts):
                    self._requests[req.rid] = req
                    req.sent, req.last, req.ended = [0] * req.n, [0.0] * req.n, [False] * req.n
                    req.reasons = [None] * req.n
                    if self.metrics is not None:
                        self.metrics.request_added(len(prompt))
                self._send(reqs[0], None)
            elif op[0] == "cancel":
                req = op[1]
                if self._requests.get(req.rid) is req:
                    req.cancelled = True
                    self.llm.cancel(req.rid)
                    cancelled = True
        if cancelled:  # (after all of them: cancelling one may land another's compression and finish it)
            for req in [r for r in self._requests.values() if r.cancelled]:
                self._maybe_forget(req)
        if added:  # (published first: a handler reading meanwhile counts them twice, never zero times)
            self._publish()
            with self._lock:
                self._incoming -= added

    def _deliver(self, outs: list[RequestOutput]) -> None:
        now = time.monotonic()
        per_request: dict[str, list[Delta]] = {}
        for out in outs:
            req = self._requests.get(out.request_id)
            if req is None:
                continue
            if req.cancelled:  # (its compression was in flight when it was cancelled)
                self._maybe_forget(req)
                continue
            c = out.outputs[0]
            new = c.token_ids[req.sent[c.index]:]
            if (not new and c.finish_reason is None) or req.ended[c.index]:
                continue
            lps = c.logprobs[req.sent[c.index]:] if c.logprobs is not None else None
            if self.metrics is not None and new:
                if req.sent[c.index]:
                    self.metrics.tokens(len(new), ttft=None, itl=(now - req.last[c.index]) / len(new))
                else:
                    self.metrics.tokens(len(new), ttft=None if req.first_token else now - req.arrival, itl=None)
                    req.first_token = True
            req.sent[c.index] += len(new)
            req.last[c.index] = now
            req.ended[c.index] = c.finish_reason is not None
            req.reasons[c.index] = c.finish_reason
            req.errored |= c.finish_reason == "error"
            per_request.setdefault(req.rid, []).append(
                Delta(c.index, new, lps, c.finish_reason, c.text if c.finish_reason is not None else None,
                      (out.error or "unknown") if c.finish_reason == "error" else None))
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for rid, deltas in per_request.items():
            req = self._requests[rid]
            by_loop.setdefault(req.loop, []).append((req.queue, deltas))
            if all(req.ended):
                if self.metrics is not None:
                    self.metrics.request_finished(req.reasons, now - req.arrival)
                self._forget(req)
        for loop, items in by_loop.items():
            _call(loop, _put_all, items)

    def _maybe_forget(self, req: _Request) -> None:
        if all(s.finished for s in self.llm.samples(req.rid)):
            self._count(req, "error" if req.errored else "cancelled")
            self._forget(req)

    def _forget(self, req: _Request) -> None:
        del self._requests[req.rid]
        try:
            self.llm.forget(req.rid)
        except (KeyError, ValueError):  # (never expected: the loop must go on whatever happens to one request)
            log.exception("forgetting %s failed", req.rid)

    def _end_all(self, error: BaseException | None) -> None:
        """Cancel every request in flight and tell its handler (``error``, or an "abort" finish)."""
        for req in list(self._requests.values()):
            try:
                self.llm.cancel(req.rid)
            except Exception:
                log.exception("cancelling %s failed", req.rid)
            if not req.cancelled:
                aborted = [Delta(i, [], None, "abort") for i in range(req.n) if not req.ended[i]]
                self._send(req, error if error is not None else aborted)
                self._count(req, "error" if error is not None else "abort")
            else:  # (cancelled, its compression still in flight: counted now)
                self._count(req, "error" if req.errored else "cancelled")
            del self._requests[req.rid]
        try:  # let compressions in flight land so every page is back
            for _ in range(1000):
                if not self.llm.has_unfinished():
                    break
                self.llm.step()
            for rid in [r for r, s in self.llm.requests.items() if s.finished]:
                self.llm.forget(rid)
        except Exception:
            log.exception("draining the engine failed")
        self._publish()

    def _count(self, req: _Request, other: str) -> None:
        """Count ``req`` as finished: each sample by its own finish reason, ``other`` for those without one."""
        if self.metrics is not None:
            self.metrics.request_finished([r or other for r in req.reasons], time.monotonic() - req.arrival)

    def _check_health(self) -> None:
        """Run a two-token request of the engine's own (a prefill and a decode step; nothing else is in flight)
        and set ``failing`` from it: None if it runs, else why."""
        rid = f"health-check-{next(self._ids)}"
        why = None
        try:
            self.llm.add_request([0], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True), request_id=rid)
            for _ in range(100):
                if all(s.finished for s in self.llm.samples(rid)):
                    break
                self.llm.step()
            else:
                why = "the engine's own request did not finish in 100 steps"
        except Exception as e:
            why = repr(e)
        try:
            self.llm.abort_request(rid)  # (unknown or finished: nothing to do)
            for _ in range(100):  # (a compression in flight lands first)
                if not self.llm.has_unfinished():
                    break
                self.llm.step()
        except Exception as e:
            log.debug("the engine's own request %s did not end: %r", rid, e)
        for r in [r for r, seq in self.llm.requests.items() if r.startswith("health-check-") and seq.finished]:
            self.llm.forget(r)  # (this one, and any an earlier failing check left)
        self.failing = None if why is None else f"the engine's steps keep failing: {why}"

    def _send(self, req: _Request, item: Any) -> None:
        _call(req.loop, req.queue.put_nowait, item)

    def _publish(self) -> None:
        self.stats = self.llm.stats()


def _put_all(items: list[tuple[asyncio.Queue, list[Delta]]]) -> None:
    for q, deltas in items:
        q.put_nowait(deltas)


def _call(loop: asyncio.AbstractEventLoop, fn: Callable, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: nobody is listening any more
        pass
