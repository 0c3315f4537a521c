"""Scorers: one small class each, all behind ``Scorer.score``; looked up by name."""

from __future__ import annotations

import copy
from typing import Any

from ..config import SCORER_FIELDS
from .base import Scorer, ScoreInputs

_REGISTRY: dict[str, type[Scorer]] = {}


def register_scorer(cls: type[Scorer]) -> type[Scorer]:
    """Class decorator: make a scorer available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name` to be registered")
    _REGISTRY[cls.name] = cls
    return cls


def list_scorers() -> list[str]:
    """Names accepted by ``ZipageConfig(scorer=...)``."""
    return sorted(_REGISTRY)


def resolve_scorer_name(spec: Any) -> str:
    """Validate a scorer spec (a registered name, a Scorer subclass or instance)."""
    if isinstance(spec, Scorer):
        return spec.name or type(spec).__name__
    if isinstance(spec, type) and issubclass(spec, Scorer):
        return spec.name or spec.__name__
    if not isinstance(spec, str):
        raise TypeError(
            f"ZipageConfig.scorer={spec!r} is invalid: expected a scorer name {list_scorers()} or a Scorer object"
        )
    if spec not in _REGISTRY:
        raise ValueError(f"ZipageConfig.scorer={spec!r} is invalid: unknown scorer; known scorers: {list_scorers()}")
    return spec


def get_scorer(spec: Any, config=None) -> Scorer:
    """Instantiate a scorer from a name or class with ``config``. An instance built with its own
    config is passed through; one built without a config (``ZipageScorer()``) follows ``config``:
    a copy of it bound to ``config`` is returned (the object given is left as it is)."""
    resolve_scorer_name(spec)
    if isinstance(spec, Scorer):
        if config is not None and getattr(spec, "follows_cache_config", False) and spec.config is not config:
            bound = copy.copy(spec)
            bound.config = config
            return check_fields(check_extra(bound))
        return check_fields(check_extra(spec))
    cls = spec if isinstance(spec, type) else _REGISTRY[spec]
    return check_fields(check_extra(cls(config)))


def check_fields(scorer: Scorer) -> Scorer:
    """Refuse a scorer setting of ``ZipageConfig`` (``SCORER_FIELDS``) set away from its default that ``scorer``
    does not read (``scorer="snapkv", use_global=True`` would run SnapKV as it is): its ``config_fields`` name
    what it reads; a scorer that names none (None) is not checked."""
    cls = type(scorer)  # (a scorer of one's own checks only what its own class declares, not what it inherits)
    reads = cls.config_fields if cls.__module__.startswith("zipage.") else vars(cls).get("config_fields")
    config = getattr(scorer, "config", None)
    if reads is None or config is None:
        return scorer
    ignored = [f for f in SCORER_FIELDS if f not in reads and getattr(config, f, None) != SCORER_FIELDS[f]]
    if ignored:
        name = scorer.name or type(scorer).__name__
        settings = ", ".join(f"{f}={getattr(config, f)!r}" for f in ignored)
        hint = " (sampling seeds are SamplingParams(seed=...))" if "seed" in ignored else ""
        raise ValueError(f"{settings}: the {name} scorer does not read {'this setting' if len(ignored) == 1 else 'these'}"
                         f"{hint}; it reads {list(reads) if reads else 'none of the scorer settings'} (leave the "
                         "others at their defaults, or pick the scorer that reads them: see zipage.scoring)")
    return scorer


def check_extra(scorer: Scorer) -> Scorer:
    """Refuse settings in ``ZipageConfig.extra`` that ``scorer`` does not read (a misspelled ``rkv_lamda`` would
    leave the default in force unseen): a scorer's ``knobs`` name what it reads. A scorer defined outside zipage
    that declares no knobs is not checked (it may read ``extra`` its own way)."""
    extra = getattr(getattr(scorer, "config", None), "extra", None) or {}
    known = type(scorer).knobs
    if not extra or (not known and not type(scorer).__module__.startswith("zipage.")):
        return scorer
    unknown = sorted(k for k in extra if k not in known)
    if unknown:
        name = scorer.name or type(scorer).__name__
        raise ValueError(f"ZipageConfig.extra={extra!r} is invalid: the {name} scorer does not read {unknown} (its "
                         f"settings: {list(known) if known else 'none'}; see zipage.scoring's scorer docs)")
    return scorer


from . import expected_attention, h2o, keydiff, knorm, random, rkv, snapkv, streaming, zipage  # noqa: E402,F401,I001  (registers the built-ins)

__all__ = ["Scorer", "ScoreInputs", "get_scorer", "list_scorers", "register_scorer", "resolve_scorer_name"]
