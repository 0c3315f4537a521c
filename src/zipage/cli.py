"""The ``zipage`` command line."""

from __future__ import annotations

import argparse
import sys


def _info(_: argparse.Namespace) -> int:
    import torch
    import transformers

    import zipage

    print(f"zipage {zipage.__version__}  torch {torch.__version__}  transformers {transformers.__version__}")
    print(f"CUDA available: {torch.cuda.is_available()}")
    print("scorers:", ", ".join(zipage.list_scorers()))
    print("defaults:", zipage.ZipageConfig())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.main(args.rest) or 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zipage", description="Compressed PagedAttention for LLM reasoning.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="full KV vs zipage on SmolLM2-135M-Instruct (no download)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_demo)
    p = sub.add_parser("info", help="versions, devices and the scorers available")
    p.set_defaults(func=_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
