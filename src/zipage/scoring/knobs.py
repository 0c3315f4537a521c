"""Scorer-specific settings read from ``ZipageConfig.extra``, checked when the scorer is built.

A scorer that has knobs of its own (``rkv_lambda``, ``ea_covariance``, ...) keeps them out of
``ZipageConfig``'s fields, which every scorer shares; a bad value fails when the cache or the
engine builds the scorer, with the knob named, not at the first compression.
"""

from __future__ import annotations

from typing import Any


def knob(config, key: str, default: Any, *, low: float | None = None, high: float | None = None) -> Any:
    """``config.extra[key]`` (or ``default``), of ``default``'s type and within ``[low, high]``."""
    value = config.extra.get(key, default)
    where = f"ZipageConfig.extra[{key!r}]={value!r} is invalid"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise TypeError(f"{where}: expected a bool")
        return value
    kind = int if isinstance(default, int) else float
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise TypeError(f"{where}: expected {'an int' if kind is int else 'a number'}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{where}: must lie in [{low}, {'inf' if high is None else high}]")
    return kind(value)
