"""The ``ZIPAGE_*`` environment variables, checked together when an engine or a cache is built.

Each variable is read where it acts (often deep in a kernel's dispatch, and only on the path that
uses it: a prefill kernel's choice is read on a GPU prefill). :func:`check_environment` checks every
one that is set when ``zipage.LLM`` or a ``ZipageCache`` is built, so a bad value is refused at once,
by name, on every machine, not when (or if) its path first runs; and it warns about a ``ZIPAGE_``
name it does not know (a misspelt variable is otherwise silently ignored). The table of the guide's
"Environment variables" section lists the same names (a test keeps them equal).
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Callable, Mapping


def _choices(*allowed: str, strip: bool = True) -> Callable[[str, str], None]:
    def check(name: str, value: str) -> None:
        if (value.strip() if strip else value) not in allowed:
            shown = [repr(a) if a else "unset (empty)" for a in allowed]
            raise ValueError(f"{name}={value!r}: expected {', '.join(shown[:-1])} or {shown[-1]}")
    return check


def _any(name: str, value: str) -> None:  # (free-form: a folder, a key)
    return None


def _prefill_kernel(name: str, value: str) -> None:
    if value != "v1":
        from .kernels.paged_prefill import kernel_for  # (raises naming the variable)

        kernel_for(value)


def _fp8_decode(name: str, value: str) -> None:
    from .kernels.paged_attention import _parse_fp8_choice

    _parse_fp8_choice(value.strip())


def _store_launch(name: str, value: str) -> None:
    from .kernels.paged_kv import _parse_launch

    _parse_launch(value.strip())


def _scale_steps(name: str, value: str) -> None:
    from .kernels.fp8 import _parse_steps

    _parse_steps(value)


# name -> check(name, value): raises ValueError naming the variable when the value is not one it takes
VARIABLES: dict[str, Callable[[str, str], None]] = {
    "ZIPAGE_CACHE": _any,
    "ZIPAGE_API_KEY": _any,
    "ZIPAGE_ALLOW_LONG_MAX_MODEL_LEN": _choices("", "0", "1"),
    "ZIPAGE_FRESH_PREFILL": _choices("", "0", "1", "cudnn"),
    "ZIPAGE_PREFILL_KERNEL": _prefill_kernel,
    "ZIPAGE_FP8_DECODE": _fp8_decode,
    "ZIPAGE_DIM_MAJOR_VALUES": _choices("", "0", "1"),
    "ZIPAGE_STORE_LAUNCH": _store_launch,
    "ZIPAGE_FP8_SCALE_STEPS": _scale_steps,
    "ZIPAGE_FP8_QUERY_WEIGHTS": _choices("0", "1", "calibrated"),
    "ZIPAGE_INT8_ROTATION": _choices("0", "1"),
    "ZIPAGE_FP8_ROTATION": _choices("0", "1"),
    "ZIPAGE_EXACT_TAIL_KERNEL": _choices("triton", "torch"),
    "ZIPAGE_GENERATE_ATTENTION": _choices("auto", "paged", "dense", strip=False),
    "ZIPAGE_DENSE_CUDNN": _choices("0", "1", strip=False),
    "ZIPAGE_DISABLE_TRITON": _choices("", "0", "1"),
}
# read by the test suite, the benchmarks and the Space, not by the library: known, not checked here
ELSEWHERE = frozenset({"ZIPAGE_CACHE_DIR", "ZIPAGE_GEMMA3_DIR", "ZIPAGE_SCREENSHOT_DIR",
                       "ZIPAGE_SPACE_MAX_NEW_TOKENS", "ZIPAGE_TEST_LOG"})


def value(name: str, default: str = "") -> str:
    """Variable ``name``'s value (``default`` when unset), stripped, refused by name as :func:`check_environment`
    refuses it (the library's own readers of the variables in :data:`VARIABLES`; the kernels folder, which
    stands alone, reads its own)."""
    raw = os.environ.get(name, default)
    VARIABLES[name](name, raw)
    return raw.strip()


def check_environment(environ: Mapping[str, str] | None = None) -> None:
    """Refuse a bad value of any ``ZIPAGE_*`` variable that is set (``ValueError`` naming it); warn about
    ``ZIPAGE_`` names no part of zipage reads, with the nearest known name. ``environ``: ``os.environ``
    when not given."""
    environ = os.environ if environ is None else environ
    for name in sorted(environ):
        if not name.startswith("ZIPAGE_"):
            continue
        check = VARIABLES.get(name)
        if check is not None:
            try:
                check(name, environ[name])
            except ValueError as e:
                raise ValueError(str(e) if name in str(e) else f"{name}={environ[name]!r}: {e}") from None
        elif name not in ELSEWHERE:
            near = difflib.get_close_matches(name, list(VARIABLES) + sorted(ELSEWHERE), n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            warnings.warn(f"environment variable {name} is not one zipage reads{hint}: it changes nothing",
                          stacklevel=3)
