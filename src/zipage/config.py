"""ZipageConfig: every knob of Compressed PagedAttention, validated up front.

The memory defaults follow the Zipage paper (budget 2048 tokens, observation
window 16). The scorer defaults do not: measured on SmolLM2-135M over MATH-500
text (benchmarks/results/quality.md), the paper's redundancy term (lambda 0.2,
tau 0.4) and decayed global score (G-KV, alpha 0.8) both lowered fidelity to
full KV, so the default ``zipage`` scorer uses the window attention alone
(mean over a GQA group, max-pooled over 5 neighbours at the first compression)
plus a recency floor: the last ``recent`` tokens (at most half the budget) are
always kept.
``ZipageConfig.paper()`` (fields ``PAPER_SCORER``) gives the paper's settings.

This module imports nothing of the library (scoring depends on config, not the other way
round): a scorer name is checked where the scorer is built (``zipage.scoring.get_scorer``, by
``ZipageCache`` and ``LLM`` when they are constructed). ``compresses`` and ``next_compression``
hold the compression trigger that ``generate()`` and the engine share.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

REDUNDANCY_MODES = ("lightning", "full", "none")
POOLING_MODES = ("max", "avg", "none")
GROUP_REDUCES = ("max", "mean")
POOLING_SCOPES = ("first", "all")
GLOBAL_MODES = ("max", "sum")
WINDOW_REDUCES = ("mean", "max")
KV_CACHE_DTYPES = ("auto", "fp8", "int8")  # the model's dtype, e4m3 (vLLM's name) or int8 codes with per-token scales


def check_kv_cache_dtype(value: Any, where: str = "ZipageConfig.kv_cache_dtype") -> str:
    """``value`` if it names a KV cache dtype (``KV_CACHE_DTYPES``), else a ValueError naming ``where``."""
    if not isinstance(value, str) or value not in KV_CACHE_DTYPES:
        raise ValueError(f"{where}={value!r} is invalid: expected one of {KV_CACHE_DTYPES} (\"auto\": the model's "
                         "dtype; \"fp8\": e4m3 codes, \"int8\": int8 codes, each with a float32 scale per token and KV head)")
    return value


def check_kv_rotation(value: Any, kv_cache_dtype: str, where: str = "ZipageConfig.kv_rotation={}") -> bool | None:
    """``value`` if it is a ``kv_rotation`` setting for pages of ``kv_cache_dtype`` (None or False; True for
    8-bit pages only), else a TypeError or ValueError naming ``where`` (the setting's name, ``{}`` its value)."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{where.format(repr(value))} is invalid: expected True, False or None (the page type's "
                        "default)")
    if value and kv_cache_dtype not in ("fp8", "int8"):
        raise ValueError(f"{where.format(True)} applies to 8-bit pages (kv_cache_dtype='fp8' or 'int8'), got "
                         f"kv_cache_dtype={kv_cache_dtype!r}, whose pages are stored as they are")
    return value


def _fail(name: str, value: Any, allowed: str, exc: type[Exception] = ValueError) -> None:
    raise exc(f"ZipageConfig.{name}={value!r} is invalid: {allowed}")


def _check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, value, f"expected an int, got {type(value).__name__}", TypeError)
    if low is not None and value < low:
        _fail(name, value, f"must be >= {low}")
    if high is not None and value > high:
        _fail(name, value, f"must be <= {high}")


