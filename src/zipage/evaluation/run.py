"""One evaluation configuration through the engine: every prompt's ``n`` samples submitted at once.

A configuration is full KV (``budget=None``: zipage's plain paged engine) or a budget with a scorer
and any other ``ZipageConfig`` fields. Each gets a fresh ``zipage.LLM`` on the same loaded model, so
the configurations compare on the same weights, prompts and sampling seeds.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..engine import LLM, SamplingParams


@dataclass(frozen=True)
class Configuration:
    """``label`` names it in tables; ``budget`` None is full KV; ``fields`` are ZipageConfig fields
    (``scorer`` among them)."""

    label: str
    budget: int | None
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    texts: list[list[str]]  # [problem][sample]
    lengths: list[list[int]]  # output tokens, [problem][sample]
    finish_reasons: list[list[str | None]]
    wall_s: float
    output_tokens: int
    tokens_per_s: float
    stats: dict[str, Any]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def request_seed(seed: int, i: int) -> int:
    """The seed of problem ``i``'s request under ``--seed seed`` (its ``n`` samples take it ``+ 0 .. n-1``): a hash
    of both, below 2**62, so that the streams of one seed share none with another's (``seed + i * n`` gave seed
    1 all but one of the samples of seed 0, shifted by one problem)."""
    digest = hashlib.blake2b(f"zipage-eval:{seed}:{i}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 2


def run_configuration(model: Any, tokenizer: Any, prompts: list[list[int]], params: SamplingParams,
                      config: Configuration, engine_kwargs: dict[str, Any] | None = None, bar: Any = None,
                      warmup: bool = False) -> RunResult:
    """Generate ``params.n`` samples of every prompt with one engine built for ``config``.

    Request ``i`` is seeded ``request_seed(params.seed, i)`` (its samples ``+ 0 .. n-1``), so that every
    configuration draws from the same random streams, and another ``--seed`` from other
    streams. ``bar`` (a tqdm) advances once per finished
    sample. ``warmup`` first runs two prompts through a compression, untimed (kernel compilation,
    CUDA-graph capture and a CPU's first calls would otherwise count against the first configuration's
    tokens/s); reversed, so that no page of theirs is in the prefix cache for the timed run, whose counters
    (compressions, evictions, cache hits, preemptions) count its own work only."""
    kwargs = dict(engine_kwargs or {})
    llm = LLM(model, tokenizer, budget=config.budget, **config.fields, **kwargs)
    device = llm.runner.device
    before: dict[str, Any] = {}
    try:
        if warmup:
            length = (config.budget or 256) + (llm.zipage_config.buffer if llm.zipage_config else 0) + 16
            warm = SamplingParams(max_tokens=min(length, params.max_tokens or length), temperature=0, ignore_eos=True)
            llm.generate([list(reversed(p)) for p in prompts[:2]], warm, use_tqdm=False)
        before = llm.stats()
        seeded = [dataclasses.replace(params, seed=None if params.seed is None else request_seed(params.seed, i))
                  for i in range(len(prompts))]
        _sync(device)
        first = llm.generated_tokens
        start = time.perf_counter()
        ids = [llm.add_request(p, sp) for p, sp in zip(prompts, seeded)]
        shown, done = start, set()
        while llm.has_unfinished():
            ended = {(o.request_id, o.outputs[0].index) for o in llm.step()
                     if o.outputs and o.outputs[0].finish_reason is not None}
            finished = len(ended - done)
            done |= ended
            now = time.perf_counter()
            if bar is not None and (finished or now - shown > 1.0):  # the rate moves even while no sample ends
                bar.set_postfix_str(f"{(llm.generated_tokens - first) / (now - start):,.0f} tok/s", refresh=False)
                if finished:
                    bar.update(finished)
                else:
                    bar.refresh()
                shown = now
        _sync(device)
        wall = time.perf_counter() - start
        outs = [llm.output(i) for i in ids]
        for i in ids:
            llm.forget(i)
        produced = llm.generated_tokens - first
        stats = llm.stats()
        if stats["free_pages"] != stats["total_pages"]:
            raise RuntimeError(f"{config.label}: {stats['total_pages'] - stats['free_pages']} KV pages were not "
                               "given back after every request finished")
        return RunResult(
            texts=[[c.text or "" for c in o.outputs] for o in outs],
            lengths=[[len(c.token_ids) for c in o.outputs] for o in outs],
            finish_reasons=[[c.finish_reason for c in o.outputs] for o in outs],
            wall_s=wall, output_tokens=produced, tokens_per_s=produced / max(wall, 1e-9),
            stats={**{k: stats[k] for k in ("total_pages", "page_size", "max_concurrency")},
                   **{k: stats[k] - before.get(k, 0) for k in ("preemptions", "compressions", "evicted_tokens",
                                                               "prefix_cache_hits")}},
        )
    finally:
        del llm
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
