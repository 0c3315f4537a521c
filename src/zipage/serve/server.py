"""``zipage serve``: load a model, build the engine and run the app under uvicorn until a signal.

The options are parsed by the ``zipage`` command (``zipage serve --help`` imports nothing heavy);
``main(args)`` does the work. SIGINT / SIGTERM stop accepting connections, abort the requests in
flight (their streams end with finish reason ``"abort"``) and join the engine loop.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

import torch

from ..engine import LLM
from .app import build_app
from .engine_client import AsyncEngine
from ..engine.sampling import model_sampling_defaults
from .generation import MAX_REQUEST_BYTES, ServeConfig
from .reasoning import tags_survive_decoding

DEFAULT_NAME = "SmolLM2-135M-Instruct"
log = logging.getLogger("zipage.serve")


def _placement(args: argparse.Namespace) -> tuple[torch.device, Any]:
    """``(device, dtype)`` the options ask for (dtype None: the checkpoint's)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    dtype = names.get(args.dtype)
    if dtype is None and device.type == "cpu":
        dtype = torch.float32  # ("auto": half precision is slow on a CPU)
    return device, dtype


def load(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """``(model, tokenizer, root)``: the MODEL argument (a Hub id or a local folder), or the offline
    SmolLM2-135M-Instruct without one. With several tensor-parallel ranks a MODEL stays a name:
    the engine has every rank load it and keep its shard."""
    device, dtype = _placement(args)
    if args.model is None:
        from ..models import load_smollm2

        model, tokenizer = load_smollm2(dtype=dtype or torch.bfloat16)
        return model.to(device), tokenizer, DEFAULT_NAME
    if getattr(args, "tensor_parallel_size", 1) > 1:
        return args.model, None, args.model
    from ..engine.loading import load_model

    model, tokenizer = load_model(args.model, dtype=dtype, device=str(device))
    return model, tokenizer, args.model


def engine_from_args(model: Any, tokenizer: Any, args: argparse.Namespace) -> LLM:
    fields = {"page_size": args.page_size}
    if args.scorer is not None:  # (check_args refuses a scorer without a budget)
        fields["scorer"] = args.scorer
    if getattr(args, "exact_tail", 0):
        fields["exact_tail"] = args.exact_tail
    if getattr(args, "kv_rotation", None) is not None:
        fields["kv_rotation"] = args.kv_rotation == "on"
    tp = getattr(args, "tensor_parallel_size", 1)
    if tp > 1 and isinstance(model, str):  # every rank loads it (see load)
        device, dtype = _placement(args)
        fields.update(device=str(device), dtype=dtype)
    return LLM(model, tokenizer, budget=args.budget, enable_prefix_caching=args.enable_prefix_caching,
               enforce_eager=args.enforce_eager, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens,
               gpu_memory_utilization=args.gpu_memory_utilization, num_pages=args.num_pages,
               max_model_len=args.max_model_len, kv_cache_dtype=args.kv_cache_dtype, tensor_parallel_size=tp,
               **fields)


def sampling_defaults(llm: LLM, root: str, args: argparse.Namespace) -> dict[str, Any]:
    """``--generation-config auto``: the sampling defaults the model's generation_config sets (logged, as vLLM
    does); ``vllm``: none."""
    if getattr(args, "generation_config", "auto") != "auto":
        return {}
    gen = getattr(getattr(llm, "model", None), "generation_config", None)
    if gen is None and args.model is not None:  # (tensor-parallel ranks hold the model: read the checkpoint's file)
        try:
            from transformers import GenerationConfig

            gen = GenerationConfig.from_pretrained(root)
        except (OSError, ValueError):
            gen = None
    defaults = model_sampling_defaults(gen)
    if defaults:
        log.info("sampling defaults from the model's generation_config (--generation-config vllm for the API's "
                 "own): %s", defaults)
    return defaults


def config_from_args(llm: LLM, root: str, args: argparse.Namespace) -> ServeConfig:
    names = args.served_model_name or [root if args.model is not None else DEFAULT_NAME]
    return ServeConfig(model_names=list(names), model_root=root, tokenizer=llm.tokenizer,
                       max_model_len=llm.max_model_len, api_key=args.api_key or os.environ.get("ZIPAGE_API_KEY"),
                       max_waiting=args.max_waiting, max_budget=args.max_budget,
                       sampling_defaults=sampling_defaults(llm, root, args),
                       allowed_origins=getattr(args, "allowed_origins", None),
                       max_request_bytes=getattr(args, "max_request_bytes", MAX_REQUEST_BYTES),
                       reasoning_parser=reasoning_parser(llm, args))


def reasoning_parser(llm: LLM, args: argparse.Namespace) -> str | None:
    """``--reasoning-parser``, with a warning where this tokenizer drops the tags it reads."""
    name = getattr(args, "reasoning_parser", None)
    if name is not None and not tags_survive_decoding(llm.tokenizer):
        log.warning("--reasoning-parser %s: this tokenizer drops <think> or </think> from decoded text (special "
                    "tokens): requests see their thinking split only with skip_special_tokens: false", name)
    return name


def chat_template_of(value: str | None) -> str | None:
    """``--chat-template``: a file's text where ``value`` names a file, else ``value`` itself if it reads as a
    template (it holds ``{``, ``}`` or a newline, as vLLM tells them apart); the template must compile as
    transformers compiles chat templates. ValueError says why not."""
    if value is None:
        return None
    if os.path.isfile(value):
        try:
            with open(value, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--chat-template {value}: cannot read it ({e})") from None
    elif any(c in value for c in "{}\n"):  # (vLLM's rule: a path holds none of these)
        # (escapes typed on a command line, such as \n, decoded as vLLM decodes them; other text kept as it is)
        text = value.encode("latin-1", "backslashreplace").decode("unicode_escape")
    else:
        raise ValueError(f"--chat-template {value}: no such file, and not a template itself (a template holds "
                         "{{ ... }} or {% ... %})")
    import jinja2

    try:  # (transformers' own environment: its extensions, such as {% generation %}, and filters)
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # pragma: no cover - a transformers without it: the syntax alone
        def _compile_jinja_template(t):
            return jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(t)
    try:
        _compile_jinja_template(text)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"--chat-template {value if len(value) < 80 else value[:77] + '...'}: not a valid Jinja "
                         f"template (line {e.lineno}: {e.message})") from None
    return text


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the options, before anything loads."""
    try:
        chat_template_of(getattr(args, "chat_template", None))
    except ValueError as e:
        return str(e)
    if getattr(args, "tensor_parallel_size", 1) < 1:
        return f"--tensor-parallel-size {args.tensor_parallel_size} is invalid: expected an int >= 1"
    if not 0 <= args.port <= 65535:
        return f"--port {args.port} is invalid: expected a port number, 0..65535"
    for name in ("max_num_seqs", "max_num_batched_tokens", "num_pages", "max_model_len", "max_budget", "max_waiting",
                 "max_request_bytes"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            return f"--{name.replace('_', '-')} {value} is invalid: expected an int >= 1"
    if not 0 < args.gpu_memory_utilization <= 1:
        return f"--gpu-memory-utilization {args.gpu_memory_utilization} is invalid: expected a share in (0, 1]"
    from ..config import ZipageConfig
    from ..scoring import list_scorers

    exact_tail = getattr(args, "exact_tail", 0)
    if exact_tail < 0:
        return f"--exact-tail {exact_tail} is invalid: expected an int >= 0"
    if exact_tail and args.budget is None and args.kv_cache_dtype not in ("fp8", "int8"):
        return f"--exact-tail {exact_tail}: it applies to 8-bit pages (--kv-cache-dtype fp8 or int8)"
    if getattr(args, "kv_rotation", None) == "on" and args.kv_cache_dtype not in ("fp8", "int8"):
        return "--kv-rotation on: it applies to 8-bit pages (--kv-cache-dtype fp8 or int8)"
    try:
        if args.budget is not None:
            ZipageConfig(budget=args.budget, page_size=args.page_size, kv_cache_dtype=args.kv_cache_dtype,
                         exact_tail=exact_tail)
        else:
            ZipageConfig(page_size=args.page_size)
    except (TypeError, ValueError) as e:
        return f"--budget {args.budget} / --page-size {args.page_size} / --exact-tail {exact_tail}: {e}"
    if args.scorer is not None and args.scorer not in list_scorers():
        return f"--scorer {args.scorer!r} is unknown: choose one of {list_scorers()}"
    if args.scorer is not None and args.budget is None:
        return f"--scorer {args.scorer} needs a budget (--budget none serves full KV: nothing is scored)"
    if args.max_budget is not None and args.budget is None:
        return "--max-budget needs an engine with a budget (--budget none serves full KV only)"
    if args.max_budget is not None and args.budget > args.max_budget:
        return f"--budget {args.budget} is above --max-budget {args.max_budget}"
    return None


def serve(llm: LLM, config: ServeConfig, host: str, port: int, log_level: str = "info") -> None:
    """Run the app on ``host:port`` until SIGINT / SIGTERM (blocking)."""
    import uvicorn

    engine = AsyncEngine(llm)
    app = build_app(engine, config)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            engine.stop()  # in-flight streams end now; the app's shutdown joins the loop
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10))
    server.run()


def main(args: argparse.Namespace) -> int:
    problem = check_args(args)
    if problem:
        print(f"zipage serve: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        model, tokenizer, root = load(args)
    except (OSError, ValueError) as e:  # a path that is not there, a Hub id not found, a checkpoint it cannot read
        print(f"zipage serve: could not load the model {args.model!r}: {e}", file=sys.stderr)
        return 2
    try:
        llm = engine_from_args(model, tokenizer, args)
    except (TypeError, ValueError) as e:  # an option this model cannot take (its context, its heads, ...)
        print(f"zipage serve: {e}", file=sys.stderr)
        return 2
    template = chat_template_of(getattr(args, "chat_template", None))  # (checked above: it reads and parses)
    if template is not None:
        llm.tokenizer.chat_template = template
    try:
        config = config_from_args(llm, root, args)
    except ValueError as e:  # the model's generation_config sets defaults SamplingParams refuses
        print(f"zipage serve: {e} (--generation-config vllm serves the API's own defaults)", file=sys.stderr)
        llm.close()
        return 2
    stats = llm.stats()
    pool = f"{stats['total_pages']} KV pages of {stats['page_size']} tokens"
    if args.budget is None:  # (no budget: how many run at once depends on their lengths)
        log.info("serving %s (%s) on %s: full KV, %s (%d tokens in all), at most %d requests at once "
                 "(--max-num-seqs; as many as their tokens fit)",
                 config.model_names[0], root, llm.runner.device, pool, stats["total_pages"] * stats["page_size"],
                 stats["max_concurrency"])
    else:
        log.info("serving %s (%s) on %s: budget %d, %s, up to %d requests at the budget", config.model_names[0],
                 root, llm.runner.device, args.budget, pool, stats["max_concurrency"])
    try:
        serve(llm, config, args.host, args.port)
    finally:
        llm.close()  # (the other tensor-parallel ranks, if any)
    return 0
