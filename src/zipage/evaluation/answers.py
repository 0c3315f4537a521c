"""Is a model's answer right? Exact numbers for GSM8K, mathematical equivalence for MATH-style answers.

* ``number``: the final answer is the content of the output's last ``\\boxed{}`` (else its last
  number); it is right when it is the same number as the reference (commas, ``$`` and trailing zeros
  do not matter: ``1,000`` = ``1000`` = ``1000.00``).
* ``math``: the reference and the output are parsed by ``math-verify`` (Hugging Face's answer
  checker: LaTeX and plain expressions to sympy, ``\\boxed{}`` first) and compared symbolically, so
  ``\\frac{1}{2}``, ``0.5`` and ``\\dfrac12`` are one answer. It needs the ``eval`` extra:
  ``pip install 'zipage[eval]'``.
"""

from __future__ import annotations

import re
import threading
from decimal import Decimal, InvalidOperation

from ..models import last_boxed

_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+")
EVAL_INSTALL = "pip install 'zipage[eval]'   (or: pip install 'math-verify[antlr4_13_2]')"


def final_number(text: str) -> Decimal | None:
    """The number an output ends on: inside its last ``\\boxed{}`` if there is one, else its last number."""
    boxed = last_boxed(text)
    for source in (boxed, text) if boxed is not None else (text,):
        found = _NUMBER.findall(source.replace("$", "").replace("\\!", "").replace("{,}", ","))
        if found:
            return as_number(found[-1])
    return None


def as_number(text: str) -> Decimal | None:
    """``"1,000.50"`` -> Decimal('1000.50'); None when ``text`` is not a plain number."""
    try:
        return Decimal(text.strip().replace(",", "").rstrip("."))
    except InvalidOperation:
        return None


def numbers_match(output: str, reference: str) -> bool:
    """GSM8K's rule: the output's final number is the reference number, exactly."""
    want = as_number(reference)
    if want is None:
        raise ValueError(f"the reference answer {reference!r} is not a number (use the 'math' checker)")
    got = final_number(output)
    return got is not None and got == want


def math_equal(output: str, reference: str) -> bool:
    """MATH's rule: the output's answer (its last ``\\boxed{}`` first) equals the reference symbolically."""
    try:
        from math_verify import parse, verify
    except ImportError:
        raise ImportError(f"checking MATH-style answers needs the math-verify package: {EVAL_INSTALL}") from None
    # math-verify's timeouts use signal.alarm, which only the main thread may set
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(f"${reference}$", parsing_timeout=timeout)
    if not gold:
        gold = parse(reference, parsing_timeout=timeout)
    pred = parse(output, parsing_timeout=timeout)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=timeout))


def is_correct(output: str, reference: str, kind: str) -> bool:
    """Whether ``output`` answers with ``reference``, by the rule ``kind`` (``number`` or ``math``)."""
    if kind == "number":
        return numbers_match(output, reference)
    if kind == "math":
        return math_equal(output, reference)
    raise ValueError(f"unknown answer kind {kind!r}: expected 'number' or 'math'")
