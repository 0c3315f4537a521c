"""The ``zipage`` command line.

    zipage info                 versions, devices and the scorers available
    zipage demo [options]       full KV vs zipage on SmolLM2-135M-Instruct (zipage demo --help)
    zipage bench [options]      throughput benchmark on a CUDA GPU (zipage bench --help)
    zipage eval [options]       quality benchmark on the CPU (zipage eval --help)

This module lies outside the ``zipage`` package on purpose: ``import zipage`` registers
``cache_implementation="zipage"`` with transformers, which loads torch and transformers (seconds),
and importing any ``zipage.*`` module runs that first. Here nothing of the library is imported
until a subcommand runs, so ``zipage --help`` answers at once. ``python -m zipage`` and
``python -m zipage.cli`` run the same ``main``.

``demo``, ``bench`` and ``eval`` parse their own options: everything after the subcommand is passed
to them unparsed. ``bench`` and ``eval`` run ``benchmarks/throughput.py`` and ``benchmarks/quality.py``,
packaged as ``zipage.bench.throughput`` and ``zipage.bench.quality``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from pathlib import Path

# subcommand -> (module under zipage.bench, help line)
BENCHMARKS = {
    "bench": ("throughput", "throughput against full-KV systems, same KV memory (needs CUDA); see zipage bench --help"),
    "eval": ("quality", "quality against full KV on SmolLM2-135M-Instruct (CPU); see zipage eval --help"),
}


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


def _out_parent(argv: list[str], default: str) -> None:
    """Create the folder of --out before a run that would only write it at its end."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--out", default=default)
    args, _ = pre.parse_known_args(argv)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)


def run_benchmark(command: str, argv: list[str]) -> int:
    name, _ = BENCHMARKS[command]
    mod = importlib.import_module(f"zipage.bench.{name}")
    wants_help = any(a in ("-h", "--help") for a in argv)
    if command == "eval":
        _results_dir(mod)
    elif not wants_help:
        import torch

        if torch.cuda.is_available():  # without CUDA the script itself stops with its message
            _out_parent(argv, "benchmarks/results/throughput.json")
    with _prog(f"zipage {command}"):
        return mod.main(argv) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zipage", description="Compressed PagedAttention for LLM reasoning.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="full KV vs zipage on SmolLM2-135M-Instruct (no download); see zipage demo --help")
    for command, (_, text) in BENCHMARKS.items():
        sub.add_parser(command, help=text)
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
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
