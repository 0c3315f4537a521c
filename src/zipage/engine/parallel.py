"""Tensor-parallel ranks: starting them, talking to them, and stopping when one dies.

``LLM(..., tensor_parallel_size=N)`` either starts ranks 1..N-1 itself (one spawned process each,
the caller's process being rank 0) or, run under ``torchrun``, joins the ranks torchrun started.
Rank 0 owns the scheduler, the page allocator and the sampler; the other ranks only replay what
rank 0 sends (``step_plan.py``). Two process groups join the ranks:

* ``data``: NCCL on GPUs (gloo on a CPU) for the all-reduces of the forward and the sampled tokens;
  its ``timeout`` bounds how long a rank waits inside a step.
* ``control``: gloo, for rank 0's messages. Workers wait on it without a deadline (an engine may
  idle for hours), so a dead rank 0 is noticed by its closed sockets and, for spawned workers, by a
  thread watching the parent process. Rank 0 runs its side on a thread of its own and waits for it at
  most ``timeout``: a rank that is stuck (alive, its sockets open, never taking the message) stops the
  engine instead of holding rank 0, its ``close()`` and the interpreter's exit forever.

A rank that fails reports its traceback (spawned workers, through a queue) and exits; rank 0 then
raises ``TensorParallelError`` naming it, stops the other ranks and refuses every later step.
NVLink multicast (NVLS) stays off unless the environment says otherwise: ``NCCL_NVLS_ENABLE=0``.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

CONTROL_TIMEOUT = timedelta(days=365)  # workers wait for rank 0's next step without a deadline
STARTUP_SECONDS = 600.0  # how long rank 0 waits for a spawned rank to come up (imports, on a busy host)


class TensorParallelError(RuntimeError):
    """A rank of a tensor-parallel engine failed or died; the engine cannot go on."""


@dataclass
class Ranks:
    """One process's view of the tensor-parallel group."""

    rank: int
    size: int
    device: torch.device
    data: Any  # ProcessGroup for the forward's collectives
    control: Any  # gloo ProcessGroup for rank 0's messages
    procs: list = field(default_factory=list)  # rank 0 of a spawned group: the worker processes
    reports: Any = None  # rank 0 of a spawned group: a queue of (kind, rank, text) from the workers
    owns_default: bool = False  # this group initialised torch.distributed (and destroys it)
    dead: str | None = None  # why the group stopped
    timeout: float = 600.0  # seconds rank 0 waits for the other ranks to take part in a control message
    _jobs: Any = None  # rank 0: the queue of its control thread (started at the first message)

    # ----------------------------------------------------------------------------- rank 0's side
    def send(self, message: Any) -> None:
        """Broadcast ``message`` (picklable) to every worker."""
        self.check()
        self._control(lambda: dist.broadcast_object_list([message], src=0, group=self.control),
                      f"message {message[0]!r}" if isinstance(message, tuple) and message else "message")

    def gather(self, value: Any, startup: bool = False) -> list[Any]:
        """Every rank's ``value`` on rank 0 (rank order); None on the workers. ``startup``: rank 0 waits without a
        deadline (a spawned rank loading a large checkpoint may take longer than ``timeout``; a rank that
        exits is still noticed by its closed sockets)."""
        out = [None] * self.size if self.rank == 0 else None
        self._control(lambda: dist.gather_object(value, out, dst=0, group=self.control), "gather",
                      math.inf if startup else None)
        return out

    def _control(self, fn: Any, what: str, seconds: float | None = None) -> Any:
        """``fn()``, a collective of the control group: on a worker as it is (it waits for rank 0 without a
        deadline); on rank 0 on its control thread, waited for ``seconds`` (``timeout``) at most, after which
        the group is stopped (the workers killed, which ends the collective) and ``TensorParallelError`` raised."""
        if self.rank != 0:
            return fn()
        if self._jobs is None:
            self._jobs = queue.SimpleQueue()
            threading.Thread(target=_run_jobs, args=(self._jobs,), name="zipage-tp-control", daemon=True).start()
        seconds = self.timeout if seconds is None else seconds
        done, box = threading.Event(), []
        self._jobs.put((fn, box, done))
        if not done.wait(None if math.isinf(seconds) else seconds):
            stopped = ("the engine stopped every rank" if self.procs else
                       "rank 0 stopped (the launcher must stop the ranks it started)")
            self.fail(f"tensor-parallel {what}: the other ranks did not take part within {seconds:.0f} s "
                      f"(tensor_parallel_timeout); a rank is stuck, {stopped}")
            raise TensorParallelError(self.dead)
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def check(self) -> None:
        """Raise if the group stopped or a spawned worker exited."""
        if self.dead is None:
            for r, p in enumerate(self.procs, start=1):
                if p.exitcode is not None:
                    self.fail(f"tensor-parallel rank {r} exited (code {p.exitcode}){self._report()}")
        if self.dead is not None:
            raise TensorParallelError(self.dead)

    def _report(self, wait: float = 0.0) -> str:
        """The traceback a worker sent before exiting, if any."""
        if self.reports is None:
            return ""
        deadline = time.monotonic() + wait
        texts = []
        while True:
            try:
                kind, r, text = self.reports.get(timeout=max(0.0, deadline - time.monotonic()) or 0.01)
            except (queue.Empty, OSError, EOFError, ValueError):
                break
            if kind == "error":
                texts.append(f"rank {r}: {text}")
        return (":\n" + "\n".join(texts)) if texts else ""

    @contextlib.contextmanager
    def guard(self, what: str):
        """Around rank 0's collective work: any failure inside stops the group for good (the other
        ranks may be anywhere inside the step), with the failed rank named when one died."""
        self.check()
        try:
            yield
        except BaseException as e:
            if self.dead is None:
                dead = self._exited(wait=2.0 if self.procs else 0.0)
                if dead:
                    why = ", ".join(f"rank {r} exited (code {c})" for r, c in dead)
                    self.fail(f"tensor-parallel {why} during {what}{self._report(wait=2.0)}")
                else:
                    self.fail(f"tensor-parallel {what} failed ({type(e).__name__}: {e}); the engine stopped "
                              "every rank")
            raise TensorParallelError(self.dead) from e

    def _exited(self, wait: float) -> list[tuple[int, int]]:
        """``(rank, exit code)`` of the spawned ranks that exited, waiting up to ``wait`` seconds for one
        (a dying rank's sockets close a moment before its process is gone)."""
        deadline = time.monotonic() + wait
        while True:
            dead = [(r, p.exitcode) for r, p in enumerate(self.procs, start=1) if p.exitcode is not None]
            if dead or time.monotonic() >= deadline:
                return dead
            time.sleep(0.05)

    def fail(self, why: str) -> None:
        """Mark the group dead, stop the workers (they may be blocked in a collective) and let go of
        torch.distributed (this process may start another engine)."""
        if self.dead is None:
            self.dead = why
        self._stop_workers(grace=0.0)
        self._release(abort=True)

    def close(self) -> None:
        """Stop the workers (a clean ``stop`` message first when the group is healthy) and leave
        torch.distributed as it was before the engine."""
        if self.rank == 0 and self.dead is None:
            with contextlib.suppress(Exception):
                self._control(lambda: dist.broadcast_object_list([("stop",)], src=0, group=self.control), "stop",
                              min(self.timeout, 10.0))
            if self.dead is None:
                self.dead = "the engine was closed"
        self._stop_workers(grace=10.0)
        self._release(abort=False)
        if self._jobs is not None:
            self._jobs.put((None, None, None))  # (the control thread ends)
            self._jobs = None

    def _release(self, abort: bool) -> None:
        """Tear down the process groups this engine made (an NCCL group with a dead peer is aborted:
        destroying it could wait on that peer)."""
        if self.owns_default and dist.is_initialized():
            with contextlib.suppress(Exception):
                if abort and self.device.type == "cuda":
                    dist.distributed_c10d._abort_process_group()
                else:
                    dist.destroy_process_group()
        self.owns_default = False

    def watch(self) -> None:
        """Rank 0 of spawned GPU ranks: a thread that aborts the NCCL groups as soon as a worker exits
        unasked, so that a collective waiting for it raises now rather than at the timeout (gloo
        notices a closed socket by itself)."""
        def loop() -> None:
            while self.dead is None:
                if any(p.exitcode is not None for p in self.procs):
                    if self.dead is None:
                        with contextlib.suppress(Exception):
                            dist.distributed_c10d._abort_process_group(self.data)
                    return
                time.sleep(0.5)

        threading.Thread(target=loop, name="zipage-tp-watch", daemon=True).start()

    def _stop_workers(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.exitcode is None:
                p.kill()
                p.join(timeout=5.0)


def _run_jobs(jobs: queue.SimpleQueue) -> None:
    """Rank 0's control thread: runs each ``(fn, box, done)`` in order, its result or error into ``box``."""
    while True:
        fn, box, done = jobs.get()
        if fn is None:
            return
        try:
            box.append((True, fn()))
        except BaseException as e:  # (handed to the waiting caller)
            box.append((False, e))
        done.set()


# ----------------------------------------------------------------------------------------- startup
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device(base: torch.device, rank: int) -> torch.device:
    """Rank ``rank``'s device: the CPU, or the ``rank``-th GPU counted from rank 0's."""
    if base.type != "cuda":
        return torch.device("cpu")
    return torch.device("cuda", (base.index or 0) + rank)


def check_devices(base: torch.device, size: int) -> None:
    """On CUDA, the N GPUs from rank 0's must all be present."""
    if base.type != "cuda":
        return
    first, present = base.index or 0, torch.cuda.device_count()
    if first + size > present:
        raise ValueError(f"tensor_parallel_size={size} needs {size} GPUs from cuda:{first}, but only {present} "
                         f"GPU{'s are' if present != 1 else ' is'} present")


def under_torchrun() -> bool:
    """True when this process is one of several started by torchrun (or another launcher that sets
    ``RANK`` / ``WORLD_SIZE``)."""
    return _env_int("WORLD_SIZE", "1") > 1 and "RANK" in os.environ


def _env_int(name: str, default: str) -> int:
    value = os.environ.get(name, default)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} (set by torchrun or another launcher): "
                         "expected a whole number") from None


