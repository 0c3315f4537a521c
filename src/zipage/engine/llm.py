"""``zipage.LLM``: the continuous-batching engine, offline and online (the user-facing API).

    llm = zipage.LLM(model, tokenizer, budget=2048)
    outs = llm.generate(["Prove that ..."], zipage.SamplingParams(max_tokens=8192))

    rid = llm.add_request("Solve ...", SamplingParams(max_tokens=512))
    for tokens in llm.stream(rid): ...

This file holds what users call: building the engine, adding, streaming, awaiting and cancelling
requests. The steps themselves run in ``EngineCore`` (core.py).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import itertools
import numbers
import os
import time
import weakref
from collections.abc import Iterator, Sequence as Seq
from typing import Any

import torch

from ..attention_checks import check_engine_config, sliding_layers
from ..cache import check_model_config
from ..calibration import calibrate_engine
from ..config import ZipageConfig, check_kv_cache_dtype, check_kv_rotation
from .. import environment
from ..environment import check_environment
from ..kernels.fp8 import query_weights_mode
from ..memory.block_manager import BlockManager
from ..memory.window_blocks import WindowBlocks
from ..scoring import get_scorer
from .core import EngineCore
from .inputs import as_prompt_list, chat_conversations, check_request, render_chat, resolve_budget, tokenize
from .outputs import OutputProcessor
from .runner import ModelRunner, _config_lock
from .sampling import SamplingParams, model_sampling_defaults
from .scheduler import Scheduler
from .sequence import RequestOutput, Sequence
from .sharding import check_tensor_parallel

# consecutive steps that raise before agenerate() or stream() gives up on its request (a step that fails another
# request, or one rolled back whole, is tried again)
MAX_FAILED_STEPS = 3
CPU_MEMORY_SHARE = 0.2  # of the available RAM, at most, for a default-sized pool on a CPU


def _ropes(config: Any) -> list[dict]:
    """The config's RoPE parameters: one dict, or one per layer type where the config gives them so (Gemma 3's
    ``{"full_attention": {...}, "sliding_attention": {...}}``)."""
    rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or not rope:
        return []
    if "rope_type" not in rope and "type" not in rope and all(isinstance(v, dict) for v in rope.values()):
        return list(rope.values())
    return [rope]


def _switching_rope(config: Any, trained: Any) -> tuple[str, int] | None:
    """``(rope type, positions)`` for a RoPE whose frequencies transformers picks per forward from the largest
    position in it (dynamic NTK, LongRoPE) past a number of positions, the fewest of any layer type's; None
    where no layer's RoPE does."""
    found = None
    for rope in _ropes(config):
        kind = rope.get("rope_type", rope.get("type"))
        if kind not in ("dynamic", "longrope"):
            continue
        # (dynamic: it grows past max_position_embeddings; longrope: long factors past the original length)
        original = trained if kind == "dynamic" else rope.get(
            "original_max_position_embeddings", getattr(config, "original_max_position_embeddings", None))
        if isinstance(original, int) and not isinstance(original, bool) and (found is None or original < found[1]):
            found = kind, original
    return found


def _rope_reach(config: Any, trained: Any) -> int | None:
    """The positions a model takes: ``max_position_embeddings``, times a RoPE scaling factor that stretches
    it (YaRN, linear, dynamic; llama3's and longrope's configs state the stretched length already); with a RoPE
    per layer type, the fewest any of them takes."""
    if not isinstance(trained, int) or isinstance(trained, bool):
        return None
    reach = None
    for rope in _ropes(config) or [{}]:
        kind, factor = rope.get("rope_type", rope.get("type")), rope.get("factor")
        this = trained
        if kind in ("yarn", "linear", "dynamic") and isinstance(factor, (int, float)) and factor > 1:
            base = rope.get("original_max_position_embeddings", trained)
            this = max(trained, int(base * factor))
        reach = this if reach is None else min(reach, this)
    return reach


PROBE_WAIT_S = 120  # the longest the position probe waits for another engine's forward on the same model


