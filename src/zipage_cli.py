"""The ``zipage`` command line.

    zipage info                 versions, devices and the scorers available
    zipage demo [options]       full KV vs zipage on SmolLM2-135M-Instruct (zipage demo --help)
    zipage bench [options]      throughput against full-KV systems, random weights or --model (zipage bench --help)
    zipage eval [options]       task accuracy on a data set, or --mode fidelity (zipage eval --help)
    zipage serve [MODEL]        an OpenAI-compatible server (zipage serve --help; needs zipage[serve])

This module lies outside the ``zipage`` package on purpose: ``import zipage`` registers
``cache_implementation="zipage"`` with transformers, which loads torch and transformers (seconds),
and importing any ``zipage.*`` module runs that first. Here nothing of the library is imported
until a subcommand runs, so ``zipage --help`` answers at once. ``python -m zipage`` and
``python -m zipage.cli`` run the same ``main``.

``serve``'s options are defined here (its ``--help`` is instant); the server itself is
``zipage.serve.server``. ``demo``, ``bench`` and ``eval`` parse their own options: everything after the subcommand is passed
to them unparsed. ``bench`` runs ``benchmarks/throughput.py``; ``eval`` runs ``benchmarks/accuracy.py``
(task accuracy; the default when ``--dataset`` is given) or, with ``--mode fidelity`` or without
``--dataset``, ``benchmarks/quality.py`` (teacher-forced fidelity); they are packaged as ``zipage.bench.*``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import re
import sys
from pathlib import Path

# subcommand -> (module under zipage.bench, help line)
BENCHMARKS = {
    "bench": ("throughput", "throughput against full-KV systems, same KV memory: random-weight configs (CUDA) or "
              "--model ID|PATH on a data set; see zipage bench --help"),
    "eval": ("accuracy", "task accuracy against full KV on any model and data set (--dataset), or the teacher-forced "
             "fidelity benchmark (--mode fidelity); see zipage eval --help"),
}
EVAL_MODES = {"accuracy": "accuracy", "fidelity": "quality"}  # zipage eval --mode X -> module under zipage.bench


def eval_module(argv: list[str]) -> str:
    """Which script ``zipage eval ARGV`` runs: ``--mode`` says; without it, accuracy when an option only the
    accuracy benchmark has is given (``--dataset``, ``--num-prompts``, ``--n``, ...; or only ``--help`` is
    asked), else the teacher-forced fidelity benchmark (``zipage eval`` as it always was)."""
    for a in argv:
        name = a.split("=", 1)[0]
        if name.startswith("--") and len(name) > 2 and name != "--mode" and "--mode".startswith(name):
            raise SystemExit(f"zipage eval: {name} is ambiguous here: write --mode (or --model) in full")
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--mode", choices=sorted(EVAL_MODES), default=None)
    pre.add_argument("--dataset", default=None)
    pre.add_argument("--replot", default=None)
    args, _ = pre.parse_known_args(argv)
    if args.mode is None:
        asks_help = any(a in ("-h", "--help") for a in argv)
        given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
        accuracy = args.dataset is not None or (asks_help and len(argv) == 1) or bool(given & _accuracy_only(given))
        args.mode = "accuracy" if accuracy else "fidelity"
        if args.replot is not None and _accuracy_result(args.replot):  # the result says which benchmark made it
            args.mode = "accuracy"
    return EVAL_MODES[args.mode]


def _accuracy_only(given: set[str]) -> set[str]:
    """Which of ``given`` (options as typed) name an option only the accuracy benchmark has: in full, or as
    the unique prefix of one among both benchmarks' options (``--data`` for ``--dataset``, as argparse reads it)."""
    accuracy = importlib.import_module("zipage.bench.accuracy").build_parser()
    fidelity = importlib.import_module("zipage.bench.quality").build_parser()
    names = lambda parser: {o for action in parser._actions for o in action.option_strings}  # noqa: E731
    every, only = names(accuracy) | names(fidelity), names(accuracy) - names(fidelity)
    out = set()
    for name in given:
        full = [name] if name in every else [o for o in every if o.startswith(name)]
        if len(full) == 1 and full[0] in only:
            out.add(name)
    return out


