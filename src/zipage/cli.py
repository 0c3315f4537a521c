"""``python -m zipage.cli``: the ``zipage`` command, whose code is the top-level ``zipage_cli`` module
(outside this package, so that ``zipage --help`` imports neither torch nor transformers)."""

from __future__ import annotations

import sys

from zipage_cli import BENCHMARKS, HelpFormatter, build_parser, main, run_benchmark

__all__ = ["BENCHMARKS", "HelpFormatter", "build_parser", "main", "run_benchmark"]

if __name__ == "__main__":
    sys.exit(main())
