"""FP8 KV pages: e4m3 codes with one float32 scale per token and KV head.

A pool of keys (or values) in FP8 is a pair: the codes, ``[num_pages, page_size, H, D]`` in
``torch.float8_e4m3fn``, and their scales, ``[num_pages, page_size, H]`` float32, on the same
pages and slots, so whatever moves a token (compaction, prefix sharing) moves its scale with it.
A stored vector ``x`` (one token, one head) becomes ``codes ~= round(x / s)`` and reads back as
``codes * s``. The scale is searched: of ``s = max|x| / 448 * 2 ** (i / 16)``, ``i = 0..15`` (448 is
e4m3's largest finite value, so none clips), the one whose codes read back closest to ``x`` (least
squared error; :func:`quantize_reference`). e4m3 keeps 4 significant bits of each element wherever it
sits, so which elements land near a code, the largest ones above all, depends on the scale; picking
it cuts the squared rounding error of Gaussian rows by a fifth to a quarter, and what FP8 pages cost in
next-token KL by 21-44% on SmolLM2 and 5-10% on Gemma 3 (``benchmarks/results/fp8/``). It costs the
store 16 trial roundings of each row, an IEEE division an element for the first candidate and products for the
rest (candidate ``i``'s codes are the first's times ``2 ** (-i / 16)``), and nothing where pages are read: on an
H200 at 490 requests about 8 us a layer over a store without the search (``benchmarks/store_bench.py``), 0.3 ms of
the engine's 25 ms FP8 decode step at a context of 1,081 tokens (a division an element for every candidate, as the
search first took, cost 18 us with the store's earlier launch, where products cost 10;
``benchmarks/results/issue15/s40/``, ``s41/``). ``ZIPAGE_FP8_SCALE_STEPS=1``
gives the plain ``max|x| / 448`` (for comparisons). Keys are compared by what their rounding does to the
logits of the queries that read them rather than by the squared error (:func:`query_weights`, from the
queries' moments that ``zipage.query_moments`` counts; ``ZIPAGE_FP8_QUERY_WEIGHTS=0``: the squared error). Quantizing read-back values again is no longer an
identity (their best scale is another one): whatever moves stored tokens moves codes and scales as they
are, never through values.

Why per token and head, in float32: a token's scale is known when it is stored (no page-wide
maximum to revisit when later tokens arrive, nothing to requantize when compaction mixes tokens
of different pages), outlier tokens do not flatten their neighbours, and a float32 scale is exact
(a bf16 scale would round, and a rounded-down scale pushes ``max|x|`` past 448). It costs 4 bytes
per 128-byte row at head dim 128 (3%).

INT8 pages (``kv_cache_dtype="int8"``) are the same pair with int8 codes: ``s = max|x| / 127`` and
``codes = round(x / s)`` (half away from zero), the same bytes as e4m3. Uniform codes keep about
7 significant bits of every element against e4m3's 4, which is what attention logits need: rounding
the keys of SmolLM2-135M through e4m3 costs about 2.8 points of next-token agreement with bf16, through
int8 about 0.6 (``benchmarks/fp8_key_rounding.py``, ``benchmarks/results/fp8/``). Everything that
reads FP8 pages reads INT8 pages the same way (codes upcast exactly, times their scales).

INT8 pages store keys and values in a rotated basis: ``x H`` with ``H`` the orthonormal
Hadamard matrix of the head dim (a power of two; other head dims are stored as they are). The
queries are rotated the same way before attention and the attention output rotated back
(``H`` is its own inverse), so every logit, norm and cosine a kernel or scorer computes is
unchanged, and only the rounding differs: an outlier channel's size is spread over all channels
before the token's scale is taken, so the other channels keep their precision. On Gemma 3 270M
(keys from a per-head RMSNorm, with large constant channels) int8 keys and values agree with
unrounded attention on 97.80% of next tokens rotated against 93.02% not; on SmolLM2 99.61%
against 98.97% (``benchmarks/fp8_key_rounding.py``). e4m3 codes keep a relative precision per
element, which a rotation does not improve (90.48% against 92.58% on Gemma 3), so FP8 pages are
not rotated by default. ``kv_rotation`` (``ZipageConfig``, ``LLM``, ``zipage serve --kv-rotation``) sets it
per engine or cache: True rotates FP8 pages too (on SmolLM2, with the query-weighted search and a 128-token
exact tail, full KV in rotated FP8 pages loses 0.25 points of top-1 against bf16 pages where unrotated ones
lose 0.51; on Gemma 3 a rotation makes e4m3 rounding worse), False stores INT8 pages unrotated. Left at
None, ``ZIPAGE_INT8_ROTATION=0`` and ``ZIPAGE_FP8_ROTATION=1`` change the defaults (for comparisons).
"""

