"""Task accuracy of full KV against each budget and scorer: run every configuration, check every sample.

``evaluate`` returns a JSON-ready dict: per configuration its pass@1 (the share of right samples,
averaged over problems), the mean output length (a smaller budget can make reasoning longer), the
tokens/s of its run and the engine's counters; per problem the verdicts and lengths.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..engine import SamplingParams
from .answers import is_correct
from .datasets import Problem
from .metrics import pass_at_1, standard_error
from .run import Configuration, RunResult, run_configuration


def evaluate(model: Any, tokenizer: Any, problems: Sequence[Problem], prompts: Sequence[list[int]],
             configurations: Sequence[Configuration], params: SamplingParams,
             engine_kwargs: dict[str, Any] | None = None, warmup: bool = False, progress: bool = True,
             on_result: Any = None) -> list[dict[str, Any]]:
    """Run each configuration on every prompt (``params.n`` samples each) and score the answers.

    ``on_result(rows)`` is called after each configuration (to write partial results)."""
    if len(problems) != len(prompts):
        raise ValueError(f"{len(problems)} problems but {len(prompts)} prompts")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(configurations) * len(prompts) * params.n, unit="sample", dynamic_ncols=True)
    rows: list[dict[str, Any]] = []
    try:
        for config in configurations:
            if bar is not None:
                bar.set_description(config.label)
            run = run_configuration(model, tokenizer, list(prompts), params, config, engine_kwargs, bar, warmup)
            rows.append(summarize(config, problems, run))
            if on_result is not None:
                on_result(rows)
    finally:
        if bar is not None:
            bar.close()
    return rows


def summarize(config: Configuration, problems: Sequence[Problem], run: RunResult) -> dict[str, Any]:
    """One configuration's row: accuracy over the problems that have a reference answer."""
    verdicts: list[list[bool] | None] = []
    for problem, texts in zip(problems, run.texts):
        verdicts.append(None if problem.answer is None else
                        [is_correct(t, problem.answer, problem.kind) for t in texts])
    scored = [v for v in verdicts if v is not None]
    lengths = [n for row in run.lengths for n in row]
    stopped = sum(r == "length" for row in run.finish_reasons for r in row)
    return {
        "label": config.label,
        "budget": config.budget,
        "scorer": config.fields.get("scorer", "zipage") if config.budget is not None else None,
        "fields": {k: v for k, v in config.fields.items() if k != "scorer"},
        "pass@1": pass_at_1(scored) if scored else None,
        "stderr": standard_error(scored) if len(scored) >= 2 else None,  # (null, not NaN: JSON has no NaN)
        "problems_scored": len(scored),
        "mean_output_tokens": sum(lengths) / len(lengths),
        "max_output_tokens": max(lengths),
        "cut_at_max_tokens": stopped / len(lengths),
        "tokens_per_s": run.tokens_per_s,
        "wall_s": run.wall_s,
        "output_tokens": run.output_tokens,
        "engine": run.stats,
        "per_problem": [{"index": p.index, "correct": v, "output_tokens": n}
                        for p, v, n in zip(problems, verdicts, run.lengths)],
        "example": run.texts[0][0] if run.texts else "",
    }