def _init(rank: int, size: int, device: torch.device, timeout: float, init_method: str | None) -> Ranks:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    world = getattr(dist.distributed_c10d, "_world", None)
    count = getattr(world, "group_count", None)
    try:
        if owns:
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                                    timeout=timedelta(seconds=timeout))
        elif dist.get_world_size() != size:
            raise ValueError(f"tensor_parallel_size={size} but torch.distributed runs {dist.get_world_size()} "
                             "processes: give tensor_parallel_size equal to torchrun's --nproc-per-node")
        data = dist.new_group(backend=backend, timeout=timedelta(seconds=timeout))
        control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    except BaseException:
        if owns:  # leave torch.distributed as it was: a failed start counted a group, and the next engine's
            # ranks (new processes, counting from 0) would wait for group names this process no longer uses
            if dist.is_initialized():
                with contextlib.suppress(Exception):
                    dist.destroy_process_group()
            if count is not None and not dist.is_initialized():
                world.group_count = count
        raise
    return Ranks(rank, size, device, data, control, owns_default=owns, timeout=timeout)


def join_torchrun(size: int, base: torch.device, timeout: float) -> Ranks:
    """This process's place in a group torchrun started (every rank constructs the engine)."""
    rank = _env_int("RANK", "0")
    local = _env_int("LOCAL_RANK", str(rank))
    world = _env_int("WORLD_SIZE", "1")
    if world != size:  # (every rank would wait for the others at the rendezvous until the timeout)
        raise ValueError(f"tensor_parallel_size={size} but the launcher started {world} processes (WORLD_SIZE): give "
                         "tensor_parallel_size equal to torchrun's --nproc-per-node")
    device = torch.device("cuda", local) if base.type == "cuda" else torch.device("cpu")
    if base.type == "cuda":
        check_devices(torch.device("cuda", 0), local + 1)
    return _init(rank, size, device, timeout, None if dist.is_initialized() else "env://")