from __future__ import annotations

import functools
import os

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8 = torch.int8
INT8_MAX = 127.0
CODE_MAX = {FP8: FP8_MAX, INT8: INT8_MAX}  # the largest code of each quantized page type
QUANTIZED_KV = {"fp8": FP8, "int8": INT8}  # kv_cache_dtype names of the quantized page types
SCALE_DTYPE = torch.float32
MIN_SCALE = 1e-12  # an all-zero row gets this scale (its codes are 0 either way)


def kv_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The pools' dtype for a ``kv_cache_dtype`` name (``"auto"``: the model's; ``"fp8"``: e4m3;
    ``"int8"``: int8 codes)."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype in QUANTIZED_KV:
        return QUANTIZED_KV[kv_cache_dtype]
    raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is invalid: expected 'auto', 'fp8' or 'int8'")


def is_quantized(t: torch.Tensor) -> bool:
    """True for quantized KV codes, FP8 (``torch.float8_e4m3fn``) or INT8 (``torch.int8``): pools
    that come with per-token scales."""
    return t.dtype in CODE_MAX


def value_pool(shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """A zeroed value pool of logical shape ``[..., num_pages, page_size, H, D]`` stored dimension-major:
    each page holds ``[H, D, page_size]`` (a head's column of one dimension is contiguous along the page).
    8-bit decode tiles then reach the value dot's operand layout without a transpose through shared
    memory (``kernels/paged_decode_fp8.py``). The tensor returned is a view with the logical shape, so
    indexing code needs no change; kernels read its strides, and flattening the page and slot dims into
    one slot dim is not a view (``.view`` refuses it; ``kernels/paged_kv.py`` indexes pages and slots apart).
    Zeroed, and zipage's stores never write a NaN code into it (:func:`quantize_reference`), so the decode kernel
    converts a tile's stale rows as any other (``paged_decode_fp8.default_v_edge``)."""
    *lead, pages, page, heads, dim = shape
    n = len(lead)
    storage = torch.zeros(*lead, pages, heads, dim, page, dtype=dtype, device=device)
    return storage.permute(*range(n), n, n + 3, n + 1, n + 2)


def dim_major(pool: torch.Tensor) -> bool:
    """True for a pool ``[..., num_pages, page_size, H, D]`` laid out as :func:`value_pool` makes it
    (each page ``[H, D, page_size]``, contiguous)."""
    if pool.dim() < 4:
        return False
    page, heads, dim = pool.shape[-3:]
    return (pool.stride(-3) == 1 and pool.stride(-1) == page and pool.stride(-2) == dim * page
            and pool.stride(-4) == heads * dim * page)


def scale_steps() -> int:
    """How many scales an FP8 row's quantization tries (:func:`quantize_reference`): ``SCALE_STEPS``,
    or ``ZIPAGE_FP8_SCALE_STEPS`` (1 to 64; 1 gives the plain ``max|x| / 448`` scale, for comparisons)."""
    return _parse_steps(os.environ.get("ZIPAGE_FP8_SCALE_STEPS", ""))  # (every store reads it: parsed once)


@functools.lru_cache(maxsize=None)
def _parse_steps(raw: str) -> int:
    value = raw.strip()
    if not value:
        return SCALE_STEPS
    if not value.isdigit() or not 1 <= int(value) <= 64:
        raise ValueError(f"ZIPAGE_FP8_SCALE_STEPS={value!r}: expected a whole number of scales to try, 1 to 64")
    return int(value)


@functools.lru_cache(maxsize=None)
def scale_steps_table(steps: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The FP8 scale search's candidates: float32 multipliers ``m_i = 2 ** (i / steps)`` of ``max|x| / 448``,
    int64 weights ``round(m_i ** 2 * 2 ** WEIGHT_BITS)`` (a candidate's squared error is measured in
    its own code units, so it is weighted by its scale squared) and float32 factors ``2 ** (-i / steps)``
    that take the first candidate's codes to candidate ``i``'s (a product in place of a division)."""
    mult = torch.tensor([2.0 ** (i / steps) for i in range(steps)], dtype=torch.float32)
    weight = torch.round(mult.double() ** 2 * 2.0 ** WEIGHT_BITS).to(torch.int64)
    recip = torch.tensor([2.0 ** (-i / steps) for i in range(steps)], dtype=torch.float32)
    return mult.to(device), weight.to(device), recip.to(device)


SCALE_STEPS = 16  # scales an FP8 row's quantization tries (see quantize_reference)
ERROR_BITS = 14  # a code's rounding error is counted in units of 2 ** -ERROR_BITS codes
WEIGHT_BITS = 14  # a candidate's weight (its multiplier squared) in units of 2 ** -WEIGHT_BITS


def quantize_reference(x: torch.Tensor, dtype: torch.dtype = FP8,
                       weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[..., D]`` -> (codes ``[..., D]`` of ``dtype`` (e4m3 or int8), scales ``[...]`` float32),
    one scale per row.

    INT8: ``s = max|x| / 127``. FP8: the scale is searched. e4m3 keeps about 4 significant bits of
    every element, and which elements land near a code depends on the scale, so each row tries
    ``steps`` scales ``max|x| / 448 * 2 ** (i / steps)`` (none clips) and keeps the one whose codes
    read back closest to the row in squared error, the smallest ``i`` among equals. On SmolLM2's keys
    and values this cuts the next-token KL that e4m3 pages cost by 21-44%, on Gemma 3's by 5-10%
    (``benchmarks/fp8_key_rounding.py``). Candidate ``i``'s unrounded codes are ``(x / base) * 2 ** (-i / steps)``
    (an IEEE division an element for the first candidate, products for the rest, as the store kernel takes them).
    The error is summed exactly in integers (every code's error, its rounded code minus its unrounded one, is
    exact in float32, then counted in ``2 ** -ERROR_BITS`` code units), so the store kernel and this reference
    pick the same scale whatever order they add in.

    ``weights`` (FP8 keys, :func:`query_weights`): int64 ``[2, H, D]`` for rows ``[..., H, D]`` (the head
    dim second to last): a row's candidates are then compared by what their rounding does to attention
    logits, ``(u . e)^2 + sum(v e^2)`` per head (the queries' mean and variances), in place of ``|e|^2``,
    counted in ``2 ** -WEIGHTED_ERROR_BITS`` code units and with the candidates' weights in
    ``2 ** -WEIGHTED_WEIGHT_BITS`` (so that it fits int64)."""
    if dtype not in CODE_MAX:
        raise ValueError(f"quantize_reference: codes are {FP8} or {INT8}, not {dtype}")
    if weights is not None:
        check_weights("quantize_reference", weights, x.shape[-2:])
    xf = x.float()
    top = CODE_MAX[dtype]
    amax = xf.abs().amax(dim=-1)
    # (divided by a tensor: CUDA divides by a Python number as a product with its reciprocal, which may land one
    # ulp from the IEEE quotient the store kernel takes, and so tip the scale search to another candidate)
    scale = (amax / torch.full_like(amax, top)).clamp(min=MIN_SCALE)
    steps = scale_steps() if dtype == FP8 else 1
    if steps == 1:
        c = (xf / scale[..., None]).clamp(-top, top)
        if dtype == INT8:  # to the nearest integer, halves away from zero (what the store kernel does)
            c = torch.where(c < 0, -torch.floor(0.5 - c), torch.floor(c + 0.5))
        return _mark_bad_rows(xf, c.to(dtype), scale)
    mult, weight, recip = scale_steps_table(steps, xf.device)
    rows, scales = xf.reshape(-1, xf.shape[-1]), scale.reshape(-1)
    chunk = max(1, SEARCH_CHUNK_ELEMENTS // (steps * max(1, rows.shape[-1])))  # rows tried at once
    codes, chosen = torch.empty(rows.shape, dtype=FP8, device=xf.device), torch.empty_like(scales)
    heads = None if weights is None else torch.arange(rows.shape[0], device=xf.device) % weights.shape[1]
    weights = None if weights is None else weights.to(xf.device)
    for a in range(0, rows.shape[0], chunk):
        w = None if heads is None else weights[:, heads[a:a + chunk]]  # [2, rows, D]
        codes[a:a + chunk], chosen[a:a + chunk] = _search(rows[a:a + chunk], scales[a:a + chunk], mult, weight, recip, w)
    return _mark_bad_rows(xf, codes.view(xf.shape), chosen.view(scale.shape))


def _mark_bad_rows(xf: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A row with a NaN or an infinity: zero codes under a NaN scale, as the store kernel writes it. It reads back
    as NaN, and no NaN code ever reaches a pool, so a kernel may convert a stale slot's codes without checking them
    (``paged_decode_fp8``'s ``v_edge="plain"``)."""
    bad = ~torch.isfinite(xf).all(dim=-1)  # (no branch on it: no host sync on a GPU)
    bits = codes.view(torch.uint8 if codes.dtype == FP8 else codes.dtype)  # (FP8 tensors take no masked_fill)
    return bits.masked_fill(bad[..., None], 0).view(codes.dtype), scales.masked_fill(bad, float("nan"))


# Query-weighted search (keys): a code's error in units of 2 ** -WEIGHTED_ERROR_BITS codes (at most 16 codes,
# half of e4m3's widest step, so at most 2 ** 10 units), u within +-U_MAX, v within 0..V_MAX and a candidate's
# weight in 2 ** -WEIGHTED_WEIGHT_BITS: over up to MAX_WEIGHTED_DIM elements the error stays below 2 ** 63, and
# each element's terms u e and v e^2 (and u . e) below 2 ** 31.
WEIGHTED_ERROR_BITS = 6
WEIGHTED_WEIGHT_BITS = 10
U_MAX = 127
V_MAX = 1023
MAX_WEIGHTED_DIM = 256


def query_weights(q_sum: torch.Tensor, q_sq_sum: torch.Tensor, count: torch.Tensor | float) -> torch.Tensor:
    """Integer weights for the query-weighted scale search of keys, from the moments of the queries that
    read them: ``q_sum`` and ``q_sq_sum`` ``[..., H, D]`` (sums of the queries of each KV head's group, and
    of their squares, over ``count`` queries) -> int64 ``[..., 2, H, D]``: ``u`` (the mean query) and ``v`` (each
    channel's variance), scaled per head by one factor (which changes no choice) that brings ``max|u|`` to
    ``U_MAX`` or ``max v`` to ``V_MAX``, whichever it reaches first. A key's rounding error ``e`` shifts a
    query ``q``'s logit by ``q . e``, whose mean square over the queries is ``(m . e)^2 + e^T S e`` (``m`` their
    mean, ``S`` their covariance); the search takes ``S`` diagonal: ``(u . e)^2 + sum(v e^2)``. Before any
    query (``count`` 0), or where the moments are not finite: ``u = 0``, ``v = 1``, the squared error."""
    n = torch.as_tensor(count, dtype=torch.float64, device=q_sum.device).clamp(min=1.0)
    mean = q_sum.double() / n
    var = (q_sq_sum.double() / n - mean * mean).clamp(min=0.0)
    top_u = mean.abs().amax(dim=-1, keepdim=True) ** 2
    top_v = var.amax(dim=-1, keepdim=True)
    z = torch.minimum(U_MAX ** 2 / top_u.clamp(min=1e-300), V_MAX / top_v.clamp(min=1e-300))
    u = torch.round(mean * z.sqrt()).clamp(-U_MAX, U_MAX)
    v = torch.round(var * z).clamp(0, V_MAX)
    empty = ~((top_u + top_v) > 0) | ~torch.isfinite(top_u + top_v)  # no query yet (or all zero), or inf / NaN
    u = torch.where(empty, 0.0, u)
    v = torch.where(empty, 1.0, v)
    return torch.stack([u, v], dim=-3).to(torch.int64)


def query_weights_mode() -> str:
    """``ZIPAGE_FP8_QUERY_WEIGHTS``: ``"calibrated"`` (the default: FP8 keys' scale search weighted by the moments
    of a fixed text's queries, which the engine counts once at its start and freezes; ``generate()`` counts its
    call's own prompts: zipage/query_moments.py), ``"1"`` (the moments of the prompt queries seen so far, in the
    engine too) or ``"0"`` (the plain squared error)."""
    value = os.environ.get("ZIPAGE_FP8_QUERY_WEIGHTS", "calibrated").strip()
    if value not in ("0", "1", "calibrated"):
        raise ValueError(f"ZIPAGE_FP8_QUERY_WEIGHTS={value!r}: expected 1 (weight FP8 keys' scale search by the "
                         "queries), calibrated (by the queries of a fixed text, counted once at the engine's start) "
                         "or 0 (the plain squared error)")
    return value


def query_weighting(kv_cache_dtype: str, head_dim: int) -> bool:
    """Whether pages of this type search their keys' scales by the queries' moments: FP8 pages whose scale is
    searched (``ZIPAGE_FP8_SCALE_STEPS`` not 1) with a head dim up to ``MAX_WEIGHTED_DIM``, unless
    ``ZIPAGE_FP8_QUERY_WEIGHTS=0`` (the plain squared error, for comparisons)."""
    return query_weights_mode() != "0" and kv_cache_dtype == "fp8" and scale_steps() > 1 \
        and head_dim <= MAX_WEIGHTED_DIM


def check_weights(name: str, weights: torch.Tensor, shape, device=None) -> None:
    """Query weights (:func:`query_weights`) for rows of ``shape`` ``(H, D)``: int64 ``[2, H, D]``, D at most
    ``MAX_WEIGHTED_DIM``, on ``device`` if given."""
    H, D = shape
    if weights.dtype != torch.int64 or tuple(weights.shape) != (2, H, D):
        raise ValueError(f"{name}: query weights must be int64 of shape (2, {H}, {D}), got {weights.dtype} "
                         f"{tuple(weights.shape)}")
    if D > MAX_WEIGHTED_DIM:
        raise ValueError(f"{name}: query weights take head dims up to {MAX_WEIGHTED_DIM}, not {D}")
    if device is not None and weights.device != torch.device(device):
        raise ValueError(f"{name}: query weights are on {weights.device}, the keys on {device}")


SEARCH_CHUNK_ELEMENTS = 1 << 22  # the reference's scale search tries this many elements at once (bounds its memory)


def _search(rows: torch.Tensor, base: torch.Tensor, mult: torch.Tensor, weight: torch.Tensor, recip: torch.Tensor,
            qw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` ``[R, D]`` float32 with their ``max|x| / 448`` scales ``base`` ``[R]``: every candidate scale
    tried at once, the codes and scale with the least weighted error kept (the first among equals). ``qw``
    ``[2, R, D]``: each row's query weights (``u``, ``v``), the error then ``v . e^2 + (u . e)^2``.
    Candidate ``i``'s unrounded codes are ``(x / base) * recip[i]`` (the first candidate's quotients, then
    products; the store kernel computes them the same way), its scale ``base * mult[i]``."""
    s = base[:, None] * mult  # [R, steps]
    c0 = (rows / base[:, None]).clamp(-FP8_MAX, FP8_MAX)  # [R, D]
    c = (c0[:, None, :] * recip[:, None]).clamp(-FP8_MAX, FP8_MAX)  # [R, steps, D]
    # the nearest e4m3 values (the cast's rounding; on CPUs a large cast is slow, the arithmetic is not)
    q = round_to_e4m3(c) if c.device.type == "cpu" and c.numel() >= 1 << 15 else c.to(FP8).float()
    if qw is None:
        e = ((q - c) * 2.0 ** ERROR_BITS).to(torch.int64)  # q - c is exact; then truncated
        err = (e * e).sum(dim=-1) * weight
    else:  # (coarser units, so that the rank-one term's square fits: see WEIGHTED_ERROR_BITS)
        shift = weight >> (WEIGHT_BITS - WEIGHTED_WEIGHT_BITS)
        if c.numel() >= 1 << 15:  # whole numbers below 2 ** 53 until the candidates' weights: float64 sums
            e = ((q - c) * 2.0 ** WEIGHTED_ERROR_BITS).trunc().double()  # them exactly (as matrix products)
            u, v = qw[0].double(), qw[1].double()  # [R, D]
            terms = torch.einsum("rsd,rd->rs", e * e, v) + torch.einsum("rsd,rd->rs", e, u) ** 2
            err = terms.to(torch.int64) * shift
        else:  # (few rows: fewer operations)
            e = ((q - c) * 2.0 ** WEIGHTED_ERROR_BITS).to(torch.int64)
            u, v = qw[0][:, None, :], qw[1][:, None, :]
            err = ((v * e * e).sum(dim=-1) + (u * e).sum(dim=-1) ** 2) * shift
    best = err.argmin(dim=-1, keepdim=True)  # [R, 1], the first of equal errors
    codes = q.gather(1, best[..., None].expand(-1, 1, q.shape[-1])).squeeze(1)
    return codes.to(FP8), s.gather(1, best).squeeze(1)


def round_to_e4m3(c: torch.Tensor) -> torch.Tensor:
    """float32 ``c`` (within +-448) rounded to the nearest e4m3 value, ties to even (what a cast to
    ``torch.float8_e4m3fn`` gives), kept in float32: a few elementwise ops where the cast is slow on CPUs."""
    exp = (c.view(torch.int32) >> 23) & 0xFF  # biased float32 exponent
    ulp = ((exp.clamp(min=121) - 3) << 23).view(torch.float32)  # 3 mantissa bits; subnormals (< 2 ** -6): 2 ** -9
    return torch.round(c / ulp) * ulp  # c / ulp is exact; round() takes halves to even


def dequantize_reference(codes: torch.Tensor, scales: torch.Tensor | None,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Real values of stored rows: ``codes * scales`` (``scales`` None: the rows are not quantized)."""
    if scales is None:
        return codes.to(dtype)
    return (codes.float() * scales.float()[..., None]).to(dtype)


def check_scales(name: str, codes: torch.Tensor, scales: torch.Tensor | None) -> None:
    """Quantized codes (FP8 or INT8) need their scales (one per row, the codes' shape without the head
    dim) and only they do."""
    if is_quantized(codes):
        if scales is None:
            raise ValueError(f"{name}: {codes.dtype} KV codes need their per-token scales")
        if tuple(scales.shape) != tuple(codes.shape[:-1]) or scales.dtype != SCALE_DTYPE:
            raise ValueError(f"{name}: scales must be {SCALE_DTYPE} of shape {tuple(codes.shape[:-1])}, got "
                             f"{scales.dtype} {tuple(scales.shape)}")
    elif scales is not None:
        raise ValueError(f"{name}: scales are for FP8 or INT8 KV only, the pool is {codes.dtype}")


def kv_rotation(kv_cache_dtype: str, head_dim: int, device, rotate: bool | None = None) -> torch.Tensor | None:
    """The float32 rotation ``H`` ``[D, D]`` that pages of this type store keys and values in, or None.

    ``rotate`` is the ``kv_rotation`` setting (``ZipageConfig``, ``LLM``, ``--kv-rotation``): True rotates
    8-bit pages (a power-of-two head dim is required), False stores them as they are, None takes the page
    type's default: INT8 pages rotated where the head dim is a power of two (unless
    ``ZIPAGE_INT8_ROTATION=0``), FP8 pages not (unless ``ZIPAGE_FP8_ROTATION=1``). Pages in the model's
    dtype are never rotated."""
    if rotate is not None and not isinstance(rotate, bool):
        raise TypeError(f"kv_rotation={rotate!r} is invalid: expected True, False or None")
    if kv_cache_dtype not in ("int8", "fp8"):
        if rotate:
            raise ValueError(f"kv_rotation=True applies to 8-bit pages (kv_cache_dtype='fp8' or 'int8'), got "
                             f"kv_cache_dtype={kv_cache_dtype!r}")
        return None
    power_of_two = head_dim >= 2 and not head_dim & (head_dim - 1)
    if rotate is None:
        name = f"ZIPAGE_{kv_cache_dtype.upper()}_ROTATION"
        value = os.environ.get(name, "1" if kv_cache_dtype == "int8" else "0").strip()
        if value not in ("0", "1"):
            raise ValueError(f"{name}={value!r}: expected 1 (store {kv_cache_dtype} pages rotated) or 0 (as they are)")
        rotate = value == "1" and power_of_two
    elif rotate and not power_of_two:
        raise ValueError(f"kv_rotation=True: the Hadamard rotation needs a power-of-two head dim, this model's is "
                         f"{head_dim}; store its pages unrotated (kv_rotation None or False; zipage serve: "
                         "--kv-rotation off or unset)")
    return _hadamard(head_dim, str(device)) if rotate else None


@functools.lru_cache(maxsize=None)
def _hadamard(d: int, device: str) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix of order ``d`` (a power of two): symmetric, ``H H = I``."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / d ** 0.5).to(torch.float32).to(device)


def rotate(x: torch.Tensor, rotation: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x @ rotation`` over the last dim in float32 (cast to ``dtype`` if given); ``x`` itself
    (in ``dtype``) without a rotation. ``H`` is its own inverse, so the same call rotates back."""
    if rotation is None:
        return x if dtype is None or x.dtype == dtype else x.to(dtype)
    out = torch.matmul(x.float(), rotation)
    return out if dtype is None else out.to(dtype)
