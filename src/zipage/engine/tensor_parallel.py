"""How ``LLM(..., tensor_parallel_size=N)`` becomes rank 0 of N ranks (the rest of ``LLM`` is unchanged).

Rank 0 schedules and samples; it broadcasts what each step runs (``step_plan.py``). The other
ranks are spawned by the engine (``parallel.spawn``) or, under ``torchrun``, are the same script's
other processes: their ``LLM(...)`` call serves rank 0 until it closes, then ends the process.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .parallel import Ranks, join_torchrun, spawn, under_torchrun
from .step_plan import DriverRunner, WorkerJob, prepare, serve


def start_ranks(model: torch.nn.Module, source: Any, dtype: Any, device: Any, size: int, timeout: float) -> Ranks:
    """Start (or join) the ranks and keep rank 0's shard of ``model``; returns rank 0's view.

    ``source`` is what the caller gave ``LLM``: a Hub id or folder (each spawned rank loads it; rank 0
    loaded ``model`` from it on the CPU, and ``device`` says where the ranks run) or the model itself."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < 10**7:
        raise ValueError(f"tensor_parallel_timeout={timeout!r} is invalid: expected seconds > 0 (and finite)")
    by_name = isinstance(source, (str, os.PathLike))
    base = torch.device(device or "cpu") if by_name else next(model.parameters()).device
    if base.type == "cuda" and base.index is None:
        base = torch.device("cuda", 0)
    if under_torchrun():
        ranks = join_torchrun(size, base, timeout)
        if ranks.rank != 0:  # this process only serves rank 0, then ends
            try:
                serve(ranks, prepare(model, ranks))
            finally:
                ranks.close()
            raise SystemExit(0)
    else:
        ranks = spawn(size, base, timeout, WorkerJob(source if by_name else model, dtype))
    try:
        prepare(model, ranks)
        with ranks.guard("sharding the model"):
            ranks.gather(None, startup=True)  # every rank holds its shard (spawned ranks may load a checkpoint)
        if ranks.device.type == "cuda":  # a model object sent by CUDA IPC: its full weights are free now
            torch.cuda.ipc_collect()
            torch.cuda.empty_cache()
    except BaseException:
        ranks.close()
        raise
    return ranks


def driver_runner(ranks: Ranks, model: torch.nn.Module, num_pages: int, page_size: int, zipage_config: Any,
                  scorer: Any, num_slots: int, fuse_ops: bool, kv_cache_dtype: str = "auto",
                  exact_tail: int = 0, kv_rotation: bool | None = None) -> DriverRunner:
    """Rank 0's runner, once every rank has built its own pools (rank 0 chose their size)."""
    with ranks.guard("building the runners"):
        ranks.send(("setup", {"num_pages": num_pages, "page_size": page_size, "zipage_config": zipage_config,
                              "num_slots": num_slots, "fuse_ops": fuse_ops, "kv_cache_dtype": kv_cache_dtype,
                              "exact_tail": exact_tail, "kv_rotation": kv_rotation}))
        runner = DriverRunner(model, num_pages, page_size, zipage_config, scorer, num_slots, fuse_ops=fuse_ops,
                              kv_cache_dtype=kv_cache_dtype, ranks=ranks, exact_tail=exact_tail,
                              kv_rotation=kv_rotation)
        ranks.gather(None, startup=True)  # (every rank allocates its pools)
    return runner