def _check_float(name: str, value: Any, low: float, high: float | None, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(name, value, f"expected a number, got {type(value).__name__}", TypeError)
    bad_low = not value > low if low_open else not value >= low  # (NaN fails both)
    if bad_low or (high is not None and not value <= high):
        lo = f"({low}" if low_open else f"[{low}"
        hi = f"{high}]" if high is not None else "inf)"
        _fail(name, value, f"must lie in {lo}, {hi}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str):
        _fail(name, value, f"expected one of {choices}, got {type(value).__name__}", TypeError)
    if value not in choices:
        _fail(name, value, f"expected one of {choices}")


# The Zipage paper's scorer settings (docs/method.md), kept reachable as ``ZipageConfig.paper()``.
PAPER_SCORER: dict[str, Any] = dict(
    window=16, use_global=True, global_decay=0.8, redundancy="lightning", redundancy_lambda=0.2,
    redundancy_tau=0.4, similarity_threshold=0.5, pooling="max", pooling_kernel=5, pooling_scope="first",
    group_reduce="max", window_reduce="mean", global_mode="max", value_weight=False, recent=0,
)


_DEFAULT_WINDOW = 16


@dataclass
class ZipageConfig:
    """Configuration of a compressed paged KV cache.

    Args:
        budget: tokens kept per sequence (per layer and KV head) after a compression.
        page_size: tokens per KV page (a power of two; the Triton kernels take 16..256).
        buffer: tokens that may accumulate beyond the budget before the next
            compression (defaults to one page). A sequence never stores more than
            ``budget + buffer`` tokens once its prompt has been compressed.
        window: observation window: the last ``window`` queries score the cache
            and the last ``window`` tokens are always kept.
        scorer: a scorer name (see ``zipage.list_scorers()``; an unknown one is refused when the
            cache or engine builds the scorer) or a ``Scorer`` object.
        sinks: the first ``sinks`` tokens are always kept (0 disables).
        use_global: keep a decayed global score across compressions (G-KV).
        global_decay: the decay ``alpha`` of the global score: s = max(s_now, alpha * s_prev).
        redundancy: ``"lightning"`` (keys compared within their page), ``"full"``
            (all pairs) or ``"none"``.
        redundancy_lambda: final = lambda * attention - (1 - lambda) * redundancy.
        redundancy_tau: temperature of the redundancy softmax.
        similarity_threshold: cosine similarity above which two keys are near-duplicates.
        pooling: ``"max"``, ``"avg"`` or ``"none"``: pooling of the attention score
            over neighbouring positions.
        pooling_kernel: odd pooling width.
        pooling_scope: ``"first"`` (the paper: pool only at a sequence's first compression) or
            ``"all"`` (pool the window attention at every compression). In ``generate()`` the rows of a
            batch are compressed together, so "first" is the batch's first compression: a left-padded row
            whose first compression evicted only padding is not pooled at its next one.
        group_reduce: how the zipage scorer reduces the query heads of a GQA group: ``"mean"``
            (default; measured 0.1-0.2 points of top-1 better at 1/16 to 1/4 of the length) or
            ``"max"`` (the paper).
        window_reduce: how the zipage scorer reduces the window queries: ``"mean"`` (the paper) or
            ``"max"`` (a token counts as much as the window query that needs it most).
        recent: the zipage scorer ranks the last ``min(recent, budget // 2)`` stored tokens above
            every other token (a recency floor beyond the observation window; 0 disables).
        global_mode: how the zipage scorer folds in the previous score: ``"max"`` (G-KV,
            ``max(s_now, alpha * s_prev)``) or ``"sum"`` (``s_now + alpha * s_prev``, a decayed
            accumulation).
        value_weight: multiply the zipage attention score of a token by the L2 norm of its value
            (a token that draws attention but writes a tiny value matters little).
        seed: seed of the ``random`` scorer (one stream of draws per cache or engine). The settings from
            ``use_global`` to ``seed`` are scorer settings (``SCORER_FIELDS``): each built-in scorer reads some
            (``Scorer.config_fields``) and refuses the others set away from their defaults.
        layer_stride: layers compressed together in one batch of kernel launches. None (default)
            takes as many as fit in ``compress_scratch_bytes`` of gathered keys; fewer layers per
            batch bound the scratch memory (the paper uses 8), more cut launch overhead.
        compress_scratch_bytes: scratch memory a compression may use when ``layer_stride`` is None.
        kv_cache_dtype: how stored keys and values are kept: ``"auto"`` (the model's dtype) or
            ``"fp8"`` (e4m3 codes with a float32 scale per token and KV head: half the bytes of bf16
            per kept token, so twice the tokens or requests in the same memory) or ``"int8"`` (int8
            codes of keys and values in a Hadamard-rotated basis, the same bytes and scales; far less
            rounding error in attention logits than e4m3, ``benchmarks/results/fp8/``).
        exact_tail: 8-bit pages only: each query reads its last ``exact_tail`` tokens (itself included)
            in the model's dtype, the older ones from the pages (0: every token from the pages). The
            rounding error that matters most is the recent tokens': with 16 on SmolLM2, nothing evicted, FP8
            pages lose 1.4 points of top-1 agreement instead of 3.2 (``benchmarks/results/fp8/``); with
            eviction 0.25 / 0.95 instead of 0.84 / 1.72 at budgets of 1/8 / 1/4 of the length, and with 32
            0.22 / 0.49; with FP8 pages' scale search (``kernels/fp8.py``) 0.39 / 0.42 with 16 and 0.23 /
            0.27 with 32, and with the keys' search weighted by the queries (the default now) 0.10 / 0.24 with
            16 and 0.17 / 0.49 with 32. Those ran 4 sequences, where one flipped rounding moves the figure at
            1/4 by a third of a point; on 8, with the store as it is now, 16 loses 0.05 / 0.53 and at 1/4 32
            loses 0.32 and 64 0.20 (``benchmarks/results/quality_fp8_qweights_products_8seq_*``): 32, within
            half a point in every run so far, is the setting to use with FP8 pages. The cache
            keeps the last ``exact_tail - 1`` tokens' keys and values beside the pages, and every compression
            keeps those tokens, as it keeps the observation window (``kept_last``; with a longer tail than
            the window, a scorer's choice among the rest is made without them; where a compression evicts
            padding from those last tokens, the older tokens that move into the last slots are read from the
            pages). ``exact_tail - 1 + sinks`` must fit in the budget. A step of several tokens (a prompt, a
            chunk) reads all of its own tokens exactly. The engine keeps a ring of each query slot's last
            ``exact_tail`` keys and values; its prefill chunks read their own tokens and the
            ``exact_tail - 1`` before them exactly, back to the first token it computed (the prefix cache's
            pages hold codes only).
        kv_rotation: 8-bit pages only: store keys and values in a Hadamard-rotated basis (queries rotated
            the same way, attention outputs rotated back, so every logit is unchanged and only the rounding
            differs). None (default): the page type's default, INT8 pages rotated (where the head dim is a
            power of two), FP8 pages not. True rotates FP8 pages too: on SmolLM2 it halves what FP8 pages
            cost in top-1 (full KV with ``exact_tail=128``: 0.25 points against bf16 pages, 0.51 unrotated),
            while on Gemma 3 270M it makes e4m3 rounding worse (``benchmarks/results/fp8/``); it needs a
            power-of-two head dim. False stores INT8 pages unrotated.
        extra: settings of a scorer of your own, by name (its ``knobs``; see the guide "Writing a scorer").
    """

    budget: int = 2048
    page_size: int = 256
    buffer: int | None = None
    window: int = _DEFAULT_WINDOW
    scorer: Any = "zipage"
    sinks: int = 0
    use_global: bool = False
    global_decay: float = 0.8
    redundancy: str = "none"
    redundancy_lambda: float = 0.2
    redundancy_tau: float = 0.4
    similarity_threshold: float = 0.5
    pooling: str = "max"
    pooling_kernel: int = 5
    pooling_scope: str = "first"
    group_reduce: str = "mean"
    window_reduce: str = "mean"
    recent: int = 64
    global_mode: str = "max"
    value_weight: bool = False
    seed: int = 0
    layer_stride: int | None = None
    compress_scratch_bytes: int = 512 * 2**20
    kv_cache_dtype: str = "auto"
    exact_tail: int = 0
    kv_rotation: bool | None = None
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # A buffer left to its default follows the page size (``replace``); one given, even equal to it, stays.
        # (An attribute, not a field: repr, equality and the fields' list are as before.)
        self._buffer_follows = self.buffer is None
        if self.buffer is None:
            self.buffer = self.page_size if isinstance(self.page_size, int) else 0
        self.validate()

    def validate(self) -> None:
        """Raise ValueError/TypeError naming the first invalid field."""
        _check_int("budget", self.budget, low=1)
        _check_int("page_size", self.page_size, low=1, high=1024)
        if self.page_size & (self.page_size - 1):
            _fail("page_size", self.page_size, "must be a power of two (1, 2, 4, ..., 1024)")
        _check_int("buffer", self.buffer, low=1)
        _check_int("window", self.window, low=1)
        _check_int("sinks", self.sinks, low=0)
        if self.window > self.budget:
            if self.window == _DEFAULT_WINDOW:  # a window left at its default: the budget is what was set too small
                _fail("budget", self.budget, f"it is smaller than the observation window (window={self.window}): "
                      f"give a budget >= {self.window} or a smaller window")
            _fail("window", self.window, f"the observation window must fit in the budget (budget={self.budget}): "
                  f"give a window <= {self.budget} or a larger budget")
        if self.sinks + self.window > self.budget:
            _fail("sinks", self.sinks, f"sinks + window ({self.sinks} + {self.window}) must fit in budget={self.budget}")
        if not isinstance(self.use_global, bool):
            _fail("use_global", self.use_global, "expected a bool", TypeError)
        _check_float("global_decay", self.global_decay, 0.0, 1.0)
        _check_choice("redundancy", self.redundancy, REDUNDANCY_MODES)
        _check_float("redundancy_lambda", self.redundancy_lambda, 0.0, 1.0)
        _check_float("redundancy_tau", self.redundancy_tau, 0.0, None, low_open=True)
        _check_float("similarity_threshold", self.similarity_threshold, -1.0, 1.0)
        _check_choice("pooling", self.pooling, POOLING_MODES)
        _check_int("pooling_kernel", self.pooling_kernel, low=1)
        if self.pooling_kernel % 2 == 0:
            _fail("pooling_kernel", self.pooling_kernel, "must be odd so the pooling stays centred")
        _check_choice("pooling_scope", self.pooling_scope, POOLING_SCOPES)
        _check_choice("group_reduce", self.group_reduce, GROUP_REDUCES)
        _check_choice("global_mode", self.global_mode, GLOBAL_MODES)
        _check_choice("window_reduce", self.window_reduce, WINDOW_REDUCES)
        _check_int("recent", self.recent, low=0)
        if not isinstance(self.value_weight, bool):
            _fail("value_weight", self.value_weight, "expected a bool", TypeError)
        _check_int("seed", self.seed)
        if self.layer_stride is not None:
            _check_int("layer_stride", self.layer_stride, low=1)
        _check_int("compress_scratch_bytes", self.compress_scratch_bytes, low=1)
        check_kv_cache_dtype(self.kv_cache_dtype)
        _check_int("exact_tail", self.exact_tail, low=0)
        if self.exact_tail and self.kv_cache_dtype not in ("fp8", "int8"):
            _fail("exact_tail", self.exact_tail, f"it applies to 8-bit pages (kv_cache_dtype='fp8' or 'int8'), "
                  f"got kv_cache_dtype={self.kv_cache_dtype!r}, whose pages are exact already")
        if self.sinks + self.kept_last > self.budget:  # (the window alone was checked above)
            _fail("exact_tail", self.exact_tail, f"a compression keeps the last exact_tail - 1 tokens and the first "
                  f"sinks ({self.exact_tail - 1} + {self.sinks}), which must fit in budget={self.budget}: give "
                  f"exact_tail <= {self.budget - self.sinks + 1} or a larger budget")
        check_kv_rotation(self.kv_rotation, self.kv_cache_dtype)
        if not isinstance(self.extra, dict):
            _fail("extra", self.extra, "expected a dict", TypeError)
        # Only the form of the scorer: its name is looked up where the scorer is built
        # (zipage.scoring.get_scorer), as scoring depends on config and not the other way round.
        if not isinstance(self.scorer, str) and not callable(getattr(self.scorer, "score", None)):
            _fail("scorer", self.scorer, "expected a scorer name (see zipage.list_scorers()) or a Scorer object",
                  TypeError)

    @property
    def capacity(self) -> int:
        """Most tokens a sequence stores between two compressions (budget + buffer)."""
        return self.budget + self.buffer

    @property
    def kept_last(self) -> int:
        """Last stored tokens every compression keeps: the observation window, or the ``exact_tail - 1`` tokens
        before a query that it reads in the model's dtype where those are more (they must stay where they are)."""
        return max(self.window, self.exact_tail - 1)

    @property
    def recent_kept(self) -> int:
        """Last stored tokens the zipage scorer ranks above every other token: ``min(recent, budget // 2)``."""
        return min(self.recent, self.budget // 2)

    # The compression trigger: the one rule generate() and the engine both follow.
    def compresses(self, stored: int, new_tokens: int) -> bool:
        """True when a step storing ``new_tokens`` more must first compress the ``stored`` tokens to the
        budget: there are more than the budget and the step would go past ``budget + buffer``."""
        return stored > self.budget and stored + new_tokens > self.capacity

    def next_compression(self, stored: int, new_tokens: int = 1) -> int:
        """The stored length at which a sequence that now stores ``stored`` tokens and then ``new_tokens``
        more per step is next compressed (``stored`` itself when it is compressed before its next step): the
        least ``s >= stored`` with ``compresses(s, new_tokens)``, i.e. ``max(stored, budget + 1, budget +
        buffer - new_tokens + 1)``; with one token a step, ``max(stored, budget + 1, budget + buffer)``.

        generate() stores a whole prompt in one step, so a sequence's first compression comes at
        ``next_compression(len(prompt))`` and each later one at ``next_compression(budget)``."""
        return max(stored, self.budget + 1, self.capacity - new_tokens + 1)

    @classmethod
    def from_dict(cls, values: dict | None) -> ZipageConfig:
        """Build from a dict such as ``generate(cache_config=...)``; unknown keys are an error."""
        values = dict(values or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown ZipageConfig field(s) {unknown}; valid fields: {sorted(names)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict :meth:`from_dict` takes back (a buffer that follows the page size as None).
        transformers calls it to save a ``GenerationConfig`` whose ``cache_config`` is a ``ZipageConfig``
        (without it the config was saved as null and a reloaded generate() ran the defaults)."""
        values = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}
        if getattr(self, "_buffer_follows", True) and self.buffer == self.page_size:
            values["buffer"] = None
        if not values["extra"]:
            del values["extra"]
        return values

    @classmethod
    def paper(cls, **changes: Any) -> ZipageConfig:
        """The Zipage paper's scorer settings (``PAPER_SCORER``), with ``changes`` on top."""
        return cls(**{**PAPER_SCORER, **changes})

    def replace(self, **changes: Any) -> ZipageConfig:
        """A copy with ``changes``. A buffer that follows the page size (the default, one page) follows
        a new ``page_size`` too, as it would in a config built with that page size; a buffer that was given
        (even one equal to the page size) is kept."""
        follows = getattr(self, "_buffer_follows", True) and self.buffer == self.page_size
        if "buffer" not in changes and follows:
            changes["buffer"] = None
        return dataclasses.replace(self, **changes)


# The settings of ZipageConfig that only some scorers read (each built-in names its own in ``Scorer.config_fields``),
# with their defaults: a scorer is refused a setting of these it does not read, set away from its default.
SCORER_FIELDS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(ZipageConfig)
    if f.name in ("use_global", "global_decay", "global_mode", "redundancy", "redundancy_lambda", "redundancy_tau",
                  "similarity_threshold", "pooling", "pooling_kernel", "pooling_scope", "group_reduce", "window_reduce",
                  "recent", "value_weight", "seed")
}
