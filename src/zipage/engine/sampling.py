"""SamplingParams: how a request picks its tokens and when it stops (vLLM's names and meanings).

The sampler itself (batched, on the device) is in ``sampler.py``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

GREEDY_BELOW = 1e-5  # temperatures below this decode greedily (dividing by them would overflow)


class _EngineBudget:
    """The default of ``SamplingParams.budget``: the engine's own budget (``LLM(budget=...)``)."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "ENGINE_BUDGET"

    def __reduce__(self):
        return (_EngineBudget, ())

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


ENGINE_BUDGET: Any = _EngineBudget()


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    Args:
        max_tokens: tokens to generate at most (>= 1); None: as many as the request may take (what
            ``max_model_len`` leaves after the prompt and, for full KV, what the KV pool holds), as in vLLM.
        temperature: 0 for greedy decoding (so is any temperature below 1e-5); finite.
        top_p, top_k: nucleus and top-k filtering (top_k=-1 or 0 disables).
        seed: per-request seed: the same seed gives the same tokens whatever else runs alongside.
            With ``n > 1`` sample ``i`` uses ``seed + i`` (as vLLM does).
        stop: strings that end the output (needs a tokenizer); not in the text unless
            ``include_stop_str_in_output``.
        stop_token_ids: token ids that end the output (included in ``token_ids``).
        ignore_eos: keep going past the end-of-sequence token (benchmarks with forced lengths).
        min_tokens: do not stop (on EOS or stop ids) before this many tokens.
        n: samples of the prompt; they share its pages through the prefix cache.
        min_p: drop tokens whose probability is below ``min_p`` times the most likely one's.
        repetition_penalty: > 1 discourages every token already in the prompt or the output (a
            positive logit is divided by it, a negative one multiplied); 1 disables.
        presence_penalty: subtracted from the logit of every token the output already holds
            (-2..2; negative values encourage them).
        frequency_penalty: subtracted once per occurrence in the output so far (-2..2).
        logprobs: report the sampled token's log-probability and the ``logprobs`` most likely
            tokens' (0: the sampled one only; None: nothing). They are the model's own
            distribution, before penalties, temperature and filtering (vLLM's default).
        include_stop_str_in_output: keep the stop string that ended the output in its text (and the
            text of the token that ended it: EOS or one of ``stop_token_ids``, which ``token_ids`` hold
            either way).
        skip_special_tokens: leave special tokens (end of turn, ...) out of the output's text
            (stop strings are searched in that text); ``token_ids`` hold every token either way.
        budget: tokens kept in this request's KV cache after a compression; None for full KV
            (never compressed); by default the engine's budget.
        logit_bias: ``{token id: bias}`` added to those tokens' logits before penalties, temperature and
            filtering (OpenAI's and vLLM's ``logit_bias``; -100..100, where -100 all but bans a token and 100
            all but forces it). Log-probabilities stay the model's own.
        allowed_token_ids: the only tokens the request may sample (vLLM's ``allowed_token_ids``): every other
            token's logit is -inf before the bias and the rest (log-probabilities stay the model's own).
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    n: int = 1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    budget: Any = ENGINE_BUDGET
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(name, allowed, exc=ValueError):
            raise exc(f"SamplingParams.{name}={getattr(self, name)!r} is invalid: {allowed}")

        def integral(x) -> bool:
            return isinstance(x, numbers.Integral) and not isinstance(x, bool)

        def real(x) -> bool:
            return isinstance(x, numbers.Real) and not isinstance(x, bool)

        def check_int(name, low, what):
            value = getattr(self, name)
            if not integral(value):
                bad(name, f"expected {what}", TypeError)
            setattr(self, name, int(value))
            if value < low:
                bad(name, f"must be {what}")

        def check_real(name, ok, what):
            value = getattr(self, name)
            if not real(value):
                bad(name, f"expected {what}", TypeError)
            setattr(self, name, float(value))
            if not ok(float(value)):  # (NaN fails every range check)
                bad(name, f"must be {what}")

        if self.max_tokens is not None:  # (None: the engine fills in the most the request may take)
            check_int("max_tokens", 1, "an int >= 1, or None for as many as the request may take")
        check_real("temperature", lambda t: math.isfinite(t) and t >= 0, "a finite number >= 0 (0 is greedy)")
        check_real("top_p", lambda p: 0 < p <= 1, "a number in (0, 1]")
        check_int("top_k", -1, "an int >= -1 (-1 or 0 disables)")
        if self.seed is not None and not integral(self.seed):
            bad("seed", "expected an int or None", TypeError)
        if self.seed is not None:
            self.seed = int(self.seed)
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "expected a string or a list of non-empty strings", TypeError)
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(integral(t) for t in self.stop_token_ids):
            bad("stop_token_ids", "expected a list of ints", TypeError)
        if not all(type(t) is int for t in self.stop_token_ids):  # numpy ints
            self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        negative = [t for t in self.stop_token_ids if t < 0]
        if negative:
            bad("stop_token_ids", f"token ids are >= 0, got {negative[0]}")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "expected a bool", TypeError)
        check_int("min_tokens", 0, "an int >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be <= max_tokens={self.max_tokens}")
        check_int("n", 1, "an int >= 1")
        # sample i of n seeds a torch.Generator with seed + i, which takes a 64-bit integer
        if self.seed is not None and not -(2**63) <= self.seed <= 2**64 - self.n:
            bad("seed", f"must be in [-2**63, 2**64 - n] (n={self.n}: the samples use seed .. seed + n - 1)")
        check_real("min_p", lambda p: 0 <= p <= 1, "a number in [0, 1]")
        check_real("repetition_penalty", lambda r: math.isfinite(r) and r > 0, "a finite number > 0 (1 disables)")
        for name in ("presence_penalty", "frequency_penalty"):
            check_real(name, lambda x: -2 <= x <= 2, "a number in [-2, 2]")
        if self.logprobs is not None:
            check_int("logprobs", 0, "an int >= 0, or None")
        if self.budget is not ENGINE_BUDGET and self.budget is not None:
            check_int("budget", 1, "an int >= 1, None for full KV, or left out for the engine's")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or not all(integral(t) and real(b)
                                                                for t, b in self.logit_bias.items()):
                bad("logit_bias", "expected a dict of token id (int) -> bias (number)", TypeError)
            self.logit_bias = {int(t): float(b) for t, b in self.logit_bias.items()}
            negative = [t for t in self.logit_bias if t < 0]
            if negative:
                bad("logit_bias", f"token ids are >= 0, got {negative[0]}")
            outside = [b for b in self.logit_bias.values() if not -100 <= b <= 100]  # (NaN too)
            if outside:
                bad("logit_bias", f"biases lie in [-100, 100], got {outside[0]}")
        if self.allowed_token_ids is not None:
            if not isinstance(self.allowed_token_ids, (list, tuple)) or not all(
                    integral(t) for t in self.allowed_token_ids):
                bad("allowed_token_ids", "expected a list of ints, or None", TypeError)
            self.allowed_token_ids = list(dict.fromkeys(int(t) for t in self.allowed_token_ids))  # (once each)
            if not self.allowed_token_ids:
                bad("allowed_token_ids", "expected at least one token id (None: every token)")
            negative = [t for t in self.allowed_token_ids if t < 0]
            if negative:
                bad("allowed_token_ids", f"token ids are >= 0, got {negative[0]}")

    @property
    def greedy(self) -> bool:
        """Greedy decoding: temperature 0, or one so small (< 1e-5, as in vLLM) that sampling is argmax."""
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        """Whether the logits depend on the tokens seen so far."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


SAMPLING_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def model_sampling_defaults(generation_config: Any) -> dict[str, Any]:
    """The sampling fields a model's ``generation_config`` sets away from transformers' defaults (as vLLM's
    ``generation_config="auto"`` reads them): the defaults of requests that leave them out."""
    if generation_config is None:
        return {}
    diff = generation_config.to_diff_dict()
    defaults = {k: diff[k] for k in SAMPLING_DEFAULT_FIELDS if diff.get(k) is not None}
    try:
        SamplingParams(**defaults)
    except (TypeError, ValueError) as e:
        raise ValueError(f"the model's generation_config sets sampling defaults SamplingParams refuses "
                         f"({defaults}): {e}") from None
    return defaults
