"""ModelRunner: the KV pools, the per-step metadata, the attention and the compressions.

The engine runs the Hugging Face model's own forward on packed tokens
(``input_ids`` of shape ``[1, T]``: the chunks of sequences in prefill first,
then one token per decoding sequence) with ``position_ids`` set to each
token's logical position. Its attention is registered with transformers'
``AttentionInterface`` under ``"zipage_engine"`` (and deliberately not with the
mask interface, so no dense mask is built): for every layer it stores the new
keys and values into the pages, keeps the last ``window`` queries of each
sequence in its query slot, and attends through the paged kernels. Compressions also
update each query slot's map of kept positions (``positions.py``). It serves plain causal
softmax attention only: a model whose config or modules ask for more is refused when the runner
is built, an attention call that asks for more (or receives a mask or bias the engine did not
build) when the step runs, and so is a forward in which a layer's attention bypassed it.

Layers typed ``sliding_attention`` in ``config.layer_types`` keep their KV in pools of their own,
addressed through each sequence's sliding-window pages (``memory/window_blocks.py``) and attended
with the kernels' ``window``; they are never scored nor compacted, and hold no query ring. The
full-attention layers' pools, query rings, kept-position maps and scales are indexed by their
rank among the full layers. Learned sink logits (``s_aux``) go to the kernels as ``sinks``, logit softcapping as ``softcap``.
"""

from __future__ import annotations

import gc
import threading
import warnings
import weakref
from dataclasses import dataclass, field

import torch

from .. import environment
from ..attention_checks import check_attention_call, check_model, sink_logits, sliding_layers
from ..capture import CALIBRATION_ATTENTION, ENGINE_ATTENTION, _original_function, own_name, settled_name
from ..compress import LayerPages, attention_scale, compress_layers, layer_batches
from ..config import ZipageConfig
from ..kernels import cudnn_prefill, kv_dtype, paged_decode_attention, paged_prefill_attention, store_kv
from ..kernels.exact_tail import exact_tail_merge
from ..kernels.fresh_prefill import FreshBatch, fresh_prefill_attention, plan_fresh
from ..kernels.fp8 import QUANTIZED_KV, SCALE_DTYPE, query_weighting, rotate, value_pool
from ..kernels.fp8 import kv_rotation as rotation_for
from ..kernels._triton import use_triton
from ..kernels.paged_decode_fp8 import DEFAULT_BLOCK_N as DECODE_TILE
from ..kernels.paged_prefill import DEQUANTIZE_LIMIT_BYTES, dequantize_pages
from ..memory.window_blocks import WindowBlocks
from ..query_moments import QueryMoments
from ..scoring import Scorer, get_scorer
from .fusion import ModelFusion
from .positions import KeptPositions, kept_positions
from .sequence import Sequence

ATTENTION_NAME = ENGINE_ATTENTION
CALIBRATION_NAME = CALIBRATION_ATTENTION  # (the attention of the forward that calibrates FP8 keys' query weights)
_context = threading.local()
# One lock per model config: the engine's attention name is set on the (shared) config for the length of a
# forward, so two engines on one model, driven from two threads, take turns instead of saving and restoring
# each other's name (which left the model with the engine's name for good, or a step's layers unserved).
_config_locks: dict[int, threading.Lock] = {}
_config_locks_guard = threading.Lock()


def _config_lock(cfg) -> threading.Lock:
    with _config_locks_guard:
        lock = _config_locks.get(id(cfg))
        if lock is None:
            lock = _config_locks[id(cfg)] = threading.Lock()
            try:  # (the entry goes with its config: no growth, and no stale entry for a later object's id)
                weakref.finalize(cfg, _config_locks.pop, id(cfg), None)
            except TypeError:  # pragma: no cover - a config that takes no weak references stays
                pass
        return lock


def dim_major_values(kv_cache_dtype: str, page_size: int, head_dim: int,
                     capability: tuple[int, int] | None) -> bool:
    """Whether the engine stores 8-bit values dimension-major (``fp8.value_pool``): where the 8-bit decode
    kernel reads them through tensor descriptors (compute capability 9.0 or newer, pages of whole 128-token
    tiles, a power-of-two head dim), the layout measured faster; on other GPUs token-major, where their
    per-token loads would read values with a stride; on a CPU dimension-major (the GPU layout, tested).
    ``capability``: the CUDA device's, None off CUDA. ``ZIPAGE_DIM_MAJOR_VALUES=1`` / ``0`` decides instead."""
    if kv_cache_dtype not in QUANTIZED_KV:
        return False
    value = environment.value("ZIPAGE_DIM_MAJOR_VALUES")
    if value:
        return value == "1"
    if capability is None:
        return True
    return capability[0] >= 9 and page_size % DECODE_TILE == 0 and head_dim >= 16 and not head_dim & (head_dim - 1)


# ZIPAGE_FRESH_PREFILL=1: whole prompts (nothing stored before them) go to PyTorch's fused attention over their own
# keys and values (kernels/fresh_prefill.py) in batches read in place (prompts that fill their length bucket, one
# after another); a bucket batch that must be copied is planned only from this many tokens (None: never; copied
# batches were slower than the paged kernel at every length measured, 384 to 10,240 tokens, on the H100)
FRESH_COPY_MIN: int | None = None


# whether whole prompts go to cuDNN's ragged attention by default where it can run (the cuDNN frontend installed,
# the `cudnn` extra) on a GPU of compute capability 9.0 or above: on the H100 its attention was 0.999-1.31x gather
# + SDPA's on 512-4,096-token prompts (parity on one length) and the engine's time to first token within 5% of the
# paged kernel's (benchmarks/results/issue15/s53/)
CUDNN_PREFILL_DEFAULT = True

# the largest difference, relative to a prompt's largest output, between a new cuDNN graph's first answer and
# PyTorch's attention over the same rows that the engine accepts (16-bit rounding gives ~1e-2 at most; a prompt's
# rows zeroed, 1; cudnn_prefill.ragged_error)
CUDNN_CHECK_TOLERANCE = 0.05

# the shortest length bucket (S_max) of cuDNN's ragged graphs: each new (batch size, bucket) costs a graph build
# (47-84 ms on the H100) inside the step that first meets it; from 2,048 a step's prompts up to 2,048 tokens share
# one graph per batch size, their attention as fast as with exact buckets (benchmarks/cudnn_graph_builds.py)
CUDNN_MIN_BUCKET = 2048


def fresh_prefill_default(device: torch.device, dtype: torch.dtype, head_dim: int,
                          kv_cache_dtype: str = "auto") -> str | None:
    """How whole prompts (nothing stored before them) are attended, instead of the paged prefill kernel:
    ``"cudnn"`` (cuDNN's ragged attention over the step's own keys and values, ``kernels/cudnn_prefill.py``:
    ``ZIPAGE_FRESH_PREFILL=cudnn``, which needs the cuDNN frontend and fails where it cannot run), ``"sdpa"``
    (PyTorch's fused attention in length buckets, ``kernels/fresh_prefill.py``: ``ZIPAGE_FRESH_PREFILL=1``; on a
    CPU SDPA's math runs it: tests) or None (the paged kernel; ``ZIPAGE_FRESH_PREFILL=0``). Unset: ``"cudnn"``
    where it can run on a GPU of compute capability 9.0 or above (:data:`CUDNN_PREFILL_DEFAULT`) and the pages
    hold the model's dtype, else None: with 8-bit pages (``kv_cache_dtype``) the paged kernel reads a prompt's
    own keys and values as stored, as it reads every later token's, where the fresh routes would attend to them
    unquantized (asked for, they do).
    SDPA's buckets: on the H100 cuDNN's attention over prompts of one length, batched, beats the Triton kernel
    1.06-1.33x (512-4,096 tokens), but in the engine the attention is a small share of a prompt's prefill and
    each new batch shape costs cuDNN a plan (~75 ms, once): time to first token did not improve (long prompts:
    6.89 s against 6.77 s; 32 prompts of 4,096 tokens: 2.15 against 2.05 s; ``benchmarks/results/issue15/s45/``).
    ``device``, ``dtype`` and ``head_dim`` must suit it too (16-bit or float32 on a CPU, head dims up to 256)."""
    value = environment.value("ZIPAGE_FRESH_PREFILL")
    if value == "cudnn":
        why = cudnn_prefill.unavailable(device, dtype, head_dim)
        if why is not None:
            raise RuntimeError(f"ZIPAGE_FRESH_PREFILL=cudnn: cuDNN's ragged attention cannot run here: {why}")
        return "cudnn"
    if value == "" and CUDNN_PREFILL_DEFAULT and kv_cache_dtype not in QUANTIZED_KV \
            and cudnn_prefill.available(device, dtype, head_dim) \
            and torch.cuda.get_device_capability(device)[0] >= 9:  # (measured on Hopper; asked for, 8.x too)
        return "cudnn"
    if value == "1" and head_dim <= 256 and (device.type == "cpu" or dtype in (torch.float16, torch.bfloat16)):
        return "sdpa"
    return None


