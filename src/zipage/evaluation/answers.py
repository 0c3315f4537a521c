"""Is a model's answer right? Exact numbers for GSM8K, mathematical equivalence for MATH-style answers.

* ``number``: the final answer is the number the output's last ``\\boxed{}`` holds (a plain number, a
  fraction of two, the right side of an ``=``, units in text after it; anything else is no number),
  else its last number; it is right when it is the same number as the reference (commas, ``$`` and
  trailing zeros do not matter: ``1,000`` = ``1000`` = ``1000.00``).
* ``math``: the reference and the output's last ``\\boxed{}`` (without one: what follows its last "answer is"
  or "answer:", else its last ``$...$`` / ``\\(...\\)`` / ``\\[...\\]``, else its last number; an expression
  left mid-way, as in an output cut off at ``max_tokens``, is no answer) are parsed by ``math-verify``
  (Hugging Face's answer checker: LaTeX and plain expressions to sympy) and compared symbolically, so
  ``\\frac{1}{2}``, ``0.5`` and ``\\dfrac12`` are one answer. It needs the ``eval`` extra:
  ``pip install 'zipage[eval]'``.
"""

from __future__ import annotations

import re
import threading
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from ..models import last_boxed

# (a minus right after a digit is a hyphen: "won 21-14", "3-5 days", "2023-2024" end on 14, 5, 2024)
_NUMBER = re.compile(r"(?:(?<!\d)-)?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)")
_PLAIN = re.compile(r"-?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)")
_FRACTION = re.compile(r"(-?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}|(-?[\d.,]+)/(-?[\d.,]+)")
# a unit written as text, with any power after it (``25\text{ m}^2``), and other marks around a number
_UNIT = re.compile(r"\\(?:text|mathrm|mbox|textbf)\s*\{[^{}]*\}(?:\^\{[^{}]*\}|\^\S)?")
_TEXT_NUMBER = re.compile(r"\\(?:text|mathrm|mbox|textbf)\s*\{\s*(-?[\d.,]+)\s*\}")
_MARKS = (("\\$", ""), ("$", ""), ("\\!", ""), ("{,}", ","), ("\\,", ""), ("\\%", ""), ("%", ""), ("^\\circ", ""),
          ("^{\\circ}", ""), ("\u2212", "-"), ("\\left", ""), ("\\right", ""))
EVAL_INSTALL = "pip install 'zipage[eval]'   (or: pip install 'math-verify[antlr4_13_2]')"


def _boxed_number(content: str) -> Decimal | Fraction | None:
    """The number a ``\\boxed{}`` holds: a plain number (``1,000``, ``$18``, ``5\\%``, ``-5``, a unit in
    ``\\text{}`` after it), a fraction of two (``\\frac{1}{2}``, ``3/4``), or the right side of its last ``=``;
    None for anything else (an expression is not read as the last digits in it)."""
    for old, new in _MARKS:
        content = content.replace(old, new)
    content = _TEXT_NUMBER.sub(r"\1", content)  # ``\text{42}``: the number itself
    content = _UNIT.sub("", content)
    content = content.rpartition("=")[2]
    content = re.sub(r"(?<=\d)[ ~](?=\d{3}\b)", "", content.strip())  # "1 000": digits grouped by spaces
    content = re.sub(r"\s+(?:[a-zA-Z]+\s*)+$", "", content).strip().rstrip(".")  # a unit in words after it
    while content.startswith("{") and content.endswith("}"):
        content = content[1:-1].strip()
    if _PLAIN.fullmatch(content):
        return as_number(content)
    m = _FRACTION.fullmatch(content)
    if m:
        sign, num, den = (m.group(1), m.group(2), m.group(3)) if m.group(2) is not None else ("", m.group(4),
                                                                                            m.group(5))
        a, b = as_number(num), as_number(den)
        if a is not None and b is not None and b != 0:
            value = Fraction(a) / Fraction(b)
            return -value if sign else value
    return None


