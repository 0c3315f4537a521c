"""Prefill and chunked prefill over a paged KV pool, tuned for speed (the second prefill kernel).

Same contract as ``paged_prefill_attention_triton`` in ``paged_attention.py`` (packed queries
``[T, Hq, D]``, sequence ``b`` owning rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``, which are its
last tokens; FP8 pages with per-token scales, ``window``, ``sinks``, ``softcap``, ``kv_starts``),
reworked where the first kernel loses time:

- GQA packing: one program serves ``P`` query heads of one KV head (``P`` the largest power of
  two dividing the group, capped by the tile), its rows are ``block_m / P`` queries x ``P`` heads:
  each key/value tile it reads serves ``P`` heads, so short query runs (chunks, single-query rows)
  still fill the tile, and the causal diagonal crosses ``P`` times fewer keys per row block.
- Mask-free tiles: the key loop is split into the tiles before the block's diagonal (and inside
  its window), which need no causal/window/range mask, and the few edge tiles that do.
- Longest-first order: query blocks are launched from the last (the most keys) to the first, so
  the cheap blocks fill the tail of the grid instead of the expensive ones.
- One page lookup per key tile when a tile lies within one page (``page_size % block_n == 0``).
- 8-bit pages (FP8, INT8) with 16-bit queries: the pages the step reads are first dequantized
  into a scratch pool in the queries' dtype (one pass, :func:`dequantize_pages`), and the kernel
  reads that as 16-bit pages. A prefill reads each key and value tile once per query block, so
  converting codes inside the kernel repeats each token's conversion and scaling for every block
  of queries after it (1.8x the 16-bit kernel's time on the H200); once per step it is a copy.
  Above :data:`DEQUANTIZE_LIMIT_BYTES` of scratch the kernel reads the codes itself.
- Launch parameters (rows, key tile, warps, stages, key/value tiles through tensor
  descriptors, ``tma``, and ``dequantize``) in a :class:`PrefillConfig`.

Head dims above 256 are not tiled here: they fall back to the first kernel, explicitly.

Tried and removed: fp16 dots for 8-bit pages (each e4m3 or int8 code exact in fp16 with one hardware
conversion where bf16 takes two; queries cast once with the softmax scale folded in; ``p * vs / max(vs)``
per tile into the value dot). On the H200 (FP8, 4 x 2,048-token prompts) it was 3-4% slower than these
bf16 dots (0.772 against 0.744 ms at 128 x 64 tiles, 0.758 against 0.736 at 64 x 64), and the engine's
long-prompt TTFT on FP8 pages did not move (9.74-9.79 s against 9.63 s): the conversion's instructions
are not what makes 8-bit pages' prefill slower than 16-bit ones (``benchmarks/results/issue15/s29/call2/``;
the variant is commit 554d229).

Tried and removed: lazy rescaling (mask-free tiles rescale the running sums only when some row's maximum grew
by over 2^8, the rest of the time they skip the accumulator's multiply). On the H100 it was 2-10% slower than
rescaling every tile (whole prompts of 512-4,096 tokens: 0.66 / 0.67 / 0.64 / 0.57x of gather + SDPA against
0.68 / 0.70 / 0.69 / 0.63x at 64 x 64 tiles): the block-wide maximum that decides the branch costs a
cross-warp reduction and a barrier on every tile, more than the multiply it saves
(``benchmarks/results/issue15/s44/call1/``; the variant is commit f799643).

Tried and removed: the mask-free key loop as ``tl.range(..., warp_specialize=True)`` (Triton's automatic warp
specialization). With Triton 3.6 on the H100 the 64 x 64 launch fails to compile (an assertion in the
warp-specialization pass) and the 128 x 128 one compiles to the same speed as without it (0.62-0.70x of gather +
SDPA on whole prompts, 1.56x on a cached prefix; ``benchmarks/results/issue15/s45/call1/``; the variant is commit
b4440f8). Whole prompts go to PyTorch's fused attention instead where it is faster (``fresh_prefill.py``).

Tried and dropped before timing: the next key tile's dot issued before this tile's softmax (its result carried to
the next iteration, so the tensor cores could run it beside the softmax). Compiled for sm_90 by
``benchmarks/prefill_compile.py`` (Triton 3.9), every warp-group MMA of both versions is followed by a
``wgmma.wait_group 0``: the compiler keeps no dot in flight across the softmax either way, so nothing could overlap,
and the 64 x 64 launch went from 183 to 230 registers (128 x 128: 144 bytes spilled).
"""