@dataclass
class FreshRest:
    """The prefill sequences a step's fresh plan leaves to the paged kernel: their page table, stored lengths and
    query runs (``cu`` in the step's packed rows when ``rows`` is a slice of them; else ``rows`` indexes the
    packed rows they gather, and ``cu`` counts from 0)."""

    rows: slice | torch.Tensor
    cu: torch.Tensor
    table: torch.Tensor
    lens: torch.Tensor
    max_q_len: int


@dataclass
class CudnnWhole:
    """A step's whole prompts for cuDNN's ragged attention: the packed row each starts at (``starts`` ``[B + 1]``
    int32, the last entry the row after the last), their lengths; both as host lists too (``rows``, ``counts``:
    ``B`` each)."""

    starts: torch.Tensor
    lens: torch.Tensor
    max_len: int
    rows: list[int]
    counts: list[int]


def fresh_attention(r: ModelRunner, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    fresh: list[FreshBatch] | CudnnWhole, scale: float,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """The planned whole prompts' attention over their own keys and values, written into their rows of ``out``
    (new if not given; a copy if its rows do not hold their heads contiguous): cuDNN's ragged attention or
    PyTorch's fused attention in length buckets. Returns ``out``."""
    if not isinstance(fresh, CudnnWhole):
        return fresh_prefill_attention(q, k, v, fresh, scale, out=out)
    qkv = [t if cudnn_prefill.rows_of_heads(t) else t.contiguous() for t in (q, k, v)]
    if out is not None and not cudnn_prefill.rows_of_heads(out):
        out = out.contiguous()  # (never expected: the step's rows as made)
    if r.cudnn_prefill is not None:
        try:
            key = r.cudnn_prefill.key(*qkv, len(fresh.counts), fresh.max_len, scale, out)
            if key in r.cudnn_prefill.graphs:
                return r.cudnn_prefill(*qkv, fresh.starts, fresh.lens, fresh.max_len, scale, out=out, key=key)
            return _checked_first_call(r, qkv, fresh, scale, out, key)
        except torch.AcceleratorError:  # (a sticky CUDA error: nothing after it can run; not cuDNN's to take)
            raise
        except Exception as e:  # (a graph cuDNN cannot build or run here: no step's prompts are lost to it)
            r.cudnn_failed(e)
    return cudnn_prefill.ragged_prefill_sdpa(*qkv, fresh.rows, fresh.counts, scale, out=out)


def _checked_first_call(r: ModelRunner, qkv: list[torch.Tensor], fresh: CudnnWhole, scale: float,
                        out: torch.Tensor | None, key: tuple) -> torch.Tensor:
    """A new graph's (``key``'s) first call, into a NaN-filled scratch of ``out``'s layout (contiguous where
    ``out`` is None, as the calls after it make theirs: the same graph), against PyTorch's
    attention over the same rows: the prompts' rows must agree (``CUDNN_CHECK_TOLERANCE``) and no other row may
    be written. Then its rows go to ``out``; otherwise the route is given up (``cudnn_failed``) and PyTorch's
    rows go there instead (computed once)."""
    q = qkv[0]
    scratch = (torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None
               else torch.empty_strided(out.shape, out.stride(), dtype=out.dtype, device=out.device))
    scratch.fill_(float("nan"))
    r.cudnn_prefill(*qkv, fresh.starts, fresh.lens, fresh.max_len, scale, out=scratch, key=key)
    ref = cudnn_prefill.ragged_prefill_sdpa(*qkv, fresh.rows, fresh.counts, scale)
    err = cudnn_prefill.ragged_error(scratch, ref, fresh.rows, fresh.counts, untouched=True)
    good = err <= CUDNN_CHECK_TOLERANCE
    if not good:
        r.cudnn_failed(RuntimeError(
            f"a new graph's answer differs from PyTorch's attention (error {err:.3g} of a prompt's largest output; "
            f"inf: rows outside the prompts written), over {len(fresh.counts)} prompts of up to {fresh.max_len} "
            "tokens"))
    if out is None:
        out = torch.zeros_like(q)
    rows = torch.cat([torch.arange(a, a + n, device=q.device) for a, n in zip(fresh.rows, fresh.counts) if n])
    return out.index_copy_(0, rows, (scratch if good else ref).index_select(0, rows))


@dataclass
class Feed:
    """Tokens sampled by a step that are still on the device: ``tokens[rows[id(seq)]]`` is the
    pending token of ``seq`` (asynchronous scheduling feeds them to the next step without a host trip)."""

    tokens: torch.Tensor  # [n] int64
    rows: dict[int, int]


@dataclass
class StepMeta:
    """What the attention of every layer needs for one forward over packed tokens."""

    runner: ModelRunner
    slot_mapping: torch.Tensor  # [T] flat KV slot of each token
    ring_index: torch.Tensor  # [T] row of the query-slot ring (a scratch row for tokens outside the window)
    num_prefill_tokens: int
    cu_seqlens_q: torch.Tensor | None  # [Bp + 1] int32
    prefill_lens: torch.Tensor | None  # [Bp] int32, stored tokens after this step
    prefill_table: torch.Tensor | None  # [Bp, P] int32
    max_q_len: int
    decode_lens: torch.Tensor | None  # [Bd] int32
    decode_table: torch.Tensor | None  # [Bd, P] int32
    max_decode_len: int
    # the sliding-window layers' pool: slots, stored lengths and page tables (None without such layers)
    window_slots: torch.Tensor | None = None  # [T]
    window_prefill_lens: torch.Tensor | None = None  # [Bp] int32
    window_prefill_table: torch.Tensor | None = None  # [Bp, P'] int32
    window_decode_lens: torch.Tensor | None = None  # [Bd] int32
    window_decode_table: torch.Tensor | None = None  # [Bd, P'] int32
    # exact tails (ZipageConfig.exact_tail): each token's row in its slot's ring of exact keys and values, and
    # for each prefill chunk the ring rows of the tokens before it and where they and its own land in the scratch
    # pool its pages are dequantized into; for each decoding row its position and how many tokens it reads exactly
    exact_index: torch.Tensor | None = None  # [T]
    prefill_exact_src: torch.Tensor | None = None  # [X]
    prefill_exact_dst: torch.Tensor | None = None  # [X + num_prefill_tokens]
    prefill_exact_rows: list[tuple[int, int, int, int]] | None = None  # per chunk: tokens before, stored, own, row
    decode_pos: torch.Tensor | None = None  # [Bd]
    decode_exact: torch.Tensor | None = None  # [Bd] int32
    tail: tuple | None = None  # (made by the first layer of each forward: first ring rows, paged lens)
    # whole prompts through PyTorch's fused attention or cuDNN's ragged attention (full layers without window, sinks
    # or softcap): the plan's calls (or the ragged call's rows), and the prefill sequences left to the paged kernel
    fresh: list[FreshBatch] | CudnnWhole | None = None
    fresh_rest: FreshRest | None = None
    layers: set[int] = field(default_factory=set)  # the layers whose attention ran through the engine

    def decode_tail(self, r: ModelRunner) -> tuple[torch.Tensor, torch.Tensor]:
        """``(first [Bd], paged lens [Bd])`` of the decoding rows' exact tails: the first ring row of each row's
        slot, and the pages' tokens before its last ``decode_exact``. Made once per forward (inside a captured
        graph too: ``_model_call`` clears it)."""
        if self.tail is None:
            e = r.exact_tail
            self.tail = (self.exact_index[self.num_prefill_tokens:] // e * e, self.decode_lens - self.decode_exact)
        return self.tail


def engine_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """transformers attention function for packed engine steps (batch dim 1)."""
    meta: StepMeta | None = getattr(_context, "meta", None)
    r = meta.runner if meta is not None else None
    layer = module.layer_idx
    sliding = r is not None and layer in r.window_index
    check_attention_call(module, kwargs, "the zipage engine", r.window if sliding else None)
    if attention_mask is not None:
        raise NotImplementedError(
            f"the zipage engine serves plain causal softmax attention only; layer {module.layer_idx} "
            f"({type(module).__name__}) received an attention mask or additive bias the engine did not build"
        )
    if meta is None:  # this thread is no engine step: the model's own forward, while an engine steps in another
        raise RuntimeError(
            f"{type(module).__name__} of layer {layer} was called outside a zipage engine step while an engine on "
            "the same model (or on a model sharing its config object) is stepping in another thread: the model's "
            "attention name is the engine's for the length of its forward; run the model's own forward (or "
            "generate()) when no engine on it is stepping, or on a copy of the model")
    if layer in meta.layers:  # (its second call would store over the first call's keys and values)
        raise NotImplementedError(
            f"{type(module).__name__} of layer {layer} called attention twice in one forward (two attentions a "
            "layer, as differential attention has): the zipage engine stores one set of keys and values per layer "
            "and step, so it cannot serve this model")
    meta.layers.add(layer)
    q = query[0].transpose(0, 1)  # [T, Hq, D]
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    pool = r.window_k_pool if sliding else r.k_pool
    if k.shape[1:] != pool.shape[-2:] or v.shape[1:] != pool.shape[-2:]:
        raise NotImplementedError(
            f"{type(module).__name__} of layer {layer} gave keys {tuple(k.shape[1:])} and values "
            f"{tuple(v.shape[1:])} (heads, head dim) where the config gives {tuple(pool.shape[-2:])}: a model that "
            "repeats or reshapes its key/value heads before attention cannot be paged by the zipage engine")
    scale = attention_scale(scaling, q.shape[-1])
    q0, k0, v0 = q, k, v  # in the model's basis: what exact tails keep and read, rotated pages or not
    ks = vs = before = None
    if sliding:  # its window, in the sliding layers' pool (the model's dtype); never scored
        j = r.window_index[layer]
        kp, vp = r.window_k_pool[j], r.window_v_pool[j]
        store_kv(kp, meta.window_slots, k, vp, v)
        tables = (meta.window_prefill_table, meta.window_prefill_lens, meta.window_decode_table, meta.window_decode_lens)
    else:
        j = r.full_index[layer]
        kp, vp = r.k_pool[j], r.v_pool[j]
        if r.k_scale is not None:  # FP8 pages: the store quantizes, the attention kernels dequantize
            ks, vs = r.k_scale[j], r.v_scale[j]
        if r.rotation is not None:  # rotated 8-bit pages: keys, values and queries in that basis (fp8.py)
            q, k, v = rotate(q, r.rotation, q.dtype), rotate(k, r.rotation), rotate(v, r.rotation)
        moments = r.query_moments
        if moments is not None and meta.num_prefill_tokens:  # (before the store: a prompt's keys are weighted by
            moments.add(j, q[:meta.num_prefill_tokens])       # its own queries too; query_moments.py)
        store_kv(kp, meta.slot_mapping, k, vp, v, ks, vs,
                 key_weights=None if moments is None else moments.layer_weights[j])
        if r.state_pool is not None:
            r.state_pool[j].view(-1, r.state_pool.shape[-1]).index_fill_(0, meta.slot_mapping, 0.0)
        if r.q_cache is not None:  # the queries' ring rows, stored as tokens into one-row pages (no host values,
            # so CUDA-graph capture works; a third of index_copy_'s time on the H200)
            store_kv(r.q_cache[j].view(-1, 1, *q.shape[1:]), meta.ring_index, q)
        if r.exact_k is not None:  # exact tails: the tokens before each prefill chunk read before the ring takes it
            if meta.num_prefill_tokens:
                before = [x[j].view(-1, *k.shape[1:]).index_select(0, meta.prefill_exact_src)
                          for x in (r.exact_k, r.exact_v)]
            store_kv(r.exact_k[j], meta.exact_index, k0, r.exact_v[j], v0)
        r.scaling[j] = float(scale)
        tables = (meta.prefill_table, meta.prefill_lens, meta.decode_table, meta.decode_lens)
    features = dict(window=r.window if sliding else None, sinks=sink_logits(kwargs), softcap=kwargs.get("softcap"))
    n_p = meta.num_prefill_tokens
    exact = r.exact_k is not None and not sliding
    rot = r.rotation if not sliding else None
    decode = None
    if n_p < q.shape[0] and exact:  # (its output in the model's basis)
        decode = _decode_with_exact_tails(r, meta, j, q[n_p:].contiguous(), q0[n_p:].contiguous(), rot, kp, vp,
                                          ks, vs, scale, features)
    elif n_p < q.shape[0]:
        decode = paged_decode_attention(
            q[n_p:].contiguous(), kp, vp, tables[2], tables[3], scale, max_len_hint=meta.max_decode_len,
            k_scale=ks, v_scale=vs, **features
        )
    fresh = meta.fresh  # (None unless ZIPAGE_FRESH_PREFILL planned some: the features are looked at only then)
    if fresh is not None and (sliding or any(v is not None for v in features.values())):
        fresh = None
    if fresh is not None and decode is None and meta.fresh_rest is None:  # every row from the fused attention
        out = fresh_attention(r, q0, k0, v0, fresh, scale)  # (its output as it is, where it is one batch)
        return out[None], None
    if n_p:
        out = torch.empty_like(q)
        if exact:  # (in the model's basis)
            _prefill_with_exact_tails(meta, q0[:n_p], k0, v0, before, kp, vp, ks, vs, rot, scale, features, out)
        elif fresh is not None:  # the prompts the plan leaves, through the paged kernel
            rest = meta.fresh_rest
            if rest is not None and isinstance(rest.rows, slice):  # (one run of rows: the queries as they are)
                out[rest.rows] = paged_prefill_attention(
                    q[:n_p], kp, vp, rest.table, rest.cu, rest.lens, scale, max_q_len=rest.max_q_len,
                    k_scale=ks, v_scale=vs)[rest.rows]
            elif rest is not None:
                out.index_copy_(0, rest.rows, paged_prefill_attention(
                    q.index_select(0, rest.rows), kp, vp, rest.table, rest.cu, rest.lens, scale,
                    max_q_len=rest.max_q_len, k_scale=ks, v_scale=vs))
        else:
            out[:n_p] = paged_prefill_attention(
                q[:n_p], kp, vp, tables[0], meta.cu_seqlens_q, tables[1], scale, max_q_len=meta.max_q_len,
                k_scale=ks, v_scale=vs, **features
            )
        if decode is not None:
            out[n_p:] = decode
    else:  # a decode-only step: the decode kernel's output as it is (no copy)
        out = decode
    if rot is not None and not exact:  # the output back from the rotated basis
        out = rotate(out, rot, out.dtype)
    if fresh is not None:  # (in the model's basis: its own keys and values, never stored)
        out = fresh_attention(r, q0, k0, v0, fresh, scale, out=out)
    return out[None], None


def _decode_with_exact_tails(r: ModelRunner, meta: StepMeta, j: int, q, q0, rot, kp, vp, ks, vs, scale, features):
    """Decoding rows with exact tails: each row's pages but their last ``decode_exact`` tokens, and those
    tokens from the slot's ring as the model computed them, merged (``sinks`` join once, in the merge). ``q``:
    the queries in the pages' basis (rotated by ``rot``, if any), ``q0`` in the model's, the ring's and the
    output's."""
    first, lens = meta.decode_tail(r)
    H, D = r.exact_k.shape[-2:]
    out, lse = paged_decode_attention(q, kp, vp, meta.decode_table, lens, scale, max_len_hint=meta.max_decode_len,
                                      k_scale=ks, v_scale=vs, softcap=features["softcap"], return_lse=True)
    out = rotate(out, rot, out.dtype)  # (back from the pages' basis: the log-sum-exp is the same in both)
    return exact_tail_merge(q0, out, lse, r.exact_k[j].view(-1, H, D), r.exact_v[j].view(-1, H, D), first,
                            meta.decode_pos, meta.decode_exact, r.exact_tail, scale, features["softcap"],
                            features["sinks"])


def _prefill_with_exact_tails(meta: StepMeta, q, k, v, before, kp, vp, ks, vs, rot, scale, features, out) -> None:
    """Prefill chunks with exact tails, into ``out[:len(q)]``: their pages dequantized into a scratch pool (and
    rotated back to the model's basis, that of ``q``, ``k``, ``v`` and ``out``, where they are stored rotated
    by ``rot``), each chunk's own tokens and the ``exact_tail - 1`` before it written over their codes' values,
    then the 16-bit prefill. Where the scratch of every chunk's pages together would pass
    ``DEQUANTIZE_LIMIT_BYTES``, one chunk at a time (a chunk's own pages are dequantized whole: its context x
    KV heads x head dim x 4 bytes)."""
    n_p, table = q.shape[0], meta.prefill_table
    src = [torch.cat([b.to(q.dtype), x[:n_p].to(q.dtype)]) for b, x in zip(before, (k, v))]
    per_page = kp[0].numel() * 2 * q.element_size()
    if table.shape[0] == 1 or table.numel() * per_page <= DEQUANTIZE_LIMIT_BYTES:
        groups = [(slice(0, n_p), table, meta.cu_seqlens_q, meta.prefill_lens, meta.max_q_len, meta.prefill_exact_dst,
                   src)]
    else:
        groups, e0, k_count = [], 0, len(meta.prefill_exact_src)
        for b, (before_b, stored, n, q0) in enumerate(meta.prefill_exact_rows):
            rows = torch.arange(stored - before_b, stored + n, device=q.device)
            chunk = [torch.cat([x[e0:e0 + before_b], x[k_count + q0:k_count + q0 + n]]) for x in src]
            cu = torch.tensor([0, n], dtype=torch.int32, device=q.device)
            pages = table[b:b + 1, :-(-(stored + n) // kp.shape[1])]  # (its own pages, not the widest chunk's)
            groups.append((slice(q0, q0 + n), pages, cu, meta.prefill_lens[b:b + 1], n, rows, chunk))
            e0 += before_b
    for rows, pages, cu, lens, max_q, dst, values in groups:
        kq, vq, scratch_table = dequantize_pages(kp, vp, ks, vs, pages, q.dtype)
        if rot is not None:
            kq, vq = rotate(kq, rot, q.dtype), rotate(vq, rot, q.dtype)
        for pool, x in zip((kq, vq), values):
            pool.view(-1, *pool.shape[2:]).index_copy_(0, dst, x)
        out[rows] = paged_prefill_attention(q[rows], kq, vq, scratch_table, cu, lens, scale, max_q_len=max_q,
                                            **features)


def calibration_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers attention function for :meth:`ModelRunner.calibrate_query_moments`: each full-attention
    layer's queries counted into the runner's moments (in the pages' basis), then the model's own attention (its
    configured implementation, with the masks transformers makes for it: sliding windows, softcaps and sinks as the
    model computes them)."""
    r = getattr(_context, "calibrating", None)
    if r is None:
        raise RuntimeError(f"{type(module).__name__} of layer {module.layer_idx} was called with the engine's "
                           "calibration attention outside ModelRunner.calibrate_query_moments")
    layer = module.layer_idx
    if layer not in r.window_index:
        q = query[0].transpose(0, 1)  # [T, Hq, D]
        if r.rotation is not None:
            q = rotate(q, r.rotation, q.dtype)
        r.query_moments.add(r.full_index[layer], q)
    own = _context.calibration_of
    cfg = getattr(module, "config", None) or r.config
    cfg._attn_implementation_internal = own  # (functions that read the name, flash attention's loader, see its own)
    try:
        return _original_function(module, own)(module, query, key, value, attention_mask, **kwargs)
    finally:
        cfg._attn_implementation_internal = CALIBRATION_NAME


def _own_masks(name: str):
    """The mask function transformers makes masks with for the implementation ``name`` (eager's for others)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    return ALL_MASK_ATTENTION_FUNCTIONS[name] if name != "eager" and name in ALL_MASK_ATTENTION_FUNCTIONS \
        else eager_mask


def calibration_masks(*args, **kwargs):
    """The masks of the calibrating thread's model: those its own implementation takes (per thread, so two engines
    calibrating at once in two threads each get their own)."""
    return _own_masks(_context.calibration_of)(*args, **kwargs)


_registered = False


def register_attention() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface, AttentionMaskInterface

        AttentionInterface.register(ATTENTION_NAME, engine_attention)
        AttentionInterface.register(CALIBRATION_NAME, calibration_attention)
        AttentionMaskInterface.register(CALIBRATION_NAME, calibration_masks)
        _registered = True


class ModelRunner:
    """Owns the pools and turns scheduled steps into model forwards and compressions."""

    def __init__(self, model, num_pages: int, page_size: int, zipage_config: ZipageConfig | None,
                 scorer: Scorer | None, num_slots: int, fuse_ops: bool = True, kv_cache_dtype: str = "auto",
                 tp_size: int = 1, window_blocks: WindowBlocks | None = None, exact_tail: int = 0,
                 kv_rotation: bool | None = None) -> None:
        check_model(model)
        register_attention()
        self.model = model
        self.config = model.config.get_text_config(decoder=True)
        self._forward_lock = _config_lock(self.config)  # (shared with every engine on this model: see _model_call)
        cfg = self.config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        L = cfg.num_hidden_layers
        Hq = cfg.num_attention_heads
        Hkv = getattr(cfg, "num_key_value_heads", None) or Hq
        D = getattr(cfg, "head_dim", None) or cfg.hidden_size // Hq
        Hq, Hkv = Hq // tp_size, Hkv // tp_size  # tensor parallelism: this rank's heads (sharding.py)
        self.page_size = page_size
        self.zipage_config = zipage_config
        self.scorer = scorer
        self.scratch_page = num_pages  # one extra page, never handed out: padding rows of graph batches use it
        self.window, sliding = sliding_layers(cfg)
        if any(sliding) and window_blocks is None:
            raise ValueError("a model with sliding-window layers needs the engine's WindowBlocks")
        self.window_blocks = window_blocks if any(sliding) else None
        self.full_layers = [i for i in range(L) if not sliding[i]]  # their rank indexes the full-layer pools
        self.full_index = {layer: j for j, layer in enumerate(self.full_layers)}
        self.window_index = {layer: j for j, layer in enumerate(i for i in range(L) if sliding[i])}
        self.window_k_pool = self.window_v_pool = None
        self.window_scratch = 0
        if self.window_blocks is not None:  # one extra page for graph padding rows here too
            self.window_scratch = self.window_blocks.pool.num_pages
            wshape = (len(self.window_index), self.window_scratch + 1, page_size, Hkv, D)
            self.window_k_pool = torch.zeros(wshape, dtype=self.dtype, device=self.device)
            self.window_v_pool = torch.zeros(wshape, dtype=self.dtype, device=self.device)
        L = len(self.full_layers)
        shape = (L, num_pages + 1, page_size, Hkv, D)
        self.kv_cache_dtype = kv_cache_dtype
        self.k_pool = torch.zeros(shape, dtype=kv_dtype(kv_cache_dtype, self.dtype), device=self.device)
        # 8-bit values stored dimension-major (each page [H_kv, D, page]): the decode kernel's value tiles reach
        # the dot's operand layout without a transpose through shared memory (kernels/paged_decode_fp8.py)
        capability = torch.cuda.get_device_capability(self.device) if self.device.type == "cuda" else None
        self.v_pool = (value_pool(shape, self.k_pool.dtype, self.device)
                       if dim_major_values(kv_cache_dtype, page_size, D, capability) else torch.zeros_like(self.k_pool))
        # FP8 / INT8 pages: a float32 scale per token and KV head, on the same pages and slots as the codes
        self.k_scale = self.v_scale = None
        if kv_cache_dtype in QUANTIZED_KV:
            self.k_scale = torch.zeros(shape[:-1], dtype=SCALE_DTYPE, device=self.device)
            self.v_scale = torch.zeros_like(self.k_scale)
        # 8-bit pages stored in a rotated basis (INT8 by default, FP8 if asked; a full-KV engine, which has no
        # ZipageConfig, takes the setting as ``kv_rotation``)
        setting = zipage_config.kv_rotation if zipage_config is not None else kv_rotation
        self.rotation = rotation_for(kv_cache_dtype, D, self.device, setting)
        # FP8 pages: the keys' scale search weighted by the moments of the prompts' queries (query_moments.py)
        self.query_moments = QueryMoments(L, Hkv, D, self.device) if query_weighting(kv_cache_dtype, D) else None
        self.state_pool = None
        self.q_cache = None
        self.kept: KeptPositions | None = None
        # (a full-KV engine, which has no ZipageConfig, takes its exact tails as ``exact_tail``)
        self.exact_tail = zipage_config.exact_tail if zipage_config is not None else exact_tail
        self.exact_k = self.exact_v = None
        if self.exact_tail:
            # exact tails: each slot's last ``exact_tail`` keys and values as the model computed them (in its
            # basis, rotated pages or not), position t at ring row ``slot * exact_tail + t % exact_tail``; the
            # scratch slot takes the tokens outside any tail and graph padding rows
            e = self.exact_tail
            self.exact_k = torch.zeros(L, (num_slots + 1) * e, 1, Hkv, D, dtype=self.dtype, device=self.device)
            self.exact_v = torch.zeros_like(self.exact_k)
        if zipage_config is not None:
            if scorer is not None and scorer.stateful:
                self.state_pool = torch.zeros(shape[:-1], dtype=torch.float32, device=self.device)
            w = zipage_config.window
            # one ring of `window` queries per slot, plus a scratch slot for tokens outside any window
            self.q_cache = torch.zeros(L, num_slots + 1, w, Hq, D, dtype=self.dtype, device=self.device)
            self.kept = KeptPositions(L, num_slots, Hkv, zipage_config.budget, self.device)
        self.num_slots = num_slots
        self._scorers: dict[int, Scorer] = {}  # per-request budgets other than the engine's
        self.scaling = [None] * L
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_table_width = 0
        # the model's RMSNorms and RoPE as fused kernels inside the engine's forwards, its q/k/v and
        # gate/up GEMMs merged (the weights become slices of one tensor), SiLU-gate fused (CUDA only)
        self.fusion = ModelFusion.find(model) if fuse_ops and use_triton(self.k_pool) else ModelFusion()
        # whole prompts through PyTorch's fused attention or cuDNN's ragged attention ("sdpa", "cudnn" or None; not
        # with exact tails, whose prefill reads the rings)
        self.fresh_prefill = (None if self.exact_tail
                              else fresh_prefill_default(self.device, self.dtype, D, kv_cache_dtype))
        self.cudnn_prefill = None
        self.cudnn_error: str | None = None  # why the cuDNN route was given up, if it was
        if self.fresh_prefill == "cudnn":  # (its first graph here: cuDNN's first build costs ~1 s, not a request's)
            try:
                self.cudnn_prefill = cudnn_prefill.CudnnPrefill(self.device, pad_batch=True,
                                                                min_bucket=CUDNN_MIN_BUCKET)
                self.cudnn_prefill.warm(Hq, Hkv, D, self.dtype)
            except torch.AcceleratorError:  # (a sticky CUDA error: nothing after it can run; not cuDNN's to take)
                raise
            except Exception as e:
                if environment.value("ZIPAGE_FRESH_PREFILL") == "cudnn":  # (asked for: refused, saying why)
                    raise RuntimeError(f"ZIPAGE_FRESH_PREFILL=cudnn: cuDNN's ragged attention failed here: "
                                       f"{type(e).__name__}: {e}") from e
                self.cudnn_failed(e)
        self.fresh_prefill_tokens = 0  # prompt tokens those routes have served (host count)

    def cudnn_failed(self, error: Exception) -> None:
        """Give up cuDNN's ragged attention after ``error`` (a graph it could not build or run): the step under
        way finishes its whole prompts through PyTorch's fused attention, later steps through the paged kernel;
        one warning says why (``cudnn_error``)."""
        self.cudnn_error = f"{type(error).__name__}: {error}"
        self.cudnn_prefill = None  # (before the warning, which a filter may turn into an error)
        self.fresh_prefill = None
        warnings.warn(f"cuDNN's ragged attention failed ({self.cudnn_error}); whole prompts go to the paged "
                      "prefill kernel from now on (ZIPAGE_FRESH_PREFILL=0 skips the route)", RuntimeWarning,
                      stacklevel=2)

    @staticmethod
    def bytes_per_page(config, page_size: int, dtype: torch.dtype, stateful: bool, kv_cache_dtype: str = "auto",
                       tp_size: int = 1, sliding: bool = False) -> int:
        """A page's bytes over the full-attention layers: keys and values (FP8: codes plus a float32
        scale per token and head each), and a stateful scorer's float32 state; on each rank, with
        ``tp_size`` ranks (a rank holds ``1 / tp_size`` of the KV heads). ``sliding``: a page of the
        sliding-window layers' pool instead (the model's dtype, no state)."""
        cfg = config.get_text_config(decoder=True)
        Hq = cfg.num_attention_heads
        Hkv = getattr(cfg, "num_key_value_heads", None) or Hq
        D = getattr(cfg, "head_dim", None) or cfg.hidden_size // Hq
        slides = sum(sliding_layers(cfg)[1])
        if sliding:
            kv_cache_dtype, stateful = "auto", False
        layers = slides if sliding else cfg.num_hidden_layers - slides
        elem = torch.empty((), dtype=kv_dtype(kv_cache_dtype, dtype)).element_size()
        scales = 2 * SCALE_DTYPE.itemsize if kv_cache_dtype in QUANTIZED_KV else 0
        per_token = layers * (Hkv // tp_size) * (2 * D * elem + scales + (4 if stateful else 0))
        return per_token * page_size

    @staticmethod
    def bytes_per_slot(config, window: int, dtype: torch.dtype, budget: int = 0, tp_size: int = 1,
                       exact_tail: int = 0) -> int:
        """A query slot's share: its ring of ``window`` queries, its kept-position map of ``budget`` and, with
        exact tails, its ring of ``exact_tail`` keys and values (on each rank, with ``tp_size`` ranks)."""
        cfg = config.get_text_config(decoder=True)
        Hq = cfg.num_attention_heads
        Hkv = getattr(cfg, "num_key_value_heads", None) or Hq
        D = getattr(cfg, "head_dim", None) or cfg.hidden_size // Hq
        elem = torch.empty((), dtype=dtype).element_size()
        ring = cfg.num_hidden_layers * window * (Hq // tp_size) * D * elem
        full = cfg.num_hidden_layers - sum(sliding_layers(cfg)[1])
        tail = full * exact_tail * (Hkv // tp_size) * D * 2 * elem
        return ring + tail + KeptPositions.bytes_per_slot(config, budget) // tp_size

    def release_slot(self, slot: int) -> None:
        """A query slot given back (its request finished or was preempted, its compressions landed): the map
        of a budget of its own that its request held goes."""
        if self.kept is not None:
            self.kept.release(slot)

    def kept_positions(self, seq: Sequence, layer_idx: int) -> torch.Tensor:
        """``[H_kv, stored]`` logical positions that ``seq`` keeps in layer ``layer_idx`` (see ``LLM``); a
        sliding-window layer: the window its last query attended, ``[H_kv, <= window]``."""
        L, heads = self.config.num_hidden_layers, self.k_pool.shape[3]
        if type(layer_idx) is not int or layer_idx in self.window_index:
            kept_positions(seq, layer_idx, L, heads, None, self.device)  # the checks: index, status
            first = max(0, seq.num_computed - self.window)
            return torch.arange(first, seq.num_computed, device=self.device).expand(heads, -1).clone()
        kept_positions(seq, layer_idx, L, heads, None, self.device)  # (the index against the model's layers)
        return kept_positions(seq, self.full_index[layer_idx], len(self.full_layers), heads, self.kept, self.device)

    # ----------------------------------------------------------------------------- forward
    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        p = self.page_size
        return [seq.pages[j // p] * p + j % p for j in range(start, end)]

    def _table(self, pages: list[list[int]]) -> torch.Tensor:
        width = max(len(p) for p in pages)
        rows = [p + [0] * (width - len(p)) for p in pages]
        return torch.tensor(rows, dtype=torch.int32, device=self.device)

    @staticmethod
    def _feed_ids(ids: torch.Tensor, decode: list[Sequence], offset: int, feed: Feed | None) -> None:
        """Write the input token of decoding sequences whose token is still on the device (pending)."""
        if feed is None:
            return
        pend = [i for i, s in enumerate(decode) if s.pending]
        if not pend:
            return
        src = [feed.rows[id(decode[i])] for i in pend]
        if pend == src == list(range(len(pend))):  # the previous step's requests, same order: one copy
            ids[offset : offset + len(pend)].copy_(feed.tokens[: len(pend)])
            return
        dst = torch.tensor([offset + i for i in pend], device=ids.device)
        ids.index_copy_(0, dst, feed.tokens.index_select(0, torch.tensor(src, device=ids.device)))

    def forward(self, prefill: list[tuple[Sequence, int]], decode: list[Sequence], feed: Feed | None = None) -> torch.Tensor:
        """Run one packed step; returns the logits of each sequence's last token, prefill first.
        The sequences are not changed: the step loop books what the forward wrote once it stands.

        A decoding sequence whose input token is pending (sampled by the previous step, not yet
        on the host) takes it from ``feed`` on the device."""
        ids, pos, slots, ring, last, wslots = [], [], [], [], [], []
        wb = self.window_blocks
        w = self.zipage_config.window if self.zipage_config is not None else 0
        scratch = self.num_slots * w  # first row of the scratch slot
        e = self.exact_tail
        exact, e_scratch = [], self.num_slots * e
        for seq, n in prefill:
            if seq.num_computed + n > seq.num_tokens - seq.pending:
                raise RuntimeError("a prefill chunk reaches a token that is still on the device")
        for seq, n in prefill + [(s, 1) for s in decode]:
            start = seq.num_computed
            known = seq.num_tokens - seq.pending  # tokens with a value on the host
            ids.extend(seq.token_at(t) if t < known else 0 for t in range(start, start + n))
            pos.extend(range(start, start + n))
            slots.extend(self._slots(seq, seq.stored, seq.stored + n))
            if wb is not None:
                wslots.extend(wb.slots(seq, start, start + n))
            if w:
                ring.extend(seq.slot * w + t % w if t >= start + n - w else scratch for t in range(start, start + n))
            if e:
                exact.extend(seq.slot * e + t % e if t >= start + n - e else e_scratch for t in range(start, start + n))
            last.append(len(ids) - 1)
        dev = self.device
        prefill_seqs = [s for s, _ in prefill]
        n_p = sum(n for _, n in prefill)
        cu = None
        if prefill:
            cu = torch.tensor([0] + list(torch.tensor([n for _, n in prefill]).cumsum(0).tolist()),
                              dtype=torch.int32, device=dev)
        meta = StepMeta(
            runner=self,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            ring_index=torch.tensor(ring if w else [0] * len(ids), dtype=torch.long, device=dev),
            num_prefill_tokens=n_p,
            cu_seqlens_q=cu,
            prefill_lens=torch.tensor([s.stored + n for s, n in prefill], dtype=torch.int32, device=dev)
            if prefill else None,
            prefill_table=self._table([s.pages for s in prefill_seqs]) if prefill else None,
            max_q_len=max((n for _, n in prefill), default=0),
            decode_lens=torch.tensor([s.stored + 1 for s in decode], dtype=torch.int32, device=dev) if decode else None,
            decode_table=self._table([s.pages for s in decode]) if decode else None,
            max_decode_len=max((s.stored + 1 for s in decode), default=0),
        )
        if prefill and self.fresh_prefill:
            self._fresh_meta(meta, prefill)
        if wb is not None:
            i32 = dict(dtype=torch.int32, device=dev)
            meta.window_slots = torch.tensor(wslots, dtype=torch.long, device=dev)
            if prefill:
                meta.window_prefill_lens = torch.tensor([s.num_computed + n - s.window_offset for s, n in prefill], **i32)
                meta.window_prefill_table = self._table([s.window_pages for s in prefill_seqs])
            if decode:
                meta.window_decode_lens = torch.tensor([s.num_computed + 1 - s.window_offset for s in decode], **i32)
                meta.window_decode_table = self._table([s.window_pages for s in decode])
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        self._feed_ids(input_ids, decode, n_p, feed)
        input_ids = input_ids[None]
        position_ids = torch.tensor(pos, dtype=torch.long, device=dev)[None]
        if e:
            self._exact_meta(meta, prefill, decode, exact, position_ids[0, n_p:])
        keep = torch.tensor(last, dtype=torch.long, device=dev)
        return self._model_call(meta, input_ids, position_ids, keep)[0]

    def _fresh_meta(self, meta: StepMeta, prefill: list[tuple[Sequence, int]]) -> None:
        """Plan the step's whole prompts (nothing stored or computed before the chunk) for PyTorch's fused
        attention or cuDNN's ragged attention (``StepMeta.fresh``) and describe the prefill sequences left to the
        paged kernel (``StepMeta.fresh_rest``)."""
        starts, a = [], 0
        for _, n in prefill:
            starts.append(a)
            a += n
        whole = [b for b, (seq, _) in enumerate(prefill) if seq.stored == 0 and seq.num_computed == 0]
        if not whole:
            return
        if self.fresh_prefill == "cudnn":  # every whole prompt, where it lies in the step's rows
            rows, lens = [starts[b] for b in whole], [prefill[b][1] for b in whole]
            i32 = dict(dtype=torch.int32, device=self.device)
            meta.fresh = CudnnWhole(torch.tensor(rows + [rows[-1] + lens[-1]], **i32), torch.tensor(lens, **i32),
                                    max(lens), rows, lens)
            served = set(whole)
        else:
            plan = plan_fresh([prefill[b][1] for b in whole], [starts[b] for b in whole], self.device,
                              copy_min=FRESH_COPY_MIN)
            if not plan:
                return
            # the plan's sequence indices, into the step's prefill list
            meta.fresh = [FreshBatch(tuple(whole[i] for i in f.seqs), f.length, f.first_row, f.src, f.dst)
                          for f in plan]
            served = {b for f in meta.fresh for b in f.seqs}
        self.fresh_prefill_tokens += sum(prefill[b][1] for b in served)
        rest = [b for b in range(len(prefill)) if b not in served]
        if not rest:
            return
        idx = torch.tensor(rest, device=self.device)
        table, lens = meta.prefill_table.index_select(0, idx), meta.prefill_lens.index_select(0, idx)
        max_q = max(prefill[b][1] for b in rest)
        if rest == list(range(rest[0], rest[-1] + 1)):  # one run of sequences, so of rows
            rows = slice(starts[rest[0]], starts[rest[-1]] + prefill[rest[-1]][1])
            meta.fresh_rest = FreshRest(rows, meta.cu_seqlens_q[rest[0]:rest[-1] + 2], table, lens, max_q)
            return
        src, cu = [], [0]
        for b in rest:
            src += range(starts[b], starts[b] + prefill[b][1])
            cu.append(cu[-1] + prefill[b][1])
        dev = self.device
        meta.fresh_rest = FreshRest(torch.tensor(src, dtype=torch.long, device=dev),
                                    torch.tensor(cu, dtype=torch.int32, device=dev), table, lens, max_q)

    def _exact_meta(self, meta: StepMeta, prefill: list[tuple[Sequence, int]], decode: list[Sequence],
                    exact: list[int], decode_pos: torch.Tensor) -> None:
        """The step's exact-tail metadata (``StepMeta``): a prefill chunk reads, besides its own tokens, the last
        ``exact_tail - 1`` before it that its slot's ring holds (from ``ring_from``, where its slot began: a
        prefix-cache hit's tokens were never computed in it); a decoding row its last ``exact_tail`` tokens."""
        e, dev, p = self.exact_tail, self.device, self.page_size
        meta.exact_index = torch.tensor(exact, dtype=torch.long, device=dev)
        if prefill:
            width = max(len(s.pages) for s, _ in prefill)  # (the prefill table's, so the scratch pool's pages)
            src, dst, own, meta.prefill_exact_rows = [], [], [], []
            for b, (seq, n) in enumerate(prefill):
                start, first = seq.num_computed, b * width * p
                k = min(start - seq.ring_from, e - 1)
                src.extend(seq.slot * e + t % e for t in range(start - k, start))
                dst.extend(range(first + seq.stored - k, first + seq.stored))
                meta.prefill_exact_rows.append((k, seq.stored, n, len(own)))
                own.extend(range(first + seq.stored, first + seq.stored + n))
            meta.prefill_exact_src = torch.tensor(src, dtype=torch.long, device=dev)
            meta.prefill_exact_dst = torch.tensor(dst + own, dtype=torch.long, device=dev)
        if decode:
            meta.decode_pos = decode_pos
            meta.decode_exact = torch.tensor([self._exact_count(s) for s in decode], dtype=torch.int32, device=dev)

    def _exact_count(self, seq: Sequence) -> int:
        """How many of its last tokens a decoding ``seq`` reads from its ring (itself included)."""
        return min(seq.num_computed - seq.ring_from + 1, self.exact_tail)

    def calibrate_query_moments(self, ids: list[int], fallback: bool = False) -> None:
        """Count the prompt queries of ``ids`` (one sequence, positions from 0) into the FP8 keys' moments and
        freeze them (``ZIPAGE_FP8_QUERY_WEIGHTS=calibrated``, the default): one forward of the model's own, through
        its own attention implementation, with each full-attention layer's queries counted as a prompt's are in an
        engine step (the fused ops applied, rotated pages' basis); nothing is stored and no page is touched. Where the
        forward fails (a sticky CUDA error aside) and ``fallback`` (the mode not asked for by name), the moments
        are cleared and follow the prompts the engine serves (as ``ZIPAGE_FP8_QUERY_WEIGHTS=1``), with one
        warning naming the error; otherwise the error is raised (the moments cleared too: no layer's partial
        count is left)."""
        m = self.query_moments
        if m is None:
            raise RuntimeError("calibrate_query_moments: these pages weigh no keys by their queries (FP8 pages "
                               "with the scale search and ZIPAGE_FP8_QUERY_WEIGHTS not 0)")
        cfg = self.config
        dev = self.device
        with self._forward_lock:
            original = cfg._attn_implementation
            try:
                # (its own attention and masks: calibration_attention, calibration_masks)
                _context.calibration_of = own_name(original)  # (not a capture's wrapper another thread armed)
                _context.calibrating = self
                cfg._attn_implementation_internal = CALIBRATION_NAME
                with torch.inference_mode(), self.fusion.applied():
                    self.model(input_ids=torch.tensor([ids], device=dev), use_cache=False, logits_to_keep=1,
                               position_ids=torch.arange(len(ids), device=dev)[None])
            except torch.AcceleratorError:
                raise
            except Exception as e:
                m.reset()  # (no layers' partial counts left behind, whichever way it goes)
                if not fallback:
                    raise RuntimeError(f"ZIPAGE_FP8_QUERY_WEIGHTS=calibrated: the calibration forward failed "
                                       f"({type(e).__name__}: {e}); set ZIPAGE_FP8_QUERY_WEIGHTS=1 or 0") from e
                warnings.warn(f"FP8 keys' query weights: the calibration forward failed ({type(e).__name__}: {e}); "
                              "the weights follow the prompts this engine serves instead, so a request's FP8 "
                              "results may depend on the others' (ZIPAGE_FP8_QUERY_WEIGHTS=1 or 0 silences this)",
                              RuntimeWarning, stacklevel=4)
                return
            finally:
                cfg._attn_implementation_internal = settled_name(cfg, original)
                _context.calibrating = _context.calibration_of = None
        m.freeze()

    def _model_call(self, meta: StepMeta, input_ids, position_ids, logits_to_keep) -> torch.Tensor:
        """The model's own forward with the engine attention in place (restored afterwards)."""
        cfg = self.config
        meta.tail = None  # (each forward makes its own, a captured one included)
        meta.layers = set()
        with self._forward_lock:  # (another engine on this model, in another thread, waits for this forward)
            original = cfg._attn_implementation
            _context.meta = meta
            cfg._attn_implementation_internal = ATTENTION_NAME
            try:
                with torch.inference_mode(), self.fusion.applied():
                    out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                                     logits_to_keep=logits_to_keep)
            except Exception as e:
                if not meta.layers and hasattr(e, "add_note"):  # (no layer's attention reached the engine)
                    e.add_note(f"zipage: the forward failed before any layer's attention reached the engine; a "
                               f"{type(self.model).__name__} whose attention does not go through transformers' "
                               "AttentionInterface (its own attention code) cannot be served by the zipage engine")
                raise
            finally:
                cfg._attn_implementation_internal = settled_name(cfg, original)
                _context.meta = None
        missing = sorted(set(range(cfg.num_hidden_layers)) - meta.layers)
        if missing:  # its attention ran the model's own code: over the packed tokens, not the pages
            raise NotImplementedError(
                f"the attention of layers {missing[:8]}{' ...' if len(missing) > 8 else ''} of this "
                f"{type(self.model).__name__} does not go through transformers' AttentionInterface, so the "
                "zipage engine cannot serve it"
            )
        logits = out.logits
        if isinstance(logits_to_keep, torch.Tensor) and logits.shape[1] != logits_to_keep.numel():
            # (a model that takes no logits_to_keep, such as WhisperForCausalLM, gives every row's logits)
            if logits.shape[1] != input_ids.shape[1]:
                raise RuntimeError(f"{type(self.model).__name__} gave logits for {logits.shape[1]} rows of a "
                                   f"{input_ids.shape[1]}-token forward")
            logits = logits[:, logits_to_keep]
        return logits

    # ----------------------------------------------------------------------------- CUDA graphs
    # Batch sizes with a captured decode graph; a step runs the smallest that holds its batch, padded. A finer
    # ladder above 192 (every 16) was no faster on the H200: 490 FP8 requests in the 496 graph took what they
    # take in the 512 one (26.15 against 26.11 ms; the GEMMs' 128-row tiles cover both alike;
    # benchmarks/results/issue15/s33/call2).
    GRAPH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)

    def capture_graphs(self, max_batch: int, table_width: int) -> None:
        """Capture the decode forward (one token per sequence) for a ladder of batch sizes.

        Every per-step input lives in a static buffer; padding rows of a batch write to and read
        from a scratch page and a scratch query row. The split count of the decode kernel is
        fixed by ``table_width`` pages, the longest context a decoding sequence can have."""
        sizes = self._graph_buffers(max_batch, table_width)
        pool = torch.cuda.graph_pool_handle()
        graphs = {}
        # No garbage collection while capturing: an old engine's graphs, events or pinned buffers
        # released mid-capture would invalidate it.
        gc.collect()
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            self._capture_sizes(sizes, table_width, pool, graphs)
        except BaseException:  # (an interrupt, a failing model): no graph at all, captured again next time
            torch.cuda.synchronize()
            raise
        finally:
            if gc_was_enabled:
                gc.enable()
        self.graphs = graphs
        torch.cuda.synchronize()

    def _graph_buffers(self, max_batch: int, table_width: int) -> list[int]:
        """The graphs' static input buffers (padding rows filled in); returns the batch sizes to capture."""
        dev = self.device
        sizes = [b for b in self.GRAPH_SIZES if b < max_batch] + [max_batch]
        n = max(sizes)
        self.graph_table_width = table_width
        self.g_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.g_pos = torch.zeros(n, dtype=torch.long, device=dev)
        self.g_slots = torch.full((n,), self.scratch_page * self.page_size, dtype=torch.long, device=dev)
        self.g_ring = torch.full((n,), self._scratch_ring(), dtype=torch.long, device=dev)
        self.g_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.g_table = torch.full((n, table_width), self.scratch_page, dtype=torch.int32, device=dev)
        if self.exact_tail:  # padding rows: the scratch slot's ring, their one token exact
            self.g_exact = torch.full((n,), self.num_slots * self.exact_tail, dtype=torch.long, device=dev)
            self.g_exact_n = torch.ones(n, dtype=torch.int32, device=dev)
        if self.window_blocks is not None:  # the sliding-window layers' slots, lengths and pages
            width = self.window_blocks.table_width()
            self.g_wslots = torch.full((n,), self.window_scratch * self.page_size, dtype=torch.long, device=dev)
            self.g_wlens = torch.ones(n, dtype=torch.int32, device=dev)
            self.g_wtable = torch.full((n, width), self.window_scratch, dtype=torch.int32, device=dev)
        return sizes

    def _graph_call(self, b: int, table_width: int):
        """The forward a graph of batch ``b`` captures: over the static buffers' first ``b`` rows."""
        meta = StepMeta(
            runner=self, slot_mapping=self.g_slots[:b], ring_index=self.g_ring[:b], num_prefill_tokens=0,
            cu_seqlens_q=None, prefill_lens=None, prefill_table=None, max_q_len=0,
            decode_lens=self.g_lens[:b], decode_table=self.g_table[:b],
            max_decode_len=table_width * self.page_size,
        )
        if self.window_blocks is not None:
            meta.window_slots, meta.window_decode_lens = self.g_wslots[:b], self.g_wlens[:b]
            meta.window_decode_table = self.g_wtable[:b]
        if self.exact_tail:
            meta.exact_index, meta.decode_pos = self.g_exact[:b], self.g_pos[:b]
            meta.decode_exact = self.g_exact_n[:b]
        return lambda: self._model_call(meta, self.g_ids[:b][None], self.g_pos[:b][None], 0)

    def _capture_sizes(self, sizes: list[int], table_width: int, pool, graphs: dict) -> None:
        for b in sorted(sizes, reverse=True):
            run = self._graph_call(b, table_width)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    run()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = run()
            graphs[b] = (graph, logits)

    def _scratch_ring(self) -> int:
        w = self.zipage_config.window if self.zipage_config is not None else 0
        return self.num_slots * w

    def graph_batch(self, n: int) -> int | None:
        return min((b for b in self.graphs if b >= n), default=None)

    def decode_with_graph(self, decode: list[Sequence], feed: Feed | None = None) -> torch.Tensor | None:
        """Replay the captured decode graph for these sequences; None when no graph fits."""
        b = self.graph_batch(len(decode))
        if b is None or any(len(s.pages) > self.graph_table_width for s in decode):
            return None
        wb = self.window_blocks
        if wb is not None and any(len(s.window_pages) > self.g_wtable.shape[1] for s in decode):
            return None
        n = len(decode)
        w = self.zipage_config.window if self.zipage_config is not None else 0
        p, pad = self.page_size, b - n
        scratch_slot, width = self.scratch_page * p, self.graph_table_width
        ids = [0 if s.pending else s.token_at(s.num_computed) for s in decode] + [0] * pad
        pos = [s.num_computed for s in decode] + [0] * pad
        slots = [s.pages[s.stored // p] * p + s.stored % p for s in decode] + [scratch_slot] * pad
        ring = ([s.slot * w + s.num_computed % w for s in decode] if w else [0] * n) + [self._scratch_ring()] * pad
        lens = [s.stored + 1 for s in decode] + [1] * pad
        table = [s.pages + [self.scratch_page] * (width - len(s.pages)) for s in decode]
        table += [[self.scratch_page] * width] * pad
        host = (torch.tensor(ids), torch.tensor(pos), torch.tensor(slots), torch.tensor(ring),
                torch.tensor(lens, dtype=torch.int32), torch.tensor(table, dtype=torch.int32))
        for dst, src in zip((self.g_ids, self.g_pos, self.g_slots, self.g_ring, self.g_lens, self.g_table), host):
            dst[:b].copy_(src, non_blocking=True)
        if wb is not None:
            wwidth, wscratch = self.g_wtable.shape[1], self.window_scratch
            wslots = [wb.slots(s, s.num_computed, s.num_computed + 1)[0] for s in decode] + [wscratch * p] * pad
            wlens = [s.num_computed + 1 - s.window_offset for s in decode] + [1] * pad
            wtable = [s.window_pages + [wscratch] * (wwidth - len(s.window_pages)) for s in decode]
            wtable += [[wscratch] * wwidth] * pad
            for dst, src in zip((self.g_wslots, self.g_wlens, self.g_wtable),
                                (torch.tensor(wslots), torch.tensor(wlens, dtype=torch.int32),
                                 torch.tensor(wtable, dtype=torch.int32))):
                dst[:b].copy_(src, non_blocking=True)
        if self.exact_tail:
            e = self.exact_tail
            rows = [s.slot * e + s.num_computed % e for s in decode] + [self.num_slots * e] * pad
            counts = [self._exact_count(s) for s in decode] + [1] * pad
            self.g_exact[:b].copy_(torch.tensor(rows), non_blocking=True)
            self.g_exact_n[:b].copy_(torch.tensor(counts, dtype=torch.int32), non_blocking=True)
        self._feed_ids(self.g_ids, decode, 0, feed)
        graph, logits = self.graphs[b]
        graph.replay()
        return logits[0, :n]

    # ----------------------------------------------------------------------------- compression
    def window_queries(self, seqs: list[Sequence]) -> torch.Tensor:
        """``[L, n, Hq, w, D]``: each sequence's last ``window`` queries, oldest first."""
        w = self.zipage_config.window
        idx = torch.tensor([[(s.num_computed - w + i) % w for i in range(w)] for s in seqs], device=self.device)
        slots = torch.tensor([s.slot for s in seqs], device=self.device)
        q = self.q_cache[:, slots]  # [L, n, w, Hq, D] in ring order
        order = idx[None, :, :, None, None].expand(q.shape[0], -1, -1, *q.shape[3:])
        return q.gather(2, order).transpose(2, 3)

    def scorer_for(self, budget: int) -> Scorer:
        """The scorer of sequences with this budget (a scorer may read the budget, e.g. to bound the
        tokens it always keeps)."""
        if budget == self.zipage_config.budget:
            return self.scorer
        scorer = self._scorers.pop(budget, None)  # (re-inserted: the dict's order is least recently used first)
        if scorer is None:
            scorer = get_scorer(self.zipage_config.scorer, self.zipage_config.replace(budget=budget))
            if len(self._scorers) >= 64:  # (a server's requests may each ask for a budget of their own)
                del self._scorers[next(iter(self._scorers))]
        self._scorers[budget] = scorer
        return scorer

    def compress(self, seqs: list[Sequence], dst_pages: list[list[int]] | None, first: bool) -> None:
        """Compress ``seqs`` (same stored length, same budget) in every layer to their budget, in place
        or into ``dst_pages`` (one list of fresh pages per sequence)."""
        cfg = self.zipage_config
        budget = seqs[0].budget
        scorer = self.scorer_for(budget)
        S = seqs[0].stored
        slots = torch.tensor([self._slots(s, 0, S) for s in seqs], dtype=torch.long, device=self.device)
        dst = None
        if dst_pages is not None:
            p = self.page_size
            dst = torch.tensor([[pg[j // p] * p + j % p for j in range(budget)] for pg in dst_pages],
                               dtype=torch.long, device=self.device)
        L = self.k_pool.shape[0]
        mask = torch.ones(L, len(seqs), S, dtype=torch.bool, device=self.device)
        queries = self.window_queries(seqs) if scorer.needs_queries else None
        # gathered keys in the model's dtype (what FP8 reads back as for a scorer that does not read it)
        per_layer = len(seqs) * S * self.k_pool[0, 0, 0].numel() * self.dtype.itemsize
        fp8 = self.k_scale is not None
        keeps = []
        for start, stop, scaling in layer_batches(cfg, self.scaling, self.k_pool.shape[-1], per_layer):
            sl = slice(start, stop)
            keeps.append((sl, compress_layers(
                LayerPages(self.k_pool[sl], self.v_pool[sl], self.state_pool[sl] if self.state_pool is not None else None,
                           self.k_scale[sl] if fp8 else None, self.v_scale[sl] if fp8 else None, self.dtype),
                slots, mask[sl], queries[sl] if queries is not None else None, scorer, k=budget,
                window=cfg.kept_last, sinks=cfg.sinks, scaling=scaling, page_size=cfg.page_size, first=first,
                layer_idx=self.full_layers[start] if stop - start == 1 else -1, dst_slots=dst,
            )))
        self.kept.compressed(seqs, keeps, first)
