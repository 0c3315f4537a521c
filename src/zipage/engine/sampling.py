"""SamplingParams (vLLM's names) and the sampler."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

GREEDY_BELOW = 1e-5  # temperatures below this decode greedily (dividing by them would overflow)


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    Args:
        max_tokens: tokens to generate at most (>= 1).
        temperature: 0 for greedy decoding (so is any temperature below 1e-5); finite.
        top_p, top_k: nucleus and top-k filtering (top_k=-1 or 0 disables).
        seed: per-request seed: the same seed gives the same tokens whatever else runs alongside.
        stop: strings that end the output (needs a tokenizer); not included in the text.
        stop_token_ids: token ids that end the output (included in ``token_ids``).
        ignore_eos: keep going past the end-of-sequence token (benchmarks with forced lengths).
        min_tokens: do not stop (on EOS or stop ids) before this many tokens.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        def bad(name, allowed, exc=ValueError):
            raise exc(f"SamplingParams.{name}={getattr(self, name)!r} is invalid: {allowed}")

        def integral(x) -> bool:
            return isinstance(x, numbers.Integral) and not isinstance(x, bool)

        def real(x) -> bool:
            return isinstance(x, numbers.Real) and not isinstance(x, bool)

        if not integral(self.max_tokens):
            bad("max_tokens", "expected an int", TypeError)
        self.max_tokens = int(self.max_tokens)
        if self.max_tokens < 1:
            bad("max_tokens", "must be >= 1")
        if not real(self.temperature):
            bad("temperature", "expected a number (0 is greedy)", TypeError)
        if not math.isfinite(self.temperature) or self.temperature < 0:
            bad("temperature", "must be a finite number >= 0 (0 is greedy)")
        if not real(self.top_p):
            bad("top_p", "expected a number in (0, 1]", TypeError)
        if not 0 < self.top_p <= 1:  # (NaN fails this too)
            bad("top_p", "must lie in (0, 1]")
        if not integral(self.top_k):
            bad("top_k", "expected an int (-1 or 0 disables)", TypeError)
        self.top_k = int(self.top_k)
        if self.top_k < -1:
            bad("top_k", "must be an int >= -1 (-1 or 0 disables)")
        if self.seed is not None and not integral(self.seed):
            bad("seed", "expected an int or None", TypeError)
        if self.seed is not None:
            self.seed = int(self.seed)
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "expected a string or a list of non-empty strings", TypeError)
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(integral(t) for t in self.stop_token_ids):
            bad("stop_token_ids", "expected a list of ints", TypeError)
        if not all(type(t) is int for t in self.stop_token_ids):  # numpy ints
            self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        negative = [t for t in self.stop_token_ids if t < 0]
        if negative:
            bad("stop_token_ids", f"token ids are >= 0, got {negative[0]}")
        if not integral(self.min_tokens):
            bad("min_tokens", "expected an int >= 0", TypeError)
        self.min_tokens = int(self.min_tokens)
        if self.min_tokens < 0:
            bad("min_tokens", "must be an int >= 0")
        if self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be <= max_tokens={self.max_tokens}")

    @property
    def greedy(self) -> bool:
        """Greedy decoding: temperature 0, or one so small (< 1e-5, as in vLLM) that sampling is argmax."""
        return self.temperature < GREEDY_BELOW


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           suppress: list[list[int] | None] | None = None) -> list[int]:
    """One token per row of ``logits`` ([n, V]); greedy rows in one argmax, sampled rows one by one.
    ``suppress[i]`` lists token ids row ``i`` may not take (EOS and stop ids before ``min_tokens``)."""
    return sample_tensor(logits, params, generators, suppress).tolist()


def sample_tensor(logits: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator | None],
                  suppress: list[list[int] | None] | None = None) -> torch.Tensor:
    """``sample`` without leaving the device: ``[n]`` int64 token ids on ``logits``' device."""
    logits = logits.float()
    if suppress is not None and any(suppress):
        rows = [i for i, ids in enumerate(suppress) if ids for _ in ids]
        cols = [t for ids in suppress if ids for t in ids]
        logits = logits.index_put((torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)),
                                  torch.tensor(float("-inf"), device=logits.device))
    out = logits.argmax(dim=-1)
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = logits[i] / p.temperature
        if p.top_k > 0 and p.top_k < row.shape[-1]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(row, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            drop = probs.cumsum(dim=-1) - probs > p.top_p
            row = row.scatter(0, order[drop], float("-inf"))
        probs = torch.softmax(row, dim=-1)
        # Non-finite logits (e.g. a model overflowing in half precision) make NaN probabilities,
        # which torch.multinomial rejects (on CUDA with a device-side assert that kills the
        # process): such a row falls back to its argmax, decided on the device (no sync).
        broken = probs.isnan().any()
        token = torch.multinomial(probs.nan_to_num(1.0), 1, generator=generators[i])[0]
        out[i] = torch.where(broken, out[i], token)
    return out
