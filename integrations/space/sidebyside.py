"""Full KV against zipage, one token at a time: the engine room of the demo Space.

``side_by_side`` decodes the same prompt twice, step-locked, with transformers' ``DynamicCache``
(full KV) and with a ``zipage.ZipageCache`` held to a budget, and yields a ``Snapshot`` after every
token: both answers so far, the KV bytes each cache holds, and the steps at which zipage compressed.
Greedy decoding here gives exactly what ``model.generate(cache_implementation="zipage")`` gives
(tests/test_space.py checks it); sampling draws both runs from generators with the same seed, so
the answers part only where the caches make the model's distributions part.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from transformers import DynamicCache

import zipage
from zipage.hf import cache_kwarg
from zipage.models import common_prefix_length


@dataclass
class Settings:
    """What the user chose; ``zipage_config()`` validates the zipage part with the library's own errors."""

    budget: int = 128
    scorer: str = "zipage"
    page_size: int = 16
    max_new_tokens: int = 192
    sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0

    def zipage_config(self) -> zipage.ZipageConfig:
        return zipage.ZipageConfig(budget=self.budget, page_size=self.page_size, scorer=self.scorer,
                                   seed=self.seed if self.scorer == "random" else 0)  # (the random scorer's)

    def check(self) -> None:
        """Raise ValueError/TypeError naming the first bad setting."""
        config = self.zipage_config()
        zipage.get_scorer(config.scorer, config)  # an unknown scorer name is refused here
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max new tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.sample and not (self.temperature > 0):
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature!r}")
        if self.sample and not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")


@dataclass
class Run:
    """One decoding of the prompt: its cache, its tokens, and the KV bytes after every stored step."""

    name: str
    cache: Any
    generator: torch.Generator
    ids: list[int] = field(default_factory=list)
    kv_bytes: list[int] = field(default_factory=list)  # [0]: after the prompt, [t]: after t generated tokens
    compressions_at: list[int] = field(default_factory=list)  # generated-token counts at which one ran
    done: bool = False
    pending: int | None = None  # sampled, not yet fed to the model


@dataclass
class Snapshot:
    prompt_ids: list[int]
    full: Run
    zipage: Run
    config: zipage.ZipageConfig
    finished: bool

    @property
    def first_difference(self) -> int | None:
        """Index of the first generated token where the answers differ (None while they agree)."""
        n = common_prefix_length(self.full.ids, self.zipage.ids)
        if n == len(self.full.ids) == len(self.zipage.ids):
            return None
        return n

    def stats(self) -> dict[str, Any]:
        s = self.zipage.cache.stats()
        full_now = self.full.kv_bytes[-1] if self.full.kv_bytes else 0
        zip_now = self.zipage.kv_bytes[-1] if self.zipage.kv_bytes else 0
        n = len(self.zipage.kv_bytes)  # what the full cache held after as many tokens as zipage has now (measured;
        # past the full run's end, what a full cache's layers would hold)
        same_tokens = (self.full.kv_bytes[n - 1] if 0 < n <= len(self.full.kv_bytes)
                       else s["kv_bytes_full"] + s.get("window_kv_bytes_full", 0))
        return {
            "compressions": s["compressions"],
            "pages_in_use": s["pages_in_use"],
            "peak_pages": s["peak_pages"],
            "tokens_seen": s["tokens_seen"],
            "tokens_stored": s["tokens_stored"],
            "kv_bytes_full": full_now,
            "kv_bytes_zipage": zip_now,
            "memory_saved": 1.0 - zip_now / same_tokens if same_tokens else 0.0,
            "first_difference": self.first_difference,
        }


def dynamic_cache_bytes(cache: DynamicCache) -> int:
    """Bytes of the key and value tensors a ``DynamicCache`` holds."""
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def _kv_bytes(run: Run) -> int:
    """The memory each cache's keys and values take now: a ``DynamicCache``'s tensors; zipage's storage as held
    (its rows at their capacity, the sliding layers' window pool, any exact tail), not only its stored tokens."""
    if isinstance(run.cache, zipage.ZipageCache):
        stats = run.cache.stats()
        return int(stats.get("kv_bytes_held", stats["kv_bytes_in_use"]))  # (older zipage: the stored tokens)
    return dynamic_cache_bytes(run.cache)


def first_full_layer(cache: zipage.ZipageCache) -> int:
    """The first layer that attends the whole context (not a sliding window): the one whose kept positions
    say what the budget keeps."""
    return next((i for i, layer in enumerate(cache.layers) if not getattr(layer, "is_sliding", False)), 0)


def eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    out = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        out.add(int(tokenizer.eos_token_id))
    return out


def pick(logits: torch.Tensor, settings: Settings, generator: torch.Generator) -> int:
    """The next token from ``logits`` [vocab]: argmax, or a temperature / top-p sample."""
    if not settings.sample:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / settings.temperature, dim=-1)
    if settings.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs >= settings.top_p  # the smallest set reaching top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _feed(model, run: Run, ids: torch.Tensor, settings: Settings) -> None:
    """Run the model on ``ids`` with the run's cache, pick the next token, record memory and compressions."""
    # (inference mode for this step alone: a UI serving the generator may run each step on another thread,
    # and a mode entered on one thread does not hold on the next)
    with torch.inference_mode():
        before = run.cache.stats()["compressions"] if isinstance(run.cache, zipage.ZipageCache) else 0
        logits = model(input_ids=ids, **{cache_kwarg(): run.cache}, use_cache=True).logits[0, -1]
        run.pending = pick(logits, settings, run.generator)
        run.kv_bytes.append(_kv_bytes(run))
        if isinstance(run.cache, zipage.ZipageCache) and run.cache.stats()["compressions"] > before:
            run.compressions_at.append(len(run.ids))


def side_by_side(model, tokenizer, prompt_ids: list[int], settings: Settings) -> Iterator[Snapshot]:
    """Decode ``prompt_ids`` with full KV and with zipage, step-locked; yield a snapshot after each token."""
    settings.check()
    config = settings.zipage_config()
    device = model.device
    runs = [
        Run("full KV", DynamicCache(config=model.config), torch.Generator().manual_seed(settings.seed)),
        Run("zipage", zipage.ZipageCache(config=model.config, zipage_config=config),
            torch.Generator().manual_seed(settings.seed)),
    ]
    stop = eos_ids(model, tokenizer)
    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    for run in runs:
        _feed(model, run, prompt, settings)
    while not all(run.done for run in runs):
        for run in runs:
            if run.done:
                continue
            token = run.pending
            run.ids.append(token)
            if token in stop or len(run.ids) >= settings.max_new_tokens:
                run.done = True
                continue
            _feed(model, run, torch.tensor([[token]], device=device), settings)
        yield Snapshot(list(prompt_ids), runs[0], runs[1], config, finished=False)
    yield Snapshot(list(prompt_ids), runs[0], runs[1], config, finished=True)


def kept_mask(cache: zipage.ZipageCache) -> torch.Tensor | None:
    """``[layers, kv_heads, seen]`` bool: which logical positions each layer and KV head still keeps.

    None when this zipage has no ``ZipageCache.kept_positions`` (an older version) or nothing is stored.
    """
    if not hasattr(cache, "kept_positions") or cache.get_seq_length() == 0:
        return None
    seen = cache.get_seq_length()
    layers = []
    for layer_idx in range(len(cache.layers)):
        positions = cache.kept_positions(layer_idx)[0].cpu()  # [H, S] (batch row 0)
        mask = torch.zeros(positions.shape[0], seen, dtype=torch.bool)
        mask.scatter_(1, positions, True)
        layers.append(mask)
    return torch.stack(layers)