def check_positions_are_taken(model: Any, config: Any) -> None:
    """Raise NotImplementedError for a model whose forward ignores the ``position_ids`` it is given.

    The engine runs every request's tokens packed into one row, each at its own position. A model that makes
    its positions itself from the row (Bart's, Marian's, Pegasus's decoders used alone take ``arange`` of the
    input) would put a decoded token at position 0 and a second prompt after the first: wrong tokens, silently.
    Found by one small forward of the model's own: three tokens at positions 0, 1, 2 and at 0, 3, 9 (other
    distances, which a rotary embedding also tells apart) must give different logits."""
    p = next(model.parameters(), None) if hasattr(model, "parameters") else None
    if p is None or p.device.type == "meta":
        return
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 16:
        return
    special = set()  # (pad, image and other placeholder tokens, which some forwards treat apart)
    for c in (config, model.config):
        for key, value in (c.to_dict() if hasattr(c, "to_dict") else {}).items():
            if key.endswith(("token_id", "token_index", "token_ids")):
                values = value if isinstance(value, (list, tuple)) else [value]
                special.update(v for v in values if isinstance(v, int))
    ids = [t for t in range(vocab // 2, vocab) if t not in special][:3]
    name = type(model).__name__
    logits = []
    lock = _config_lock(config)  # (another engine on this model may be stepping: its forwards and this take turns)
    if not lock.acquire(timeout=PROBE_WAIT_S):
        raise RuntimeError(f"LLM(): an engine forward on this {name} did not end in {PROBE_WAIT_S} s (is this LLM "
                           "built from inside one, such as a forward hook? build it outside)")
    try:
        with torch.inference_mode():
            for pos in ((0, 1, 2), (0, 3, 9)):
                out = model(input_ids=torch.tensor([ids], device=p.device),
                            position_ids=torch.tensor([pos], device=p.device), use_cache=False)
                logits.append(out.logits[0, -1].float())
    except torch.OutOfMemoryError:
        raise  # (no verdict on the model: the memory was short)
    except Exception as e:
        raise NotImplementedError(f"the zipage engine runs a model on token ids and positions alone, and this "
                                  f"{name}'s forward failed so when LLM() tried it ({type(e).__name__}: {e})") from e
    finally:
        lock.release()
    if torch.equal(logits[0], logits[1]):
        raise NotImplementedError(
            f"this {name} ignores the position_ids it is given (its positions come from the input's own order, or "
            "it has none), and the zipage engine packs every request into one row, each at its own positions: its "
            "tokens would be wrong. generate(cache_implementation='zipage') serves it")


def _own_copy(params: Any) -> Any:
    """A request's own ``SamplingParams``: the object and its lists, dicts and sets copied (their items shared)."""
    if not dataclasses.is_dataclass(params) or isinstance(params, type):
        return params  # (check_request names what is wrong with it)
    own = copy.copy(params)
    for f in dataclasses.fields(own):
        value = getattr(own, f.name)
        if isinstance(value, (list, dict, set)):
            setattr(own, f.name, copy.copy(value))
    return own


def check_loaded_model_args(model: Any, dtype: Any, device: Any) -> None:
    """``dtype`` and ``device`` load a model given by name; with a loaded model they are refused unless they
    name what it already is (the engine does not convert or move a model it was handed)."""
    params = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    if dtype is not None and dtype != "auto":
        want = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
        if not isinstance(want, torch.dtype) or (params is not None and want != params.dtype):
            raise ValueError(f"LLM(dtype={dtype!r}) applies when model is a Hub id or a folder; the model given is "
                             f"{getattr(params, 'dtype', 'not a torch module')}: convert it first "
                             "(model.to(dtype)) or leave dtype out")
    if device is not None:
        try:
            want = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"LLM(device={device!r}) is invalid: {err}") from None
        have = getattr(params, "device", None)
        if have is None or want.type != have.type or (want.index is not None and want.index != have.index):
            raise ValueError(f"LLM(device={device!r}) applies when model is a Hub id or a folder; the model given "
                             f"is on {have}: move it first (model.to(device)) or leave device out")


# Finished requests whose outputs were never taken (``forget``, ``generate`` and ``agenerate`` drop theirs) are kept
# readable through ``output()``, the newest this many of them; older ones are dropped (a long-running engine fed
# through ``stream()`` or a step loop that never forgets would otherwise keep every request it ever ran)
KEEP_FINISHED = 4096


class LLM:
    """A continuous-batching engine with Compressed PagedAttention.

    Args:
        model: a loaded transformers causal LM, or a Hub id or local folder of one (loaded with ``dtype``
            and ``device``).
        tokenizer: a tokenizer (loaded from ``model`` when it is a path); needed for string
            prompts, ``text`` outputs and ``stop`` strings.
        budget: tokens kept per sequence after a compression, for requests that do not set their
            own (``SamplingParams.budget``: smaller, larger, or ``None`` for full KV). ``None``
            runs a plain full-KV paged engine (the baseline), which has no compression machinery
            and refuses per-request budgets (of the ``ZipageConfig`` fields it takes ``page_size`` and, with
            8-bit pages, ``kv_rotation`` and ``exact_tail``, the latter of any length: nothing is evicted). Other ``ZipageConfig`` fields
            (``page_size``, ``buffer``, ``window``, ``scorer``, ...) are accepted as keyword arguments too.
        enable_prefix_caching: share full prompt pages between requests with the same prefix (off for
            models with sliding-window layers: those keep only their window, so a cached prefix
            would lack the sliding layers' KV of its last tokens).
        enforce_eager: no CUDA graphs. Otherwise (on CUDA) decode-only steps replay a CUDA graph of
            the whole forward, captured for a ladder of batch sizes at the first decode step.
        async_compression: compress on a side CUDA stream while the other requests decode; the
            requests being compressed sit out the steps until their compression event completes.
            On a CPU the same bookkeeping runs with compressions that complete at once. With
            ``budget=None`` nothing compresses: the setting has no effect (``llm.async_compression``
            reads False).
        max_num_seqs: most sequences running at once (the budget may lower it further).
        max_num_batched_tokens: most tokens in one step (chunked prefill). Every running request decodes its
            token at every step, so with more than this many running a step carries one token each and
            no prompt tokens (vLLM refuses ``max_num_batched_tokens < max_num_seqs``; zipage allows it).
        gpu_memory_utilization: share of the GPU memory the model + pools may take (CUDA).
        num_pages: explicit pool size in pages (of the full-attention layers; sliding-window layers,
            which keep only their window, get a pool of their own sized for ``max_num_seqs``
            windows and one step's tokens). By default the pool is sized from the memory:
            on CUDA ``gpu_memory_utilization`` of the GPU; on a CPU what ``max_num_seqs``
            requests need (each at most ``budget + buffer`` tokens, or ``max_model_len`` with full
            KV; and at least one prompt of ``max_model_len``, stored whole before its first
            compression), capped at a fifth of the available RAM.
        max_model_len: longest logical length (default: the model's max_position_embeddings; longer
            only with ``ZIPAGE_ALLOW_LONG_MAX_MODEL_LEN=1``). Dynamic-NTK and LongRoPE models: at most
            ``max_position_embeddings`` (dynamic) or ``original_max_position_embeddings`` (LongRoPE), whatever
            that variable says: transformers picks their frequencies from a forward's largest position and the
            engine runs every request in one forward (LongRoPE models so need an explicit ``max_model_len``).
        fuse_ops: on CUDA, run the model's RMSNorm modules and its rotary embedding through fused
            Triton kernels (one kernel per norm, one per rotated tensor) inside the engine's forwards.
            It also merges each attention's q/k/v projections and each SiLU-gated MLP's gate/up
            projections into one GEMM (the weights become row slices of one tensor, in place: same
            values, no extra memory) and fuses the SiLU gate. Only what the kernels reproduce on a
            probe is swapped, and the modules' own forwards are back outside the engine's steps.
        async_scheduling: keep each step's sampled tokens on the device, feed them straight into
            the next step and read them on the host while that step runs (the scheduling and the
            bookkeeping then overlap the GPU). Outputs and stops arrive one step late; a request
            stopped by a token runs one extra step whose token is dropped. Tokens are the same
            either way.
        kv_cache_dtype: ``"auto"`` (the model's dtype) or ``"fp8"``: the KV pages hold e4m3 codes
            with a float32 scale per token and KV head (quantized where they are stored, read in
            registers by every kernel), so a page costs about half of bf16 and twice the tokens fit
            in the same memory. With ``budget=None`` it gives a full-KV FP8 engine. ``"int8"``: the
            same with int8 codes (``round(x / s)``, ``s = max|x| / 127``) of keys and values in a
            Hadamard-rotated basis (attention unchanged): the same bytes, with far less rounding in
            the attention logits than e4m3. ``exact_tail=N`` (a ``ZipageConfig`` field; full KV too)
            keeps each query slot's last N keys and values in the model's dtype, read exactly by every query
            (see the engine guide, "Exact tails"). ``kv_rotation=True`` (a ``ZipageConfig`` field; full KV
            too) stores FP8 pages in the rotated basis as well, ``False`` INT8 pages unrotated.
        tensor_parallel_size: split the model over this many ranks (GPUs from the model's, or
            CPU processes): each holds its share of every projection and the KV pages of its
            heads, which must divide by it. The engine starts ranks 1..N-1 itself (spawned
            processes; this process is rank 0), or joins the ranks ``torchrun`` started. A model
            object is sharded in place and sent to the other ranks; with a Hub id or a folder
            each rank loads it. See the "Several GPUs" guide.
        tensor_parallel_timeout: seconds a rank waits for the others inside a step before the
            engine stops with ``TensorParallelError``.
        dtype: with a Hub id or a folder for ``model``, the weights' dtype (default: the checkpoint's).
        device: with a Hub id or a folder, where the weights load (``"cuda"`` for the GPU; default:
            the CPU). With a loaded model, ``dtype`` and ``device`` are refused unless they name what the
            model already is (the engine neither converts nor moves it).
    """

    def __init__(self, model: Any, tokenizer: Any = None, *, budget: int | None = 2048,
                 enable_prefix_caching: bool = True, enforce_eager: bool = False, async_compression: bool = False,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 8192, gpu_memory_utilization: float = 0.9,
                 num_pages: int | None = None, max_model_len: int | None = None, dtype: Any = None,
                 device: Any = None, fuse_ops: bool = True, async_scheduling: bool = True,
                 kv_cache_dtype: str = "auto", tensor_parallel_size: int = 1, tensor_parallel_timeout: float = 600.0,
                 **zipage_fields: Any) -> None:
        check_environment()
        check_kv_cache_dtype(kv_cache_dtype, "LLM(kv_cache_dtype)")
        for name, value in (("enable_prefix_caching", enable_prefix_caching), ("enforce_eager", enforce_eager),
                            ("async_compression", async_compression), ("async_scheduling", async_scheduling),
                            ("fuse_ops", fuse_ops)):
            if not isinstance(value, bool) and type(value).__name__ != "bool_":  # ("false" would read as True)
                raise TypeError(f"LLM({name}={value!r}) is invalid: expected True or False")
        if isinstance(gpu_memory_utilization, bool) or not isinstance(gpu_memory_utilization, numbers.Real) or not (
                0 < gpu_memory_utilization <= 1):
            raise ValueError(f"LLM(gpu_memory_utilization={gpu_memory_utilization!r}) is invalid: expected a number "
                             "in (0, 1], the share of the GPU's memory the model and the pools may take")
        source = model
        if isinstance(model, (str, os.PathLike)):
            from .loading import load_model

            model, tokenizer = load_model(model, tokenizer, dtype=dtype,
                                          device=device if tensor_parallel_size == 1 else None)
        else:
            check_loaded_model_args(model, dtype, device)
        for name, value in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LLM({name}={value!r}) is invalid: expected an int >= 1")
        if max_model_len is not None and (not isinstance(max_model_len, numbers.Integral)
                                          or isinstance(max_model_len, bool) or max_model_len < 1):
            raise ValueError(f"LLM(max_model_len={max_model_len!r}) is invalid: "
                             "expected an int >= 1, or None for the model's")
        if num_pages is not None and (isinstance(num_pages, bool) or not isinstance(num_pages, int) or num_pages < 1):
            raise ValueError(f"LLM(num_pages={num_pages!r}) is invalid: expected an int >= 1, or None to size "
                             "the pool from the memory")
        config = model.config.get_text_config(decoder=True)
        check_model_config(config, model.config)
        check_engine_config(config)
        check_tensor_parallel(model.config, tensor_parallel_size)
        self.model = model.eval()  # (before the probe: dropout would make its two forwards differ by chance)
        if tensor_parallel_size == 1:
            check_positions_are_taken(model, config)
        self.tensor_parallel_size = tensor_parallel_size
        self.tokenizer = tokenizer
        page_size = zipage_fields.get("page_size", ZipageConfig.page_size)
        if budget is None:  # (with a budget ZipageConfig checks it)
            if isinstance(page_size, bool) or not isinstance(page_size, int) or not 1 <= page_size <= 1024 or (
                    page_size & (page_size - 1)):
                raise ValueError(f"LLM(page_size={page_size!r}) is invalid: expected a power of two in 1..1024")
            unknown = set(zipage_fields) - {"page_size", "exact_tail", "kv_rotation"}
            if unknown:
                raise ValueError(f"budget=None (full KV) takes no compression settings, got {sorted(unknown)}")
            exact_tail = zipage_fields.get("exact_tail", 0)
            if isinstance(exact_tail, bool) or not isinstance(exact_tail, int) or exact_tail < 0:
                raise ValueError(f"LLM(exact_tail={exact_tail!r}) is invalid: expected an int >= 0")
            if exact_tail and kv_cache_dtype not in ("fp8", "int8"):
                raise ValueError(f"LLM(exact_tail={exact_tail}) applies to 8-bit pages (kv_cache_dtype='fp8' or "
                                 f"'int8'), got kv_cache_dtype={kv_cache_dtype!r}, whose pages are exact already")
            kv_rotation = check_kv_rotation(zipage_fields.get("kv_rotation"), kv_cache_dtype, "LLM(kv_rotation={})")
            self.zipage_config = None
            scorer = None
        else:
            self.zipage_config = ZipageConfig.from_dict({"budget": budget, **zipage_fields,
                                                         "kv_cache_dtype": kv_cache_dtype})
            scorer = get_scorer(self.zipage_config.scorer, self.zipage_config)
            exact_tail = self.zipage_config.exact_tail
            kv_rotation = self.zipage_config.kv_rotation
        trained = getattr(config, "max_position_embeddings", None)
        reach = _rope_reach(config, trained)
        if (max_model_len is not None and isinstance(reach, int) and max_model_len > reach
                and environment.value("ZIPAGE_ALLOW_LONG_MAX_MODEL_LEN") != "1"):
            raise ValueError(f"LLM(max_model_len={max_model_len}) is beyond the {reach} positions the model "
                             f"takes (max_position_embeddings={trained}, with its RoPE scaling if any): positions "
                             "past them were never trained and its answers there may be wrong; set "
                             "ZIPAGE_ALLOW_LONG_MAX_MODEL_LEN=1 to allow it anyway")
        self.max_model_len = int(max_model_len) if max_model_len is not None else trained or 1 << 30
        if exact_tail > self.max_model_len:  # (full KV: a budget bounds it otherwise)
            raise ValueError(f"LLM(exact_tail={exact_tail}) is longer than max_model_len={self.max_model_len}: the "
                             "ring of exact tokens is allocated for every query slot and never holds more than a "
                             "request's length; give at most max_model_len")
        switching = _switching_rope(config, trained)
        if switching is not None and self.max_model_len > switching[1]:
            # (generate() runs one batch at a time; the engine packs every running request into one forward)
            given = "" if max_model_len is not None else ", the model's max_position_embeddings"
            raise ValueError(
                f"LLM(max_model_len={self.max_model_len}{given}): this model's {switching[0]} RoPE takes its frequencies "
                f"from the largest position of each forward past {switching[1]} positions, and the engine runs "
                "every request in one forward, so a request's tokens would depend on the others'; give "
                f"max_model_len <= {switching[1]} (or use model.generate())")
        window, sliding = sliding_layers(config)
        if any(sliding) and tensor_parallel_size > 1:
            raise ValueError("tensor_parallel_size > 1 is not supported for models with sliding-window layers "
                             f"({type(model).__name__}): run them on one GPU")
        self.ranks = None
        self.closed = False  # (close(): no step or request afterwards)
        if tensor_parallel_size > 1:  # from here on this process is rank 0 (the other ranks never get here)
            from .tensor_parallel import start_ranks

            self.ranks = start_ranks(model, source, dtype, device, tensor_parallel_size, tensor_parallel_timeout)
            weakref.finalize(self, self.ranks.close)  # (also when this constructor raises from here on)
        device = next(model.parameters()).device
        stateful = scorer is not None and scorer.stateful
        self.kv_cache_dtype = kv_cache_dtype
        window_blocks = None
        if any(sliding):  # sliding-window layers: a pool of their own, sized so it never runs out
            window_blocks = WindowBlocks(WindowBlocks.pool_pages(max_num_seqs, max_num_batched_tokens, page_size,
                                                                 window), page_size, window)
        if num_pages is None:
            num_pages = self._pages_from_memory(config, device, page_size, stateful, max_num_seqs,
                                                gpu_memory_utilization, window_blocks, exact_tail)
        blocks = BlockManager(num_pages, page_size, enable_prefix_caching, window=window_blocks)
        scheduler = Scheduler(blocks, self.zipage_config, max_num_seqs, max_num_batched_tokens)
        scheduler.max_model_len = self.max_model_len
        # exact tails: a prefix-cache hit recomputes at least the ring's last tokens (full KV too)
        scheduler.recompute_tail = max(scheduler.recompute_tail, exact_tail)
        if self.ranks is None:
            runner = ModelRunner(model, num_pages, page_size, self.zipage_config, scorer, scheduler.num_slots,
                                 fuse_ops=fuse_ops, kv_cache_dtype=kv_cache_dtype, window_blocks=window_blocks,
                                 exact_tail=exact_tail, kv_rotation=kv_rotation)
        else:
            from .tensor_parallel import driver_runner

            runner = driver_runner(self.ranks, model, num_pages, page_size, self.zipage_config, scorer,
                                   scheduler.num_slots, fuse_ops, kv_cache_dtype, exact_tail, kv_rotation)
        if getattr(runner, "query_moments", None) is not None and query_weights_mode() == "calibrated":
            calibrate_engine(runner, tokenizer, config, self.max_model_len, single_process=self.ranks is None)
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        eos = eos if eos is not None else getattr(config, "eos_token_id", None)
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        capacity = self.zipage_config.capacity + 1 if self.zipage_config is not None else self.max_model_len
        self.core = EngineCore(
            scheduler, blocks, runner, OutputProcessor(tokenizer, eos_ids, self.max_model_len),
            async_compression=bool(async_compression) and budget is not None,
            async_scheduling=bool(async_scheduling), use_graphs=not enforce_eager and device.type == "cuda",
            graph_table_width=blocks.pages_for(capacity),
        )
        self.requests: dict[str, Sequence] = {}  # request id -> its (first) sample
        self._samples: dict[str, list[Sequence]] = {}  # request id -> every sample, for requests with n > 1
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self._async_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> asyncio.Lock

    # the engine's parts (read-only views, for stats, tests and tools)
    scheduler = property(lambda self: self.core.scheduler)
    blocks = property(lambda self: self.core.blocks)
    runner = property(lambda self: self.core.runner)
    eos_ids = property(lambda self: self.core.outputs.eos_ids)
    async_compression = property(lambda self: self.core.async_compression)
    async_scheduling = property(lambda self: self.core.async_scheduling)
    use_graphs = property(lambda self: self.core.use_graphs)
    generated_tokens = property(lambda self: self.core.outputs.generated_tokens)

    def _pages_from_memory(self, config, device, page_size, stateful, max_num_seqs, utilization,
                           window_blocks: WindowBlocks | None = None, exact_tail: int = 0) -> int:
        dtype = self.model.dtype
        tp = self.tensor_parallel_size
        page_bytes = ModelRunner.bytes_per_page(config, page_size, dtype, stateful, self.kv_cache_dtype, tp)
        slot_bytes = 0
        if window_blocks is not None:  # the sliding-window layers' pool comes first
            slot_bytes += ModelRunner.bytes_per_page(config, page_size, dtype, False, tp_size=tp, sliding=True) * (
                window_blocks.pool.num_pages + 1)
        if self.zipage_config is not None:
            zc = self.zipage_config
            slot_bytes += ModelRunner.bytes_per_slot(config, zc.window, dtype, zc.budget, tp, exact_tail) * max_num_seqs
        elif exact_tail:  # full KV: the exact tails' ring alone
            slot_bytes += ModelRunner.bytes_per_slot(config, 0, dtype, 0, tp, exact_tail) * max_num_seqs
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            available = total * utilization - (total - free) - 512 * 2**20  # activations headroom
            where = f"GPU memory (gpu_memory_utilization={utilization})"
        else:
            available = _available_ram() * CPU_MEMORY_SHARE
            where = f"RAM ({CPU_MEMORY_SHARE:.0%} of the available memory)"
        available -= slot_bytes
        longest = self.zipage_config.capacity + 1 if self.zipage_config is not None else self.max_model_len
        per_request = -(-longest // page_size)
        if device.type != "cuda":  # what the requests need, no more: a compressed request holds budget + buffer
            # tokens, but its prompt, up to max_model_len, is stored whole before its first compression
            need = max(per_request * max_num_seqs, -(-(self.max_model_len + 1) // page_size))
            available = min(available, need * page_bytes)
        if available < page_bytes:
            raise RuntimeError(f"no {where} left for the KV pool: give LLM(..., num_pages=N)")
        return int(available // page_bytes)

    # ----------------------------------------------------------------------------- requests
    def get_default_sampling_params(self) -> SamplingParams:
        """What a request without SamplingParams runs with (vLLM's name): the sampling fields the model's
        ``generation_config`` sets (temperature, top_p, top_k, min_p, repetition_penalty), the rest
        SamplingParams' defaults."""
        return SamplingParams(**model_sampling_defaults(getattr(self.model, "generation_config", None)))

    def add_request(self, prompt: Any, params: SamplingParams | None = None, request_id: str | None = None,
                    chat: bool = False) -> str:
        """Queue a request (string or token ids); returns its id. Bad requests raise here and
        leave every request in flight untouched. A request with ``n > 1`` runs as ``n`` samples
        that share the prompt's pages: the first computes the prompt, the others then find its
        pages in the prefix cache."""
        rid, seqs = self._prepare_request(prompt, params, request_id, chat)
        self._queue(rid, seqs)
        return rid

    def add_requests(self, prompts: list[Any], params: SamplingParams | list[SamplingParams | None] | None = None,
                     request_ids: list[str | None] | None = None, chat: bool = False) -> list[str]:
        """Queue several requests at once, all or none: every one is checked as :meth:`add_request` checks
        before any is queued, so a bad one raises (naming its index) and leaves the engine as it was. ``params``:
        one for all, or one per prompt; ``request_ids``: one per prompt (None: automatic), distinct. Returns
        their ids; they are scheduled in the order given. A prompt is what :meth:`generate` takes (one prompt
        alone is one request)."""
        prompts = as_prompt_list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        params = list(params)
        ids = [None] * len(prompts) if request_ids is None else list(request_ids)
        if len(params) != len(prompts) or len(ids) != len(prompts):
            raise ValueError(f"add_requests: {len(prompts)} prompts, {len(params)} SamplingParams and {len(ids)} "
                             "request ids (expected one each, or one SamplingParams for all)")
        chosen = [i for i in ids if i is not None]
        if len(set(chosen)) != len(chosen):
            twice = sorted({i for i in chosen if chosen.count(i) > 1})
            raise ValueError(f"add_requests: request ids given more than once: {twice}")
        prepared, taken = [], set(chosen)
        for i, (prompt, p, rid) in enumerate(zip(prompts, params, ids)):
            try:
                got, seqs = self._prepare_request(prompt, p, rid, chat)
                while rid is None and got in taken:  # (an automatic id is not one given for a later prompt)
                    got, seqs = self._prepare_request(prompt, p, rid, chat)
            except (ValueError, TypeError) as e:
                if len(prompts) == 1:
                    raise
                raise (TypeError if isinstance(e, TypeError) else ValueError)(f"prompt {i}: {e}") from e
            taken.add(got)
            prepared.append((got, seqs))
        for rid, seqs in prepared:
            self._queue(rid, seqs)
        return [rid for rid, _ in prepared]

    def _queue(self, rid: str, seqs: list[Sequence]) -> None:
        """Hand a prepared request's samples to the scheduler."""
        self._samples.pop(rid, None)
        self.requests[rid] = seqs[0]
        if len(seqs) > 1:
            self._samples[rid] = seqs
        if len(self.requests) > 2 * KEEP_FINISHED:
            self._drop_oldest_finished()
        for seq in seqs:
            self.scheduler.add(seq)

    def _prepare_request(self, prompt: Any, params: SamplingParams | None, request_id: str | None = None,
                         chat: bool = False) -> tuple[str, list[Sequence]]:
        """Every check ``add_request`` makes, and the request's samples; nothing is queued (``add_requests``
        checks every prompt this way before it queues any)."""
        self._check_open()
        # (a copy: a caller reusing or changing its object must not change requests already in flight)
        params = _own_copy(params) if params is not None else self.get_default_sampling_params()
        ids, text = tokenize(self.tokenizer, prompt, chat)
        check_request(ids, params, request_id, vocab=self.model.config.get_text_config(decoder=True).vocab_size,
                      max_model_len=self.max_model_len, has_tokenizer=self.tokenizer is not None)
        if params.allowed_token_ids and params.min_tokens:  # (its first tokens would have nothing left to take)
            ends = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.core.outputs.eos_ids))
            if ends.issuperset(params.allowed_token_ids):
                raise ValueError(f"SamplingParams.allowed_token_ids={params.allowed_token_ids} is invalid with "
                                 f"min_tokens={params.min_tokens}: every allowed token ends the output (EOS or a stop "
                                 "id), and none may be taken before min_tokens")
        budget = resolve_budget(params, self.zipage_config)
        if params.max_tokens is None:  # as many as the request may take (vLLM's None)
            params.max_tokens = max(1, self.max_new_tokens(len(ids), params))
            params.validate()  # (min_tokens against it)
        rid = request_id
        while rid is None or (request_id is None and rid in self.requests):
            rid = str(next(self._ids))  # an automatic id never takes one the caller chose (or one still known)
        if rid in self.requests and not all(s.finished for s in self.samples(rid)):
            raise ValueError(f"request id {rid!r} is already in flight")
        seqs: list[Sequence] = []
        for i in range(params.n):
            seq = Sequence(request_id=rid if i == 0 else f"{rid}#{i}", prompt_token_ids=ids, params=params,
                           prompt=text, arrival=next(self._arrivals), budget=budget,
                           parent=rid if params.n > 1 else None, index=i, leader=seqs[0] if seqs else None,
                           decode=self.core.outputs.partial_text if self.tokenizer is not None else None)
            if params.seed is not None:
                seq.generator = torch.Generator(device=self.runner.device).manual_seed(params.seed + i)
            seqs.append(seq)
        peak = self.scheduler.worst_case_pages(seqs[0])
        if peak > self.blocks.num_pages:
            raise ValueError(
                f"this request needs up to {peak} pages of {self.blocks.page_size} tokens but the KV pool has "
                f"{self.blocks.num_pages}: shorten it, lower max_tokens or its budget, or give the engine more pages"
            )
        return rid, seqs

    def max_new_tokens(self, prompt_len: int, params: SamplingParams | None = None) -> int:
        """The most tokens a request with a ``prompt_len``-token prompt may ask for (``max_tokens``): what
        ``max_model_len`` leaves and, for a full-KV request (its budget None), what the KV pool holds (a
        compressed request keeps only its budget, so the pool does not bound its length). May be < 1."""
        limit = self.max_model_len - prompt_len
        if resolve_budget(params if params is not None else SamplingParams(), self.zipage_config) is None:
            limit = min(limit, self.blocks.num_pages * self.blocks.page_size - prompt_len)
        return limit

    def samples(self, request_id: str) -> list[Sequence]:
        """The sequences of a request: one, or ``n`` for a request with ``n`` samples."""
        return self._samples.get(request_id) or [self._get(request_id)]

    def cancel(self, request_id: str) -> None:
        """Stop a request (every sample) now; its pages go back to the pool. While another thread
        is inside ``step()`` (``agenerate``'s workers) it is stopped as soon as that step returns."""
        for seq in self.samples(request_id):
            self.core.cancel(seq)

    def abort_request(self, request_id: str | Seq[str]) -> None:
        """vLLM's name: :meth:`cancel` each of one id or a list of ids; ids that are unknown or already
        finished are skipped (as vLLM does), not an error."""
        for rid in [request_id] if isinstance(request_id, str) else list(request_id):
            try:  # (another thread's agenerate may forget the request between any two lines here)
                seqs = self.samples(rid)
            except KeyError:
                continue
            for seq in seqs:
                if not seq.finished:
                    self.core.cancel(seq)

    def forget(self, request_id: str) -> None:
        """Drop a finished request whose output was taken (``generate`` and ``agenerate`` do this
        themselves; a loop over ``step()`` calls it to keep ``requests`` from growing)."""
        seqs = self.samples(request_id)
        if not all(s.finished for s in seqs):
            raise ValueError(f"request {request_id!r} is still running: cancel it first")
        self._forget(seqs[0])

    def _forget(self, seq: Sequence) -> None:
        """Drop a request handed back to its caller (never a newer request that took its id)."""
        rid = seq.parent if seq.parent is not None else seq.request_id
        seqs = self._samples.get(rid, [seq]) if seq.parent is not None else [seq]
        if seq in seqs and self.requests.get(rid) is seqs[0]:
            del self.requests[rid]
            self._samples.pop(rid, None)

    def _drop_oldest_finished(self) -> None:
        """Forget the oldest finished requests beyond the newest :data:`KEEP_FINISHED` (their outputs were never
        taken: a ``stream()`` consumer, an aborted request, a step loop that does not ``forget``); running ones
        are never dropped. Runs when ``requests`` passes twice that, so its cost is spread over the adds."""
        finished = [rid for rid, seq in self.requests.items() if all(s.finished for s in self.samples(rid))]
        for rid in finished[:max(0, len(finished) - KEEP_FINISHED)]:
            self._forget(self.samples(rid)[0])

    def _get(self, request_id: str) -> Sequence:
        if request_id not in self.requests:
            raise KeyError(f"unknown request id {request_id!r}")
        return self.requests[request_id]

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished()

    has_unfinished_requests = has_unfinished  # (vLLM's name)

    def close(self) -> None:
        """Stop the engine, and its other tensor-parallel ranks if it has some. The engine cannot
        step afterwards, nor take requests (both raise). Also done when the engine is garbage-collected or
        the process exits."""
        self.closed = True
        if self.ranks is not None:
            self.ranks.close()

    def _check_open(self) -> None:
        if self.closed:
            message = "this engine was closed (LLM.close(), or the end of its with block): build a new one"
            if self.ranks is not None:  # (as its ranks say it: a TensorParallelError, a RuntimeError)
                from .parallel import TensorParallelError

                raise TensorParallelError(message)
            raise RuntimeError(message)

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; returns the requests that got new tokens or finished.

        With ``async_scheduling`` outputs arrive one step late, and a request stopped by a token
        (EOS, a stop id or string) has run one more step, whose token is dropped. A request stopped
        while its (asynchronous) compression is in flight is reported finished by the step that
        collects that compression. A cancelled request finishes within ``cancel()`` (or as the other
        thread's step in progress returns) and is not reported, unless its compression was in flight
        beside those of requests still running: then the step that collects it reports it
        (``finish_reason="cancelled"``: the signal that its pages are back). Steps never overlap: a
        call made while another thread is inside ``step()`` waits for it. A step that raises is undone (see ``EngineCore.step``): the next
        ``step()`` goes on and produces the same tokens."""
        self._check_open()
        return self.core.step()

    # ----------------------------------------------------------------------------- front ends
    def generate(self, prompts: Any, params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True, chat: bool = False, *,
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; one output per prompt, in order. A prompt is a string,
        a list of token ids, a 1-D tensor / array of them (a 2-D one is a batch of prompts), or vLLM's
        ``{"prompt": text}`` / ``{"prompt_token_ids": ids}``. ``sampling_params`` is vLLM's name for ``params``."""
        if sampling_params is not None:
            if params is not None:
                raise TypeError("generate() got both params and sampling_params (the same argument): pass one")
            params = sampling_params
        prompts = as_prompt_list(prompts)
        if isinstance(params, (list, tuple)):
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
            plist = list(params)
        else:
            plist = [params] * len(prompts)
        groups: list[list[Sequence]] = []
        bar = None
        try:
            for prompt, p in zip(prompts, plist):
                groups.append(self.samples(self.add_request(prompt, p, chat=chat)))
            if use_tqdm:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(groups), desc="zipage", unit="req", dynamic_ncols=True)
            start, start_tokens = time.perf_counter(), self.generated_tokens
            left = {g[0].request_id: sum(not s.finished for s in g) for g in groups}
            # Each sample counts as done when it is finished, whoever saw its last output: another thread's
            # step() may return it, and a request cancelled from elsewhere has none.
            pending = {(g[0].request_id, s.index): s for g in groups for s in g if not s.finished}
            while pending:
                self.step()
                for key in [k for k, seq in pending.items() if seq.finished]:
                    del pending[key]
                    left[key[0]] -= 1
                    if bar is not None and not left[key[0]]:
                        bar.update(1)
                if pending and not self.has_unfinished():  # never expected
                    raise RuntimeError(f"requests {sorted(pending)} were lost")
                if bar is not None:
                    rate = (self.generated_tokens - start_tokens) / max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
        except BaseException:  # a bad prompt, an interrupt, a failing step: leave nothing behind
            for seqs in groups:
                for seq in seqs:
                    self.core.cancel(seq)
                self._forget(seqs[0])
            self.core.drop_abandoned(set(self.requests))
            raise
        finally:
            if bar is not None:
                bar.close()
        outs = [RequestOutput.of(seqs) for seqs in groups]
        for seqs in groups:
            self._forget(seqs[0])
        return outs

    def chat(self, messages: Any, sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool = True, *, add_generation_prompt: bool = True, chat_template: str | None = None,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """vLLM's ``LLM.chat``: one conversation (a list of ``{"role": ..., "content": ...}`` dicts) or a list of
        them, each through the tokenizer's chat template (or ``chat_template``, with ``chat_template_kwargs``
        such as ``enable_thinking``), then :meth:`generate`. One output per conversation, in order; its
        ``prompt`` is the rendered text."""
        conversations = chat_conversations(messages)
        rendered = [render_chat(self.tokenizer, conv, add_generation_prompt, chat_template,
                                dict(chat_template_kwargs or {})) for conv in conversations]
        outs = self.generate([{"prompt_token_ids": ids} for ids, _ in rendered], sampling_params, use_tqdm=use_tqdm)
        return [dataclasses.replace(o, prompt=text) for o, (_, text) in zip(outs, rendered)]

    def get_tokenizer(self) -> Any:
        """The tokenizer the engine was given (vLLM's name), or None."""
        return self.tokenizer

    def stream(self, request_id: str) -> Iterator[list[int]]:
        """New token ids of one request as they come, driving the engine (other requests advance too).
        A request with ``n > 1`` samples has no single stream: drive ``step()`` and read each
        output's ``outputs[0].index``. A consumer that stops before the request finishes (``break``, a
        closed or collected generator) cancels the request, as a client gone does: its pages go back to
        the pool. A step that raises is tried again (it failed another request, or rolled back) until
        ``MAX_FAILED_STEPS`` steps in a row raised: then the exception goes up and the request ends. A request
        a failure ended raises RuntimeError naming the cause, once its tokens are out."""
        seq = self._get(request_id)
        if request_id in self._samples:
            raise ValueError(f"request {request_id!r} has n={seq.params.n} samples: stream() follows one; "
                             "drive step() and read each output's outputs[0].index")
        try:
            failures = 0
            while True:
                if seq.streamed < len(seq.output_ids):
                    new = seq.output_ids[seq.streamed :]
                    seq.streamed = len(seq.output_ids)
                    yield new
                if seq.finished:
                    if seq.finish_reason == "error":
                        raise RuntimeError(f"request {request_id!r} failed: {seq.error or 'a step failed'}")
                    return
                try:
                    self.step()
                    failures = 0
                except Exception:
                    failures += 1  # (another request's failure, or one the step rolled back: go on)
                    if failures >= MAX_FAILED_STEPS and not seq.finished:
                        raise  # (finished: its last tokens go out above, and a failure that ended it is named)
        finally:
            if not seq.finished:
                self.core.cancel(seq)

    def output(self, request_id: str) -> RequestOutput:
        return RequestOutput.of(self.samples(request_id))

    async def agenerate(self, prompt: Any, params: SamplingParams | None = None, chat: bool = False) -> RequestOutput:
        """Await one request; steps run in a worker thread so the event loop stays free. Several
        concurrent ``agenerate`` calls share the engine (one step at a time), from one event loop
        or several in turn. A cancelled call cancels its request (its pages go back to the pool
        once the step in progress, if any, returns). A request a failure ended comes back with
        ``finish_reason == "error"`` and ``error`` naming the cause, whichever call's step failed; a
        step that raises without ending this request is tried again, up to ``MAX_FAILED_STEPS`` in a
        row (then the exception goes up and the request is cancelled)."""
        rid = self.add_request(prompt, params, chat=chat)
        seqs = self.samples(rid)
        try:
            lock = self._loop_lock()
            failures = 0
            while not all(s.finished for s in seqs):
                async with lock:  # one worker thread at a time per loop; the core's lock orders the rest
                    if not all(s.finished for s in seqs):
                        try:
                            await asyncio.to_thread(self._step_for, seqs)
                            failures = 0
                        except Exception:
                            failures += 1  # (another request's failure, or one the step rolled back: go on)
                            if failures >= MAX_FAILED_STEPS and not all(s.finished for s in seqs):
                                raise
                await asyncio.sleep(0)
            return RequestOutput.of(seqs)
        except BaseException:  # cancelled (client gone, timeout) or failed: the request goes too
            for seq in seqs:
                self.core.cancel(seq)
            raise
        finally:
            self._forget(seqs[0])

    def _loop_lock(self) -> asyncio.Lock:
        """The running event loop's lock (an asyncio.Lock is bound to the loop it first waited in)."""
        loop = asyncio.get_running_loop()
        for old in [x for x in self._async_locks if x.is_closed()]:  # (a lock that waited holds its loop: the
            del self._async_locks[old]                                 # weak key alone would never let it go)
        lock = self._async_locks.get(loop)
        if lock is None:
            lock = self._async_locks[loop] = asyncio.Lock()
        return lock

    def _step_for(self, seqs: list[Sequence]) -> None:
        """A worker thread's step, unless ``seqs`` finished meanwhile. Holding the step lock while
        it runs, a step abandoned by a cancelled ``agenerate`` still blocks the next one."""
        with self.core.holding():
            if not all(s.finished for s in seqs):
                self.step()
        self.core.apply_cancels()

    def stats(self) -> dict[str, Any]:
        s, r = self.scheduler, self.runner
        window = self.blocks.window  # the sliding-window layers' pool, for models that have such layers
        extra = {} if window is None else {"window_free_pages": window.pool.num_free,
                                           "window_total_pages": window.pool.num_pages}
        return {
            **extra,
            "running": len(s.running),
            "waiting": len(s.waiting),
            "free_pages": self.blocks.num_free,
            "total_pages": self.blocks.num_pages,
            "page_size": self.blocks.page_size,
            "max_concurrency": s.max_concurrency,
            "preemptions": s.preemptions,
            "page_waits": s.waits,  # times a compressed request sat out a step for want of pages
            "compressions": s.compressions,
            "evicted_tokens": s.evicted_tokens,
            "prefix_cache_hits": self.blocks.hits,
            "prefix_caching": self.blocks.enable_prefix_caching,  # (off for models with sliding-window layers)
            # the ring of exact keys and values of each query slot (exact_tail), on this rank
            "exact_tail_bytes": sum(x.numel() * x.element_size() for x in (r.exact_k, r.exact_v) if x is not None),
            "generated_tokens": self.generated_tokens,
            "tensor_parallel_size": self.tensor_parallel_size,
        }

    def kept_positions(self, request_id: str, layer_idx: int) -> torch.Tensor:
        """Which logical positions (prompt tokens first, then outputs) request ``request_id`` keeps in layer
        ``layer_idx``: ``[kv_heads, stored]`` int64 on the engine's device, per KV head in slot order.
        Available between steps while the request waits or runs; a finished request (its pages are gone),
        or one whose asynchronous compression is in flight, raises ValueError. A call made while another
        thread is inside ``step()`` waits for that step (with several ranks, its messages would otherwise
        interleave with the step's)."""
        try:
            with self.core.holding():
                return self.runner.kept_positions(self._get(request_id), layer_idx)
        finally:
            self.core.apply_cancels()


def _available_ram() -> int:
    """Bytes of RAM available now (Linux), or the total where that is unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