def spawn(size: int, base: torch.device, timeout: float, work: Any) -> Ranks:
    """Start ranks 1..size-1 (``work(ranks)`` runs in each, see ``step_plan.serve``) and join them as rank 0.

    ``work`` and what it holds (a model object: shared memory on a CPU, CUDA IPC on a GPU) are
    pickled to each process when it starts."""
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process: run every rank of the "
                           "engine under torchrun, or start the engine in a process of its own")
    check_devices(base, size)
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    reports = ctx.Queue()
    method = f"tcp://127.0.0.1:{free_port()}"
    procs = []
    try:
        for r in range(1, size):
            p = ctx.Process(target=_worker, args=(r, size, rank_device(base, r), timeout, method, work, reports,
                                                  os.getpid()), name=f"zipage-tp-rank{r}", daemon=True)
            p.start()
            procs.append(p)
        _await_workers(procs, reports)
        ranks = _init(0, size, rank_device(base, 0), timeout, method)
    except BaseException:
        for p in procs:
            p.kill()
        raise
    ranks.procs, ranks.reports = procs, reports
    if base.type == "cuda":
        ranks.watch()
    return ranks


def _await_workers(procs: list, reports) -> None:
    """Wait until every spawned rank has imported what it needs (an import error shows here)."""
    alive: set[int] = set()
    deadline = time.monotonic() + STARTUP_SECONDS
    while len(alive) < len(procs):
        try:
            kind, r, text = reports.get(timeout=0.5)
        except queue.Empty:
            kind = None
        if kind == "alive":
            alive.add(r)
        elif kind == "error":
            raise TensorParallelError(f"tensor-parallel rank {r} failed to start:\n{text}")
        for r, p in enumerate(procs, start=1):
            if r not in alive and p.exitcode is not None:
                raise TensorParallelError(f"tensor-parallel rank {r} exited while starting (code {p.exitcode})")
        if time.monotonic() > deadline:
            raise TensorParallelError(f"tensor-parallel ranks did not start within {STARTUP_SECONDS:.0f} s")


def _watch_parent(parent: int) -> None:
    """A spawned rank ends itself when rank 0's process is gone (no rank outlives the engine)."""
    def loop() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=loop, name="zipage-tp-parent-watch", daemon=True).start()


def _worker(rank: int, size: int, device: torch.device, timeout: float, method: str, work: Any, reports,
            parent: int) -> None:
    """A spawned rank's whole life: join the group, run ``work``, report a failure and exit."""
    _watch_parent(parent)
    code = 0
    try:
        if device.type == "cpu":  # share the cores with the other ranks rather than oversubscribe them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
        reports.put(("alive", rank, ""))
        ranks = _init(rank, size, device, timeout, method)
        work(ranks)
    except BaseException:
        code = 1
        with contextlib.suppress(Exception):
            reports.put(("error", rank, traceback.format_exc()))
    finally:
        with contextlib.suppress(Exception):
            reports.close()
            reports.join_thread()
    os._exit(code)  # (no teardown of process groups whose peers may be gone: it could block)