def _accuracy_result(path: str) -> bool:
    """Whether ``path`` is an accuracy result (its ``configurations``); False when it cannot be read (the
    benchmark that gets it says why)."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "configurations" in data


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help that shows each option's default: ``(default: X)`` after its text, ``(default: off)`` for a
    flag. An option whose default is None (decided later, e.g. by a preset) says so in its own text."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or action.default is None:
            return text
        if action.nargs == 0:  # a flag: store_true and the like
            return f"{text} (default: {'on' if action.default else 'off'})"
        return f"{text} (default: %(default)s)"


def _info(_: argparse.Namespace) -> int:
    import torch
    import transformers

    import zipage

    print(f"zipage {zipage.__version__}  torch {torch.__version__}  transformers {transformers.__version__}")
    print(f"CUDA available: {torch.cuda.is_available()}")
    print("scorers:", ", ".join(zipage.list_scorers()))
    print("defaults:", zipage.ZipageConfig())
    return 0


@contextlib.contextmanager
def _prog(name: str):
    """argparse names a parser after sys.argv[0]: make the scripts' usage lines read ``zipage eval``."""
    saved = sys.argv[0] if sys.argv else None
    if sys.argv:
        sys.argv[0] = name
    else:
        sys.argv.append(name)
    try:
        yield
    finally:
        if saved is None:
            sys.argv.pop(0)
        else:
            sys.argv[0] = saved


def _results_dir(mod) -> None:
    """Outputs go to benchmarks/results/ of a checkout; from an installed package (no such folder next to
    the module), to ./benchmarks/results/ under the working directory, as the scripts' relative defaults do."""
    results = getattr(mod, "RESULTS", None)
    if results is not None and not Path(results).is_dir():
        mod.RESULTS = Path.cwd() / "benchmarks" / "results"


def run_benchmark(command: str, argv: list[str]) -> int:
    name, _ = BENCHMARKS[command]
    if command == "eval":
        name = eval_module(argv)
        if name == "quality":  # quality.py has no --mode option of its own
            argv = _without_option(argv, "--mode")
    mod = importlib.import_module(f"zipage.bench.{name}")
    if command == "eval":
        _results_dir(mod)
    with _prog(f"zipage {command}"):
        return mod.main(argv) or 0


