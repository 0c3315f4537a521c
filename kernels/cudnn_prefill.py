"""Whole prompts through cuDNN's fused attention in its ragged form, one launch a step (optional).

A prompt with nothing stored before it attends only to its own keys and values, which the step holds packed
``[T, H_kv, D]`` beside its queries ``[T, H_q, D]``. cuDNN's Hopper attention (the fastest measured on these
shapes: ``kernels/fresh_prefill.py``) takes such a batch in *ragged* form: every tensor declared
``[B, H, S_max, D]`` with a device tensor of each sequence's first element (its ragged offset) and each
sequence's length (a padding mask), so ragged prompts need no padding copy, and the prompts need not lie one
after another (other rows of the step between them are neither read nor written). PyTorch's own ragged cuDNN
call builds a new plan on every call (34-49 ms on the H100); here a graph is built once per (sequences, length
bucket, shapes) and reused: the lengths and offsets are device tensors the plan reads at run time.

This needs NVIDIA's cuDNN frontend for Python (``pip install nvidia-cudnn-frontend``, the ``cudnn`` module),
which reuses the cuDNN library PyTorch loads. The engine sends whole prompts here by default where
:func:`available` on a GPU of compute capability 9.0 or above with pages in the model's dtype
(``runner.fresh_prefill_default``; ``ZIPAGE_FRESH_PREFILL=0`` opts out); elsewhere it keeps the paged kernel,
and refuses ``ZIPAGE_FRESH_PREFILL=cudnn`` where the route cannot run, saying why (:func:`unavailable`).
:func:`ragged_prefill_reference` is the dense math, on any device.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import threading
import time

import torch

MIN_BUCKET = 128  # the shortest length bucket a graph is built for


def length_bucket(n: int) -> int:
    """The ``S_max`` a graph for prompts of up to ``n`` tokens is built with: the power of two at or above
    ``n``, at least :data:`MIN_BUCKET` (cuDNN skips the tiles past each sequence's length)."""
    if n < 1:
        raise ValueError(f"length_bucket({n}): a prompt has at least one token")
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


@functools.cache
def _module():
    """The ``cudnn`` module, or None where it is not installed or cannot find the cuDNN library."""
    if importlib.util.find_spec("cudnn") is None:
        return None
    try:
        import cudnn

        cudnn.backend_version()
    except Exception:  # no cuDNN library in the process (a CPU build of torch)
        return None
    return cudnn


def unavailable(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why :class:`CudnnPrefill` cannot run here, or None if it can: it needs the cuDNN frontend 1.13 or later
    installed, a CUDA device of compute capability 9.0 or above (8.x with a cuDNN library of 9.18.1 or later:
    ragged layouts before Hopper), 16-bit activations and a head dim that is a multiple of 8 up to 128."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"it runs on CUDA devices, not {device}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"it takes 16-bit activations, not {dtype}"
    if head_dim % 8 or head_dim > 128:
        return f"it takes head dims that are multiples of 8 up to 128, not {head_dim}"
    cudnn = _module()
    if cudnn is None:
        return "NVIDIA's cuDNN frontend is not installed (pip install -e \".[cudnn]\") or finds no cuDNN library"
    version = tuple(int(x) for x in re.findall(r"\d+", getattr(cudnn, "__version__", "0"))[:2])
    if version < (1, 13):
        return f"it needs the cuDNN frontend 1.13 or later, not {cudnn.__version__}"
    major = torch.cuda.get_device_capability(device)[0]
    if major < 9 and (major < 8 or cudnn.backend_version() < 91801):
        return (f"ragged attention needs a GPU of compute capability 9.0 or above, or 8.x with cuDNN 9.18.1 or "
                f"later (this one: {major}.x, cuDNN {cudnn.backend_version()})")
    return None


def available(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether :class:`CudnnPrefill` can run here (:func:`unavailable` says why not)."""
    return unavailable(device, dtype, head_dim) is None


def rows_of_heads(t: torch.Tensor) -> bool:
    """Whether ``t`` ``[T, H, D]`` holds each row's heads contiguous (one head: any head stride)."""
    return t.dim() == 3 and t.stride(2) == 1 and (t.shape[1] == 1 or t.stride(1) == t.shape[2])


def _check(name: str, t: torch.Tensor, heads: int | None = None) -> None:
    if not rows_of_heads(t) or (heads is not None and t.shape[1] != heads):
        raise ValueError(f"CudnnPrefill: {name} {tuple(t.shape)} strides {t.stride()}: expected [T, H, D] rows "
                         "with each row's heads contiguous")


class CudnnPrefill:
    """Causal attention of whole prompts packed in a step, through cuDNN's ragged attention.

    ``prefill(q, k, v, starts, lens, max_len, scale)``: ``q`` ``[T, H_q, D]``, ``k``/``v`` ``[T, H_kv, D]``
    (the step's packed rows, each row's heads contiguous), sequence ``b`` the ``lens[b]`` rows from
    ``starts[b]`` (``starts`` ``[B + 1]`` int32 on the device, rising, its last entry the row after the last
    sequence: the cumulative lengths where the prompts lie one after another), ``max_len`` the longest (a host
    int). Writes the sequences' rows of ``out`` (``[T, H_q, D]``, each row's heads contiguous; new if not
    given) and returns it. Graphs are cached per (B, length bucket, heads, dtype, row strides, scale):
    :meth:`key`, which a caller that computed it passes as ``key``; building one takes tens of milliseconds,
    once."""

    def __init__(self, device: torch.device, pad_batch: bool = False, min_bucket: int = MIN_BUCKET,
                 autotune: bool = False) -> None:
        if min_bucket < MIN_BUCKET or min_bucket & (min_bucket - 1):
            raise ValueError(f"CudnnPrefill: min_bucket={min_bucket}: expected a power of two >= {MIN_BUCKET}")
        self.cudnn = _module()
        if self.cudnn is None:
            raise RuntimeError("CudnnPrefill needs NVIDIA's cuDNN frontend (pip install nvidia-cudnn-frontend) "
                               "and a CUDA build of torch")
        self.device = torch.device(device)
        # the sequences padded to a power of two with empty ones (fewer graphs to build: one per doubling)
        self.pad_batch = pad_batch
        self.graphs: dict[tuple, tuple] = {}
        self.lock = threading.Lock()
        with torch.cuda.device(self.device):
            self.handle = self.cudnn.create_handle()
        self.workspace = torch.empty(0, dtype=torch.uint8, device=self.device)
        self.build_seconds = 0.0
        # the shortest S_max a graph is built with (a power of two): larger, fewer graphs (a step's prompts up to it
        # share one per batch size), each over more empty tiles
        self.min_bucket = min_bucket
        self.graph_kwargs: dict = {}  # (more arguments of the frontend's graphs: benchmarks/cudnn_graph_builds.py)
        # autotune: each new graph times every plan cuDNN offers for it (on the inputs of the call that builds it)
        # and keeps the fastest, where otherwise the first that builds is kept; plan_times[key]: {plan name: ms,
        # or why it was skipped}
        self.autotune = autotune
        self.plan_times: dict[tuple, dict] = {}
        self.chosen_plan: dict[tuple, str] = {}

    def _graph(self, key: tuple, pack_of=None):
        """The built graph of ``key`` (B, S_max, H_q, H_kv, D, dtype, row strides of q, k, v and out, scale,
        whether offsets are int64); ``pack_of(tensors)``: the calling step's inputs, which an autotuned build
        times its plans on."""
        with self.lock, torch.cuda.device(self.device):  # (the handle's device, whichever is current)
            got = self.graphs.get(key)
            if got is not None:
                return got
            b, s, hq, hkv, d, dtype, q_row, k_row, v_row, o_row, scale, wide = key
            t0 = time.perf_counter()
            cudnn = self.cudnn
            io = cudnn.data_type.BFLOAT16 if dtype == torch.bfloat16 else cudnn.data_type.HALF
            g = cudnn.pygraph(io_data_type=io, intermediate_data_type=cudnn.data_type.FLOAT,
                              compute_data_type=cudnn.data_type.FLOAT, handle=self.handle, **self.graph_kwargs)
            i32 = cudnn.data_type.INT32
            off_type = cudnn.data_type.INT64 if wide else i32  # (offsets in elements: int64 past 2^31)

            def offsets(name):
                return g.tensor(name=name, dim=[b + 1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=off_type)

            q_off, k_off, v_off, o_off = offsets("q_off"), offsets("k_off"), offsets("v_off"), offsets("o_off")
            q = g.tensor(name="q", dim=[b, hq, s, d], stride=[s * q_row, d, q_row, 1], data_type=io,
                         ragged_offset=q_off)
            k = g.tensor(name="k", dim=[b, hkv, s, d], stride=[s * k_row, d, k_row, 1], data_type=io,
                         ragged_offset=k_off)
            v = g.tensor(name="v", dim=[b, hkv, s, d], stride=[s * v_row, d, v_row, 1], data_type=io,
                         ragged_offset=v_off)
            lens = g.tensor(name="lens", dim=[b, 1, 1, 1], stride=[1, 1, 1, 1], data_type=i32)
            o, _ = g.sdpa(name="sdpa", q=q, k=k, v=v, generate_stats=False, attn_scale=scale,
                          use_causal_mask=True, use_padding_mask=True, seq_len_q=lens, seq_len_kv=lens)
            o.set_output(True).set_dim([b, hq, s, d]).set_stride([s * o_row, d, o_row, 1]).set_data_type(io)
            o.set_ragged_offset(o_off)
            g.validate()
            g.build_operation_graph()
            if hasattr(g, "deselect_engines"):  # (the frontend's own Python kernels rebuild ragged offsets from the
                g.deselect_engines(["sdpa_fwd_prefill"])  # lengths, which gaps between sequences break)
            g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
            g.check_support()
            tensors = dict(q=q, k=k, v=v, o=o, lens=lens, q_off=q_off, k_off=k_off, v_off=v_off, o_off=o_off)
            if self.autotune:
                if pack_of is None or not hasattr(g, "select_plan"):
                    raise RuntimeError("CudnnPrefill(autotune=True) times plans on a call's inputs, with cuDNN "
                                       "frontend 1.32 or later (pygraph.select_plan)")
                g.select_plan(self._fastest_plan(g, tensors, key, pack_of))  # (pinned: build_plans builds it)
            g.build_plans()
            engine = getattr(g, "selected_engine", None)
            if engine is not None:  # (only cuDNN's own engines are known to honour offsets with gaps between rows)
                raise RuntimeError(f"the cuDNN frontend chose its Python engine {getattr(engine, 'name', engine)!r} "
                                   "for the ragged graph, not cuDNN's own")
            size = g.get_workspace_size()
            if size > self.workspace.numel():
                self.workspace = torch.empty(size, dtype=torch.uint8, device=self.device)
            got = (g, tensors)
            self.graphs[key] = got
            self.build_seconds += time.perf_counter() - t0
            return got

    def _fastest_plan(self, g, t: dict, key: tuple, pack_of, reps: int = 5) -> int:
        """The index of the fastest of ``g``'s plans (cuDNN's own engines only) on the calling step's inputs
        (``pack_of(t)``: its output written by each plan in turn, then by the plan chosen; the engine's first
        call of a graph writes a scratch, which it checks): one untimed run, then ``reps`` runs queued between
        two events (their mean: no host time between them). Records each plan's ms (or why it was skipped) in
        ``plan_times[key]`` and the one chosen in ``chosen_plan[key]``."""
        pack = pack_of(t)
        stream = torch.cuda.current_stream(self.device)
        self.cudnn.set_stream(handle=self.handle, stream=stream.cuda_stream)
        times: dict[str, float | str] = {}
        best, best_ms = None, float("inf")
        for i in range(g.get_execution_plan_count()):
            name = f"{i}"
            try:
                name = f"{i}: {g.get_plan_name_at_index(i)}"
                g.build_plan_at_index(i)
                if getattr(g, "selected_engine", None) is not None:
                    times[name] = "the frontend's Python engine (skipped)"
                    continue
                size = g.get_workspace_size_plan_at_index(i)
                ws = self.workspace if size <= self.workspace.numel() else torch.empty(
                    size, dtype=torch.uint8, device=self.device)
                g.execute_plan_at_index(pack, ws, index=i, handle=self.handle)
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda._sleep(1_000_000)  # (the GPU kept busy while the runs are queued: ~0.5 ms)
                e0.record(stream)
                for _ in range(reps):
                    g.execute_plan_at_index(pack, ws, index=i, handle=self.handle)
                e1.record(stream)
                e1.synchronize()
            except Exception as e:  # (a plan that does not build or run for this graph is one not to choose)
                if isinstance(e, torch.AcceleratorError):
                    raise
                times[name] = f"{type(e).__name__}: {str(e)[:200]}"
                continue
            times[name] = e0.elapsed_time(e1) / reps
            if times[name] < best_ms:
                best, best_ms, best_name = i, times[name], name
        self.plan_times[key] = times
        if best is None:
            raise RuntimeError(f"no cuDNN plan of the ragged graph ran: {times}")
        self.chosen_plan[key] = best_name
        return best

    def warm(self, hq: int, hkv: int, d: int, dtype: torch.dtype) -> None:
        """A check before any request: two sequences with rows between them and after them, in the layout of one
        fused q/k/v projection, at the scale ``d ** -0.5`` (not necessarily the model's: the graph a step uses
        is built at its first use), against :func:`ragged_prefill_sdpa`; raises RuntimeError where cuDNN's
        answer differs (or its graph fails to build or run). cuDNN's first graph build (0.8-1.4 s on the H100,
        its libraries loaded; later builds 47-84 ms) happens here rather than in a request's step."""
        lens, starts, rows = [37, 70], [3, 45], 120
        g = torch.Generator(device=self.device).manual_seed(0)
        fused = torch.randn(rows, (hq + 2 * hkv) * d, generator=g, device=self.device).to(dtype)
        q = fused[:, : hq * d].view(rows, hq, d)
        k = fused[:, hq * d : (hq + hkv) * d].view(rows, hkv, d)
        v = fused[:, (hq + hkv) * d :].view(rows, hkv, d)
        i32 = dict(dtype=torch.int32, device=self.device)
        out = torch.full_like(q, float("nan"))  # (rows outside the sequences must stay so)
        self(q, k, v, torch.tensor(starts + [starts[-1] + lens[-1]], **i32), torch.tensor(lens, **i32), max(lens),
             d**-0.5, out=out)
        ref = ragged_prefill_sdpa(q, k, v, starts, lens, d**-0.5)
        err = ragged_error(out, ref, starts, lens, untouched=True)
        if not err <= 0.05:  # (bf16 rounding of softmax-weighted means: ~1e-2 of a sequence's largest at most)
            raise RuntimeError(f"cuDNN's ragged attention differs from PyTorch's on a check at start (error "
                               f"{err:.3g} of a sequence's largest output, inf: rows outside the sequences "
                               "written)")

    def key(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: int, max_len: int, scale: float,
            out: torch.Tensor | None = None) -> tuple:
        """The graph key of a call over ``b`` sequences (padded already, or here where ``pad_batch``); a call
        builds a new graph where it is not in ``graphs``. ``out`` None: the contiguous output a call makes."""
        if self.pad_batch and b & (b - 1):
            b = 1 << b.bit_length()
        o_rows, o_row = (out.shape[0], out.stride(0)) if out is not None else (q.shape[0], q.shape[1] * q.shape[2])
        rows = (q.stride(0), k.stride(0), v.stride(0), o_row)
        s_max = max(self.min_bucket, length_bucket(max_len))
        # (int64 offsets where an element's index may pass 2^31: in the tensors, or in the [B, H, S_max, D] shapes
        # the graph declares)
        wide = max(q.shape[0], k.shape[0], v.shape[0], o_rows, b * s_max) * max(rows) >= 2**31
        return (b, s_max, q.shape[1], k.shape[1], q.shape[2], q.dtype, *rows, float(scale), wide)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor,
                 lens: torch.Tensor, max_len: int, scale: float, out: torch.Tensor | None = None,
                 key: tuple | None = None) -> torch.Tensor:
        _check("q", q)
        hq, d = q.shape[1:]
        _check("k", k)
        _check("v", v, k.shape[1])
        if starts.numel() != lens.numel() + 1:
            raise ValueError(f"CudnnPrefill: {starts.numel()} starts for {lens.numel()} sequences (expected one more)")
        if k.shape[2] != d or v.shape[2] != d or hq % k.shape[1] or not (q.dtype == k.dtype == v.dtype) \
                or q.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"CudnnPrefill: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                             f"({q.dtype}, {k.dtype}, {v.dtype}): expected 16-bit tensors of one head dim, query "
                             "heads a multiple of KV heads")
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        _check("out", out, hq)
        if out.dtype != q.dtype:
            raise ValueError(f"CudnnPrefill: out is {out.dtype}, the queries {q.dtype}")
        b = lens.numel()
        if self.pad_batch and b & (b - 1):
            extra = (1 << b.bit_length()) - b  # empty sequences at the end (each starts where the last ends)
            starts = torch.cat([starts.to(torch.int64), starts[-1:].to(torch.int64).expand(extra)])
            lens = torch.cat([lens.to(torch.int32), lens.new_zeros(extra, dtype=torch.int32)])
            b += extra
        key = key if key is not None else self.key(q, k, v, b, max_len, scale, out)  # (given: the caller's)
        rows, wide = key[6:10], key[-1]
        cu = starts.to(torch.int64 if wide else torch.int32).view(b + 1, 1, 1, 1)
        lens = lens.to(torch.int32).view(b, 1, 1, 1)

        def pack_of(t: dict) -> dict:
            return {t["q"]: q, t["k"]: k, t["v"]: v, t["o"]: out, t["lens"]: lens, t["q_off"]: cu * rows[0],
                    t["k_off"]: cu * rows[1], t["v_off"]: cu * rows[2], t["o_off"]: cu * rows[3]}

        g, t = self._graph(key, pack_of)
        pack = pack_of(t)
        with torch.cuda.device(self.device):
            self.cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream(q.device).cuda_stream)
            g.execute(pack, self.workspace, handle=self.handle)
        return out


def ragged_prefill_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: list[int], lens: list[int],
                        scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch's fused causal attention one sequence at a time (``lens[b]`` rows from ``starts[b]``) over its own
    keys and values, written into those rows of ``out`` (new if not given; other rows untouched): the engine's
    fallback for a step whose cuDNN graph failed."""
    if out is None:
        out = torch.zeros_like(q)
    for a, n in zip(starts, lens):
        if n:
            qs, ks, vs = (x[a:a + n].transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, H, n, D]
            o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                                 enable_gqa=k.shape[1] != q.shape[1])
            out[a:a + n] = o[0].transpose(0, 1)
    return out


def ragged_error(out: torch.Tensor, ref: torch.Tensor, starts: list[int], lens: list[int],
                 untouched: bool = False) -> float:
    """How far ``out`` is from ``ref`` on the sequences' rows: the largest, over the sequences, of the largest
    absolute difference in a sequence's rows over that sequence's largest ``|ref|`` (0 where they agree, 1 where
    a sequence's rows are zeroed); a NaN or inf counts as infinitely wrong. ``untouched``: ``out`` was filled with
    NaN before the call, and a row outside the sequences that is no longer NaN is infinitely wrong too. One host
    synchronization; a sequence at a time."""
    errs, inside = [], torch.zeros(out.shape[0], dtype=torch.bool, device=out.device)
    for a, n in zip(starts, lens):
        if n:
            o, r = out[a:a + n], ref[a:a + n]
            diff = (o.float() - r.float()).abs().amax()
            errs.append(diff / r.float().abs().amax().clamp(min=1e-6))
            inside[a:a + n] = True
    if untouched:
        errs.append(torch.where(torch.isnan(out[~inside]).all(), 0.0, float("inf")).to(out.device))
    if not errs:
        return 0.0
    err = torch.stack([e.reshape(()) for e in errs]).amax().item()
    return err if err == err and err != float("inf") else float("inf")


def ragged_prefill_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: list[int], lens: list[int],
                             scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense float32 causal attention of each sequence (``lens[b]`` rows from ``starts[b]``) over its own keys and
    values, written into those rows of ``out`` (new if not given; other rows untouched)."""
    if out is None:
        out = torch.zeros_like(q)
    G = q.shape[1] // k.shape[1]
    for a, n in zip(starts, lens):
        qs, ks, vs = (x[a:a + n].float().transpose(0, 1) for x in (q, k, v))  # [H, n, D]
        ks, vs = ks.repeat_interleave(G, 0), vs.repeat_interleave(G, 0)
        s = qs @ ks.transpose(1, 2) * scale
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        out[a:a + n] = (s.softmax(-1) @ vs).transpose(0, 1).to(out.dtype)
    return out
