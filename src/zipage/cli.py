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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":  # the demo parses its own options (zipage demo --help)
        from . import demo

        return demo.main(argv[1:]) or 0
    parser = argparse.ArgumentParser(prog="zipage", description="Compressed PagedAttention for LLM reasoning.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="full KV vs zipage on SmolLM2-135M-Instruct (no download); see zipage demo --help")
    p = sub.add_parser("info", help="versions, devices and the scorers available")
    p.set_defaults(func=_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