def _without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` / ``option=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            out.append(a)
    return out


def _budget(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or 'none', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1 or 'none', got {value}")
    return value


def _origins(text: str) -> list[str]:
    """``--allowed-origins``: ``*`` or comma-separated ``scheme://host[:port]`` origins."""
    origins = [o.strip() for o in text.split(",") if o.strip()]
    bad = [o for o in origins if o != "*" and not re.fullmatch(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s]+", o)]
    if not origins or bad:
        raise argparse.ArgumentTypeError(f"expected '*' or origins such as http://localhost:3000 (scheme://host"
                                         f"[:port], no path), comma-separated; got {text!r}")
    return origins


def serve_parser() -> argparse.ArgumentParser:
    """``zipage serve``'s options (vLLM's names where vLLM has the option)."""
    p = argparse.ArgumentParser(
        prog="zipage serve", formatter_class=HelpFormatter,
        description="An OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models, /health, "
        "/version, /metrics) with Compressed PagedAttention. Needs the serve extra: pip install 'zipage[serve]'.")
    p.add_argument("model", nargs="?", default=None,
                   help="a Hub id or a local folder (default: the offline SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="the port to listen on (default: 8000)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="the name(s) clients give as 'model' (default: MODEL)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $ZIPAGE_API_KEY, else open)")
    p.add_argument("--allowed-origins", type=_origins, default=None, metavar="ORIGINS",
                   help="comma-separated origins (such as http://localhost:3000, or *) whose browser pages may call "
                   "the API: CORS headers and preflights for them (default: none, unlike vLLM's *)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="weights and KV (auto: the checkpoint's on CUDA, float32 on a CPU)")
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="most sequences running at once")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192, help="most tokens in one step")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="share of the GPU for model + KV")
    p.add_argument("--num-pages", type=int, default=None, help="KV pool size in pages (default: sized from the memory)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="share prompt pages between requests with the same prefix")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split the model over this many GPUs (one process each; the model's heads must divide by it)")
    p.add_argument("--budget", type=_budget, default=2048,
                   help="tokens of KV kept per request after a compression, unless a request asks for its own; "
                   "'none': full KV only (requests cannot ask for a budget then)")
    p.add_argument("--page-size", type=int, default=256, help="tokens per KV page")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "int8"],
                   help="KV pages: auto (the model's dtype), fp8 (e4m3 with a scale per token and head: "
                   "about twice the tokens in the same memory) or int8 (int8 codes, the same bytes, less rounding)")
    p.add_argument("--exact-tail", type=int, default=0,
                   help="with --kv-cache-dtype fp8 or int8: each query reads its last N tokens in the model's dtype, "
                   "older ones from the pages, and compressions keep the last N - 1 (0: none)")
    p.add_argument("--kv-rotation", default=None, choices=["on", "off"],
                   help="with --kv-cache-dtype fp8 or int8: store the pages in a Hadamard-rotated basis (on) or as "
                   "they are (off); default: INT8 rotated, FP8 not")
    p.add_argument("--scorer", default=None, help="which tokens to keep (default: zipage; `zipage info` lists them)")
    p.add_argument("--max-budget", type=int, default=None,
                   help="largest budget a request may ask for; full KV is refused then too (default: no limit)")
    p.add_argument("--max-waiting", type=int, default=None,
                   help="waiting requests beyond which new ones get a 429 (default: no limit)")
    p.add_argument("--max-request-bytes", type=int, default=32 << 20,
                   help="largest request body; a larger one gets a 413 before it is read whole (default: 32 MiB)")
    p.add_argument("--chat-template", default=None,
                   help="the chat template of /v1/chat/completions: a Jinja file's path, or the template itself "
                   "(default: the tokenizer's); for a model without one, or to change it")
    p.add_argument("--reasoning-parser", default=None, choices=["deepseek_r1", "qwen3"],
                   help="return a reasoning model's thinking (between <think> and </think>) in the chat message's "
                   "reasoning field, apart from its content: deepseek_r1, thinking until the first </think>; qwen3, "
                   "thinking inside a block the output or the prompt opens (default: all of it is content)")
    p.add_argument("--generation-config", default="auto", choices=["auto", "vllm"],
                   help="defaults of the sampling fields a request leaves out (temperature, top_p, top_k, min_p, "
                   "repetition_penalty): auto, those the model's generation_config sets; vllm, the API's own "
                   "(temperature 1, no filters)")
    return p


def serve(argv: list[str]) -> int:
    args = serve_parser().parse_args(argv)  # (--help answers here, before anything heavy is imported)
    try:
        from zipage.serve.server import main as run
    except ImportError as e:
        print(f"zipage serve needs the serve extra: pip install 'zipage[serve]' ({e})", file=sys.stderr)
        return 1
    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zipage", description="Compressed PagedAttention for LLM reasoning.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="full KV vs zipage on SmolLM2-135M-Instruct (no download); see zipage demo --help")
    for command, (_, text) in BENCHMARKS.items():
        sub.add_parser(command, help=text)
    sub.add_parser("serve", help="an OpenAI-compatible server (needs zipage[serve]); see zipage serve --help")
    p = sub.add_parser("info", help="versions, devices and the scorers available")
    p.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":  # the demo parses its own options (zipage demo --help)
        from zipage import demo

        return demo.main(argv[1:], prog="zipage demo") or 0
    if argv and argv[0] in BENCHMARKS:  # so do the benchmarks (zipage bench --help, zipage eval --help)
        return run_benchmark(argv[0], argv[1:])
    if argv and argv[0] == "serve":
        return serve(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