def final_number(text: str) -> Decimal | Fraction | None:
    """The number an output ends on: the number its last ``\\boxed{}`` holds if there is one (None if that is
    not a number), else its last number."""
    boxed = last_boxed(text)
    if boxed is not None:
        return _boxed_number(boxed)
    found = _numbers(text)
    return as_number(found[-1]) if found else None


def _numbers(text: str) -> list[str]:
    """The plain numbers written in ``text``, in order (``$``, ``\\!`` and ``{,}`` marks dropped)."""
    return _NUMBER.findall(text.replace("$", "").replace("\\!", "").replace("{,}", ",").replace("\u2212", "-"))


def as_number(text: str) -> Decimal | None:
    """``"1,000.50"`` -> Decimal('1000.50'); None when ``text`` is not a plain number."""
    try:
        return Decimal(text.strip().replace(",", "").rstrip("."))
    except InvalidOperation:
        return None


def reference_number(reference: str) -> Decimal | Fraction | None:
    """A reference answer as the ``number`` checker reads it (a plain number or a fraction of two), or None."""
    return _boxed_number(reference)


def numbers_match(output: str, reference: str) -> bool:
    """GSM8K's rule: the output's final number is the reference number, exactly. A box holding an expression
    (``10^3``, ``2\\cdot 3``) is compared by ``math-verify`` when it is installed, and is wrong otherwise."""
    want = reference_number(reference)
    if want is None:
        raise ValueError(f"the reference answer {reference!r} is not a number (use the 'math' checker)")
    got = final_number(output)
    if got is None and last_boxed(output) is not None:
        try:
            return math_equal(output, reference)
        except ImportError:
            return False
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
    boxed = last_boxed(output)  # the last box only: math-verify would take every box of the output as one set
    if boxed is None:  # (the whole text would let it evaluate whatever expression the output stopped on)
        boxed = _unboxed_answer(output)
        if boxed is None:
            return False
    pred = parse(f"\\boxed{{{boxed}}}", parsing_timeout=timeout)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=timeout))


_ANSWER_PHRASE = re.compile(r"answer\s*(?:is|:)\s*:?", re.IGNORECASE)
_MATH_SPAN = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
# where a plain-text answer after "answer is" ends: a sentence's end, a clause ("5, because ..."), a line's end
_ANSWER_END = re.compile(r"\.(?=\s|$)|,\s+(?=[A-Za-z])|\s+(?:since|because|as|so|which)\b|;|\n")
_NUMBER_AND_WORDS = re.compile(r"(-?[\d.,/]+)\s+[A-Za-z][A-Za-z\s]*")  # "5 cm", "12 apples"


def _unboxed_answer(output: str) -> str | None:
    """An output's answer without a ``\\boxed{}``: after its last "answer is" / "answer:", the math span that
    follows (``$...$``, ``\\(...\\)``, ``\\[...\\]``) or the text up to the sentence's or clause's end (a
    number followed by words: the number); without the phrase, the output's last closed math span; else its last
    number. None when it has none of these (an expression a cut-off output stopped on is no closed span)."""
    text = output.replace("**", "")  # (markdown bold around "Answer:")
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if phrases:
        rest = text[phrases[-1].end():]
        span = _MATH_SPAN.match(rest.lstrip())
        if span:
            answer = next(g for g in span.groups() if g is not None).strip()
        else:
            answer = _ANSWER_END.split(rest.strip(), maxsplit=1)[0].strip()
            words = _NUMBER_AND_WORDS.fullmatch(answer)
            answer = words.group(1) if words else answer
        if answer:
            return answer
    spans = _MATH_SPAN.findall(text)
    if spans:
        answer = next(g for g in spans[-1] if g).strip()
        if answer:
            return answer
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def is_correct(output: str, reference: str, kind: str) -> bool:
    """Whether ``output`` answers with ``reference``, by the rule ``kind`` (``number`` or ``math``)."""
    if kind == "number":
        return numbers_match(output, reference)
    if kind == "math":
        return math_equal(output, reference)
    raise ValueError(f"unknown answer kind {kind!r}: expected 'number' or 'math'")