from __future__ import annotations

import dataclasses
import functools
import re

import torch

from ._triton import HAS_TRITON, dot_precision, interpreting, next_pow2
from .fp8 import dequantize_reference
from .paged_attention import LOG2E, _check_paged, _check_sinks, _scale_args, index_args, paged_prefill_attention_triton

HAS_TENSOR_DESCRIPTOR = False
if HAS_TRITON:
    import triton
    import triton.language as tl

    try:  # triton >= 3.4
        from triton.tools.tensor_descriptor import TensorDescriptor

        HAS_TENSOR_DESCRIPTOR = True
    except ImportError:  # pragma: no cover - older triton: the tma config falls back to pointer loads
        pass

MAX_HEAD_DIM = 256  # larger head dims go to the first kernel
# Most scratch (keys and values of the pages a prefill step reads, in 16 bits) that 8-bit pages are dequantized into
# for one layer; above it the kernel reads the codes (the engine leaves 512 MiB beside its pools for activations).
DEQUANTIZE_LIMIT_BYTES = 256 * 2**20


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
    """Launch choices of the second prefill kernel; ``block_m`` counts tile rows (queries x packed heads)."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3
    pack_gqa: bool = True  # rows = queries x query heads of one KV head
    split_mask: bool = True  # mask-free tiles below the diagonal
    longest_first: bool = True  # launch the query blocks with the most keys first
    tma: bool = False  # key/value tiles through tensor descriptors (where a tile lies in one page)
    dequantize: bool = True  # 8-bit pages, 16-bit queries: dequantize the step's pages first (see dequantizes)

    def validate(self) -> None:
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"PrefillConfig.{name}={v}: must be a power of two >= 16")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise ValueError(f"PrefillConfig: num_warps={self.num_warps} (1-16, a power of two), "
                             f"num_stages={self.num_stages} (>= 1)")


def parse_config(name: str) -> PrefillConfig:
    """A config from its name, ``m<block_m>n<block_n>w<warps>s<stages>`` and any of the suffixes
    ``-nopack``, ``-nosplit``, ``-inorder``, ``-tma``, ``-codes`` (what :func:`config_name` writes; ``-codes``:
    8-bit pages read as codes by the kernel, not dequantized first)."""
    m = re.fullmatch(r"m(\d+)n(\d+)w(\d+)s(\d+)((?:-nopack|-nosplit|-inorder|-tma|-codes)*)", name)
    if m is None:
        raise ValueError(f"prefill config {name!r}: expected m<block_m>n<block_n>w<warps>s<stages>[-nopack]"
                         "[-nosplit][-inorder][-tma][-codes], e.g. m128n64w8s3")
    flags = m.group(5)
    cfg = PrefillConfig(block_m=int(m.group(1)), block_n=int(m.group(2)), num_warps=int(m.group(3)),
                        num_stages=int(m.group(4)), pack_gqa="-nopack" not in flags,
                        split_mask="-nosplit" not in flags, longest_first="-inorder" not in flags,
                        tma="-tma" in flags, dequantize="-codes" not in flags)
    cfg.validate()
    return cfg


def config_name(cfg: PrefillConfig) -> str:
    return (f"m{cfg.block_m}n{cfg.block_n}w{cfg.num_warps}s{cfg.num_stages}" + ("" if cfg.pack_gqa else "-nopack")
            + ("" if cfg.split_mask else "-nosplit") + ("" if cfg.longest_first else "-inorder")
            + ("-tma" if cfg.tma else "") + ("" if cfg.dequantize else "-codes"))


@functools.lru_cache(maxsize=16)
def kernel_for(choice: str):
    """The prefill entry point ``ZIPAGE_PREFILL_KERNEL`` names: ``v2`` (default config) or ``v2:<config name>``."""
    if choice == "v2":
        return paged_prefill_attention_v2
    if choice.startswith("v2:"):
        return functools.partial(paged_prefill_attention_v2, config=parse_config(choice[3:]))
    raise ValueError(f"ZIPAGE_PREFILL_KERNEL={choice!r}: expected v1, v2 or v2:<config name> (e.g. v2:m128n64w8s3)")


def default_config(head_dim: int, on_gpu: bool, max_q_len: int = 0, fp8: bool = False) -> PrefillConfig:
    """The launch the engine uses, from the H200 sweep (``benchmarks/prefill_tune.py``,
    ``benchmarks/results/prefill/prefill_tune.json``, Qwen3-8B heads, 256-token pages): for head dims
    up to 128, 64 x 64 tiles with 4 warps up to 2,048 queries per sequence (prompts of 512-2,048 and
    2K chunks beside decode rows), 128 x 128 tiles with 8 warps above (4K prompts, prefix-cached
    4K); 8-bit pages (FP8, INT8) read as codes by the kernel keep 128 x 64 (dequantized first, they are 16-bit
    pages). Tensor-descriptor tiles where ``tma_applies`` allows them (Hopper or newer)."""
    return _default_config(head_dim, on_gpu, max_q_len > 2048, fp8)


@functools.lru_cache(maxsize=None)
def _default_config(head_dim: int, on_gpu: bool, long: bool, fp8: bool) -> PrefillConfig:
    """(cached: called for every layer of every prefill step; the returned config is shared, not to be mutated)"""
    if not on_gpu:
        return PrefillConfig(block_m=32, block_n=16, num_warps=4, num_stages=1)
    if head_dim > 128:
        return PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    if fp8:
        return PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3, tma=True)
    if long:
        return PrefillConfig(block_m=128, block_n=128, num_warps=8, num_stages=3, tma=True)
    return PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=3, tma=True)


def dequantizes(cfg: PrefillConfig, q: torch.Tensor, eight_bit: bool, page_table: torch.Tensor, page_size: int,
                kv_heads: int, head_dim: int) -> bool:
    """Whether a prefill dequantizes its 8-bit pages first: 16-bit queries (float32 ones keep exact dots over
    the codes), the config's ``dequantize``, and a scratch pool (keys and values of every page-table entry, in
    16 bits) within :data:`DEQUANTIZE_LIMIT_BYTES`. Decided from shapes alone (no device sync)."""
    if not (eight_bit and cfg.dequantize and q.dtype in (torch.float16, torch.bfloat16)):
        return False
    return page_table.numel() * page_size * kv_heads * head_dim * 2 * q.element_size() <= DEQUANTIZE_LIMIT_BYTES


def dequantize_pages(k_cache, v_cache, k_scale, v_scale, page_table, dtype):
    """The pages ``page_table`` names, dequantized (``code * scale``) into a scratch pool of ``dtype``: returns
    ``(keys, values, table)``, the pools ``[B * W, page_size, H_kv, D]`` with entry ``(b, w)`` of the table at
    page ``b * W + w`` and ``table`` the identity map ``[B, W]``. Every entry is copied, padding entries and
    slots past a sequence's length included (their bytes are never attended; an entry outside the pool, such
    as a -1 for padding, reads its nearest page instead of memory past the pool). One Triton launch on a GPU
    (or under the interpreter), PyTorch otherwise."""
    B, W = page_table.shape
    num_pages, page, Hkv, D = k_cache.shape
    ko = torch.empty(B * W, page, Hkv, D, dtype=dtype, device=k_cache.device)
    vo = torch.empty_like(ko)
    table = torch.arange(B * W, dtype=page_table.dtype, device=page_table.device).view(B, W)
    if B * W == 0:
        return ko, vo, table
    if HAS_TRITON and (k_cache.is_cuda or interpreting()):
        block_t = min(page, 64)
        _dequantize_pages_kernel[(B * W, Hkv, triton.cdiv(page, block_t))](
            k_cache, v_cache, k_scale, v_scale, page_table, ko, vo, W, num_pages,
            page_table.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
            k_scale.stride(0), k_scale.stride(1),
            ko.stride(0), ko.stride(1), ko.stride(2),
            PAGE=page, D=D, BLOCK_T=block_t, BLOCK_D=next_pow2(D), num_warps=4,
        )
    else:
        pages = page_table.reshape(-1).long().clamp(0, num_pages - 1)
        ko.copy_(dequantize_reference(k_cache[pages], k_scale[pages], dtype))
        vo.copy_(dequantize_reference(v_cache[pages], v_scale[pages], dtype))
    return ko, vo, table


def heads_per_program(group: int, block_m: int, pack: bool) -> int:
    """Query heads a program packs: the largest power of two dividing the GQA group, at most
    ``block_m / 16`` (so a tile keeps 16+ queries); 1 without packing."""
    if not pack:
        return 1
    p = group & -group  # largest power-of-two divisor
    return max(1, min(p, block_m // 16))


def tma_applies(k_cache: torch.Tensor, v_cache: torch.Tensor, block_n: int) -> bool:
    """Tensor-descriptor tiles need a tile inside one page, a power-of-two head dim (no padding
    columns) and pools that are one contiguous [slots, H_kv * D] matrix each; otherwise the
    ``tma`` config falls back to pointer loads."""
    page, D = k_cache.shape[1], k_cache.shape[-1]
    return (HAS_TENSOR_DESCRIPTOR and k_cache.is_cuda and _has_tma(k_cache.device) and page % block_n == 0
            and D == next_pow2(D) and D >= 16 and k_cache.is_contiguous() and v_cache.is_contiguous())


@functools.lru_cache(maxsize=None)
def _has_tma(device: torch.device) -> bool:
    """Tensor descriptors need the Hopper copy engine (compute capability 9.0 or newer)."""
    return torch.cuda.get_device_capability(device)[0] >= 9


# ----------------------------------------------------------------------------- the kernels
if HAS_TRITON:

    @triton.jit
    def _dequantize_pages_kernel(K, V, KS, VS, PT, KO, VO, W, NUM_PAGES,
                                 stride_ptb, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
                                 stride_vd, stride_sp, stride_st, stride_op, stride_ot, stride_oh,
                                 PAGE: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        """Tokens ``BLOCK_T`` of one page-table entry (program 0: ``b * W + w``), one KV head (program 1):
        ``code * scale`` of keys and values into page ``b * W + w`` of the scratch pools."""
        e = tl.program_id(0)
        h = tl.program_id(1)
        t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.arange(0, BLOCK_D)
        m = (t < PAGE)[:, None] & (d < D)[None, :]
        page = tl.load(PT + (e // W) * stride_ptb + e % W).to(tl.int64)
        page = tl.minimum(tl.maximum(page, 0), NUM_PAGES - 1)  # (padding entries: never attended)
        ks = tl.load(KS + page * stride_sp + t * stride_st + h, mask=t < PAGE, other=0.0)
        vs = tl.load(VS + page * stride_sp + t * stride_st + h, mask=t < PAGE, other=0.0)
        k = tl.load(K + page * stride_kp + (t * stride_kt + h * stride_kh)[:, None] + d[None, :], mask=m, other=0.0)
        v = tl.load(V + page * stride_vp + (t * stride_vt + h * stride_vh)[:, None] + d[None, :] * stride_vd,
                    mask=m, other=0.0)
        o = e.to(tl.int64) * stride_op + (t * stride_ot + h * stride_oh)[:, None] + d[None, :]
        tl.store(KO + o, (k.to(tl.float32) * ks[:, None]).to(KO.dtype.element_ty), mask=m)
        tl.store(VO + o, (v.to(tl.float32) * vs[:, None]).to(VO.dtype.element_ty), mask=m)

    @triton.jit
    def _kv_tile(K, V, KS, VS, KD, VD, PT, b, hk, t0, offs_n, d, dmask, k_off, v_off, start, hi,
                 stride_ptb, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh, stride_vd, stride_sp,
                 stride_st,
                 PAGE: tl.constexpr, D: tl.constexpr, TILE_IN_PAGE: tl.constexpr, FP8: tl.constexpr,
                 MASKED: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr):
        """Keys, values (and FP8 scales) of tokens ``t0 + offs_n`` of sequence ``b``, KV head ``hk``.
        Unmasked tiles lie wholly in ``[start, hi)``: no mask on the loads when the head dim is a
        power of two. Masked tiles read zeros outside it (keys there may be anything: their logits
        are masked)."""
        t = t0 + offs_n
        if TMA:  # the tile is rows page * PAGE + slot.. of the pool seen as [slots, H_kv * D]
            page = tl.load(PT + b * stride_ptb + t0 // PAGE).to(tl.int32)  # (descriptor coordinates are 32-bit)
            row = page * PAGE + t0 % PAGE
            k = KD.load([row, hk * D])
            v = VD.load([row, hk * D])
            so = page.to(tl.int64) * stride_sp + ((t0 % PAGE) + offs_n) * stride_st
            if MASKED:  # rows outside the range hold other slots' bytes: zero the values (FP8: as bytes)
                ok = (t < hi) & (t >= start)
                if FP8:
                    vb = v.to(tl.uint8, bitcast=True)
                    v = tl.where(ok[:, None], vb, tl.zeros_like(vb)).to(v.dtype, bitcast=True)
                else:
                    v = tl.where(ok[:, None], v, tl.zeros_like(v))
        else:  # pointer loads
            if TILE_IN_PAGE:  # the whole tile in one page: one page-table read, a scalar base + fixed offsets
                page = tl.load(PT + b * stride_ptb + t0 // PAGE).to(tl.int64)
                slot0 = t0 % PAGE
                kp = K + (page * stride_kp + slot0 * stride_kt + hk * stride_kh) + k_off
                vp = V + (page * stride_vp + slot0 * stride_vt + hk * stride_vh) + v_off
                so = page * stride_sp + (slot0 + offs_n) * stride_st
            else:
                page = tl.load(PT + b * stride_ptb + t // PAGE, mask=t < hi, other=0).to(tl.int64)
                slot = t % PAGE
                kp = K + (page * stride_kp + slot * stride_kt)[:, None] + hk * stride_kh + d[None, :]
                vp = V + (page * stride_vp + slot * stride_vt)[:, None] + hk * stride_vh + d[None, :] * stride_vd
                so = page * stride_sp + slot * stride_st
            if MASKED:
                ok = (t < hi) & (t >= start)
                k = tl.load(kp, mask=ok[:, None] & dmask[None, :], other=0.0)
                v = tl.load(vp, mask=ok[:, None] & dmask[None, :], other=0.0)
            else:
                if EVEN_D:
                    k = tl.load(kp)
                    v = tl.load(vp)
                else:
                    k = tl.load(kp, mask=dmask[None, :], other=0.0)
                    v = tl.load(vp, mask=dmask[None, :], other=0.0)
        # the scales (FP8) or their stand-ins, in one place for both kinds of load
        if FP8:
            if MASKED:
                ok = (t < hi) & (t >= start)
                ks = tl.load(KS + so + hk, mask=ok, other=0.0)
                vs = tl.load(VS + so + hk, mask=ok, other=0.0)
            else:
                ks = tl.load(KS + so + hk)
                vs = tl.load(VS + so + hk)
        else:
            ks = t.to(tl.float32)
            vs = ks
        return k, v, ks, vs

    @triton.jit
    def _attend_tile(q, k, v, ks, vs, m_i, l_i, acc, t, qpos, start, hi, scale_log2, PRECISION: tl.constexpr,
                     FP8: tl.constexpr, MASKED: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP_LOG2: tl.constexpr):
        """One key tile of flash attention (log2 domain). Unmasked tiles skip the mask and the
        empty-row guard (every row sees a finite logit there). Plain logits keep the scale out of
        the row max (a max of raw logits times the scale) so that each element costs one fused
        multiply-add before its exp2."""
        qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION)
        if MASKED:
            allowed = ((t < hi) & (t >= start))[None, :] & (t[None, :] <= qpos[:, None])
            if WINDOW > 0:
                allowed = allowed & (t[None, :] > qpos[:, None] - WINDOW)
        if FP8 or SOFTCAP_LOG2 > 0:  # per-column scales / a nonlinear cap: scale every logit first
            if FP8:
                s = qk * (ks * scale_log2)[None, :]
            else:
                s = qk * scale_log2
            if SOFTCAP_LOG2 > 0:  # softcap * tanh(x / softcap), in the log2 domain (tanh through exp)
                s = SOFTCAP_LOG2 * (1.0 - 2.0 / (tl.math.exp(2.0 * s / SOFTCAP_LOG2) + 1.0))
            if MASKED:
                s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
            if MASKED:  # a row with nothing allowed yet keeps -inf: exp2 of -inf - 0, not of nan
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_use[:, None])
        else:
            if MASKED:
                qk = tl.where(allowed, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)  # (the scale is positive)
            m_use = m_new
            if MASKED:
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk * scale_log2 - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if FP8:  # p * vs over the tile's largest value scale: in [0, 1], never below fp16's normal range
            vs_max = tl.maximum(tl.max(vs, 0), 1e-30)
            acc += tl.dot((p * (vs / vs_max)[None, :]).to(q.dtype), v.to(q.dtype), input_precision=PRECISION) * vs_max
        else:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        return m_new, l_i, acc

    @triton.jit
    def _prefill_v2_kernel(
        Q, K, V, KS, VS, KD, VD, PT, CU_Q, LENS, STARTS, OUT, SINKS,
        scale_log2,
        stride_qt, stride_qh,
        stride_kp, stride_kt, stride_kh,
        stride_vp, stride_vt, stride_vh, stride_vd,
        stride_sp, stride_st,
        stride_ptb,
        stride_ot, stride_oh,
        G: tl.constexpr, P: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
        FP8: tl.constexpr, TILE_IN_PAGE: tl.constexpr, SPLIT_MASK: tl.constexpr, LONGEST_FIRST: tl.constexpr,
        TMA: tl.constexpr,
        WINDOW: tl.constexpr = 0, HAS_SINKS: tl.constexpr = False, SOFTCAP_LOG2: tl.constexpr = 0.0,
    ):
        # rows are (query, head) pairs, query-major: BLOCK_Q = BLOCK_M / P queries x P heads
        hg = tl.program_id(0)  # group of P query heads (one KV head)
        b = tl.program_id(1)
        if LONGEST_FIRST:
            mblk = tl.num_programs(2) - 1 - tl.program_id(2)
        else:
            mblk = tl.program_id(2)
        q0 = tl.load(CU_Q + b).to(tl.int32)
        nq = tl.load(CU_Q + b + 1).to(tl.int32) - q0
        if mblk * BLOCK_Q >= nq:
            return
        seq_len = tl.load(LENS + b).to(tl.int32)
        start = tl.load(STARTS + b).to(tl.int32)
        hk = (hg * P) // G

        r = tl.arange(0, BLOCK_M)
        i = mblk * BLOCK_Q + r // P  # query index in the sequence
        h = hg * P + r % P  # query head
        imask = i < nq
        qpos = seq_len - nq + i
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        row_q = (q0 + i).to(tl.int64) * stride_qt + h * stride_qh
        q = tl.load(Q + row_q[:, None] + d[None, :], mask=imask[:, None] & dmask[None, :], other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        offs_n = tl.arange(0, BLOCK_N)
        k_off = offs_n[:, None] * stride_kt + d[None, :]  # a tile's offsets from its first token (in one page)
        v_off = offs_n[:, None] * stride_vt + d[None, :] * stride_vd

        p_lo = seq_len - nq + mblk * BLOCK_Q  # the block's first and last query positions
        p_hi = seq_len - nq + tl.minimum(mblk * BLOCK_Q + BLOCK_Q, nq) - 1
        hi = p_hi + 1
        first = start  # first key any row needs, and first key every row needs
        every = start
        if WINDOW > 0:
            first = tl.maximum(start, p_lo - WINDOW + 1)
            every = tl.maximum(start, p_hi - WINDOW + 1)
        lo = (first // BLOCK_N) * BLOCK_N
        if SPLIT_MASK:
            full_lo = tl.cdiv(every, BLOCK_N) * BLOCK_N
            full_hi = tl.maximum(((p_lo + 1) // BLOCK_N) * BLOCK_N, full_lo)
            edge_hi = tl.minimum(full_lo, hi)
        else:
            full_lo = hi
            full_hi = hi
            edge_hi = hi
        for t0 in range(lo, edge_hi, BLOCK_N):  # edge tiles in front (range start, window)
            k, v, ks, vs = _kv_tile(K, V, KS, VS, KD, VD, PT, b, hk, t0, offs_n, d, dmask, k_off, v_off, first,
                                    hi, stride_ptb, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt,
                                    stride_vh, stride_vd, stride_sp, stride_st, PAGE, D, TILE_IN_PAGE, FP8, True,
                                    BLOCK_D == D, TMA)
            m_i, l_i, acc = _attend_tile(q, k, v, ks, vs, m_i, l_i, acc, t0 + offs_n, qpos, first, hi, scale_log2,
                                         PRECISION, FP8, True, WINDOW, SOFTCAP_LOG2)
        for t0 in range(full_lo, full_hi, BLOCK_N):  # tiles every row sees whole: no mask
            k, v, ks, vs = _kv_tile(K, V, KS, VS, KD, VD, PT, b, hk, t0, offs_n, d, dmask, k_off, v_off, first,
                                    hi, stride_ptb, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt,
                                    stride_vh, stride_vd, stride_sp, stride_st, PAGE, D, TILE_IN_PAGE, FP8, False,
                                    BLOCK_D == D, TMA)
            m_i, l_i, acc = _attend_tile(q, k, v, ks, vs, m_i, l_i, acc, t0 + offs_n, qpos, first, hi, scale_log2,
                                         PRECISION, FP8, False, WINDOW, SOFTCAP_LOG2)
        for t0 in range(full_hi, hi, BLOCK_N):  # the diagonal
            k, v, ks, vs = _kv_tile(K, V, KS, VS, KD, VD, PT, b, hk, t0, offs_n, d, dmask, k_off, v_off, first,
                                    hi, stride_ptb, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt,
                                    stride_vh, stride_vd, stride_sp, stride_st, PAGE, D, TILE_IN_PAGE, FP8, True,
                                    BLOCK_D == D, TMA)
            m_i, l_i, acc = _attend_tile(q, k, v, ks, vs, m_i, l_i, acc, t0 + offs_n, qpos, first, hi, scale_log2,
                                         PRECISION, FP8, True, WINDOW, SOFTCAP_LOG2)

        if HAS_SINKS:  # each row's head sink logit joins the denominator (log2 domain)
            sink = tl.load(SINKS + h).to(tl.float32) * 1.4426950408889634
            m_safe = tl.where(m_i == float("-inf"), sink, tl.maximum(m_i, sink))
            l_i = l_i * tl.math.exp2(m_i - m_safe) + tl.math.exp2(sink - m_safe)
            acc = acc * tl.math.exp2(m_i - m_safe)[:, None]
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        row_o = (q0 + i).to(tl.int64) * stride_ot + h * stride_oh
        tl.store(OUT + row_o[:, None] + d[None, :], out.to(OUT.dtype.element_ty),
                 mask=imask[:, None] & dmask[None, :])


# ----------------------------------------------------------------------------- the wrapper
def paged_prefill_attention_v2(q, k_cache, v_cache, page_table, cu_seqlens_q, kv_lens, scale, kv_starts=None,
                               max_q_len: int | None = None, block_m: int | None = None, block_n: int | None = None,
                               k_scale=None, v_scale=None, *, window: int | None = None,
                               sinks: torch.Tensor | None = None, softcap: float | None = None,
                               config: PrefillConfig | None = None):
    """Packed variable-length queries against paged KV, as ``paged_prefill_attention_triton``;
    ``config`` picks the launch (``block_m`` / ``block_n``, when given, override its tiles)."""
    _check_paged(q, k_cache, v_cache, page_table)
    _check_sinks(sinks, q.shape[1])
    page_table, cu_seqlens_q, kv_lens, kv_starts, sinks = index_args(page_table, cu_seqlens_q, kv_lens, kv_starts,
                                                                     sinks)
    from .paged_attention import check_prefill_args  # (the checks the first kernel's wrapper makes too)
    check_prefill_args(q, k_cache, page_table, cu_seqlens_q, kv_lens, kv_starts, max_q_len, window=window,
                       softcap=softcap)
    T, Hq, D = q.shape
    if D > MAX_HEAD_DIM:  # explicit fallback: the first kernel tiles any head dim
        return paged_prefill_attention_triton(q, k_cache, v_cache, page_table, cu_seqlens_q, kv_lens, scale,
                                              kv_starts, max_q_len, block_m, block_n or 64, k_scale, v_scale,
                                              window=window, sinks=sinks, softcap=softcap)
    ks, vs, stride_sp, stride_st, fp8 = _scale_args(k_cache, v_cache, k_scale, v_scale)
    B = kv_lens.shape[0]
    if cu_seqlens_q.shape[0] != B + 1:
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.shape[0]} entries for {B} sequences (expected {B + 1})")
    if max_q_len is None:
        max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if B else 0
    if not scale > 0:
        raise ValueError(f"scale={scale}: the softmax scale must be positive")
    if window is not None and window < 1:
        raise ValueError(f"window={window}: must be >= 1 (or None for no window)")
    cfg = config or default_config(D, q.is_cuda, max_q_len)
    cfg.validate()  # (a bad config is named before any scratch is allocated)
    if fp8 and dequantizes(cfg, q, fp8, page_table, k_cache.shape[1], k_cache.shape[2], D):
        # 8-bit pages: the step's pages dequantized once, then read as 16-bit pages
        k_cache, v_cache, page_table = dequantize_pages(k_cache, v_cache, ks, vs, page_table, q.dtype)
        ks, vs, stride_sp, stride_st, fp8 = k_cache, k_cache, 0, 0, False
    elif fp8 and config is None:
        cfg = default_config(D, q.is_cuda, max_q_len, fp8=True)
    if block_m is not None or block_n is not None:
        cfg = dataclasses.replace(cfg, block_m=block_m or cfg.block_m, block_n=block_n or cfg.block_n)
        cfg.validate()
    Hkv, page = k_cache.shape[2], k_cache.shape[1]
    G = Hq // Hkv
    P = heads_per_program(G, cfg.block_m, cfg.pack_gqa)
    if kv_starts is None:
        kv_starts = torch.zeros(B, dtype=torch.int32, device=q.device)
    out = torch.empty_like(q)
    if B == 0 or T == 0 or max_q_len == 0:
        return out
    block_q = cfg.block_m // P
    tile_in_page = page % cfg.block_n == 0
    kd = vd = k_cache
    if cfg.tma and tma_applies(k_cache, v_cache, cfg.block_n):
        kd, vd = (TensorDescriptor.from_tensor(c.view(-1, Hkv * D), [cfg.block_n, D]) for c in (k_cache, v_cache))
    _prefill_v2_kernel[(Hq // P, B, triton.cdiv(max_q_len, block_q))](
        q, k_cache, v_cache, ks, vs, kd, vd, page_table, cu_seqlens_q, kv_lens, kv_starts, out,
        sinks if sinks is not None else q, scale * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        stride_sp, stride_st,
        page_table.stride(0),
        out.stride(0), out.stride(1),
        G=G, P=P, D=D, BLOCK_D=max(16, next_pow2(D)), PAGE=page, BLOCK_M=cfg.block_m, BLOCK_Q=block_q,
        BLOCK_N=cfg.block_n,
        PRECISION=dot_precision(q.dtype), FP8=fp8, TILE_IN_PAGE=tile_in_page,
        SPLIT_MASK=cfg.split_mask, LONGEST_FIRST=cfg.longest_first, TMA=kd is not k_cache, WINDOW=int(window or 0),
        HAS_SINKS=sinks is not None, SOFTCAP_LOG2=float(softcap or 0.0) * LOG2E,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages if q.is_cuda else 1,
    )
    return out
