"""Whole prompts through cuDNN's fused attention in its ragged form, one launch a step (optional).

A prompt with nothing stored before it attends only to its own keys and values, which the step holds packed
``[T, H_kv, D]`` beside its queries ``[T, H_q, D]``. cuDNN's Hopper attention (the fastest measured on these
shapes: ``kernels/fresh_prefill.py``) takes such a batch in *ragged* form: every tensor declared
``[B, H, S_max, D]`` with a device tensor of each sequence's first element (its ragged offset) and each
sequence's length (a padding mask), so ragged prompts need no padding copy. PyTorch's own ragged cuDNN call
builds a new plan on every call (~40 ms on the H100); here a graph is built once per (sequences, length
bucket) and reused: the lengths and offsets are device tensors the plan reads at run time.

This needs NVIDIA's cuDNN frontend for Python (``pip install nvidia-cudnn-frontend``, the ``cudnn`` module),
which reuses the cuDNN library PyTorch loads. Without it, or off CUDA, :func:`available` is false and the
engine keeps the Triton prefill kernel.
"""

from __future__ import annotations

import functools
import importlib.util
import threading

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


def available(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether :class:`CudnnPrefill` can run here: the cuDNN frontend installed, a CUDA device of compute
    capability 8.0 or above, 16-bit activations, a head dim that is a multiple of 8 up to 128."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    if head_dim % 8 or head_dim > 128 or torch.cuda.get_device_capability(device)[0] < 8:
        return False
    return _module() is not None


class CudnnPrefill:
    """Causal attention of whole prompts packed in a step, through cuDNN's ragged attention.

    ``prefill(q, k, v, starts, lens, max_len)``: ``q`` ``[T, H_q, D]``, ``k``/``v`` ``[T, H_kv, D]`` (the
    step's packed rows), sequence ``b`` the ``lens[b]`` rows from ``starts[b]`` (``starts`` ``[B + 1]``, rising,
    its last entry the row after the last sequence: the cumulative lengths where the prompts lie one after
    another; other rows between them are neither read nor written), ``max_len`` the longest on the host.
    Writes the sequences' rows of ``out`` (``[T, H_q, D]`` contiguous, new if not given) and returns it. Graphs
    are cached per (B, length bucket, row strides); building one takes tens of milliseconds, once."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, scale: float,
                 device: torch.device) -> None:
        if num_heads % num_kv_heads:
            raise ValueError(f"CudnnPrefill: {num_heads} query heads do not group over {num_kv_heads} KV heads")
        self.cudnn = _module()
        if self.cudnn is None:
            raise RuntimeError("CudnnPrefill needs NVIDIA's cuDNN frontend (pip install nvidia-cudnn-frontend) "
                               "and a CUDA build of torch")
        self.hq, self.hkv, self.d, self.dtype, self.scale = num_heads, num_kv_heads, head_dim, dtype, float(scale)
        self.device = torch.device(device)
        self.graphs: dict[tuple, tuple] = {}
        self.lock = threading.Lock()
        with torch.cuda.device(self.device):
            self.handle = self.cudnn.create_handle()
        self.workspace = torch.empty(0, dtype=torch.uint8, device=self.device)
        self.build_seconds = 0.0

    def _graph(self, b: int, s: int, q_row: int, kv_row: int):
        """The built graph for ``b`` sequences of up to ``s`` tokens, query rows ``q_row`` elements apart and
        key/value rows ``kv_row`` apart (the output is packed ``[T, H_q, D]``): (graph, its tensors)."""
        key = (b, s, q_row, kv_row)
        with self.lock:
            got = self.graphs.get(key)
            if got is not None:
                return got
            import time

            t0 = time.perf_counter()
            cudnn = self.cudnn
            io = cudnn.data_type.BFLOAT16 if self.dtype == torch.bfloat16 else cudnn.data_type.HALF
            g = cudnn.pygraph(io_data_type=io, intermediate_data_type=cudnn.data_type.FLOAT,
                              compute_data_type=cudnn.data_type.FLOAT, handle=self.handle)
            i32 = cudnn.data_type.INT32
            hq, hkv, d = self.hq, self.hkv, self.d

            def offsets(name):
                return g.tensor(name=name, dim=[b + 1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=i32)

            q_off, kv_off, o_off = offsets("q_off"), offsets("kv_off"), offsets("o_off")
            q = g.tensor(name="q", dim=[b, hq, s, d], stride=[s * q_row, d, q_row, 1], data_type=io,
                         ragged_offset=q_off)
            k = g.tensor(name="k", dim=[b, hkv, s, d], stride=[s * kv_row, d, kv_row, 1], data_type=io,
                         ragged_offset=kv_off)
            v = g.tensor(name="v", dim=[b, hkv, s, d], stride=[s * kv_row, d, kv_row, 1], data_type=io,
                         ragged_offset=kv_off)
            lens = g.tensor(name="lens", dim=[b, 1, 1, 1], stride=[1, 1, 1, 1], data_type=i32)
            o, _ = g.sdpa(name="sdpa", q=q, k=k, v=v, generate_stats=False, attn_scale=self.scale,
                          use_causal_mask=True, use_padding_mask=True, seq_len_q=lens, seq_len_kv=lens)
            o.set_output(True).set_dim([b, hq, s, d]).set_stride([s * hq * d, d, hq * d, 1]).set_data_type(io)
            o.set_ragged_offset(o_off)
            g.validate()
            g.build_operation_graph()
            g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
            g.check_support()
            g.build_plans()
            size = g.get_workspace_size()
            if size > self.workspace.numel():
                self.workspace = torch.empty(size, dtype=torch.uint8, device=self.device)
            got = (g, dict(q=q, k=k, v=v, o=o, lens=lens, q_off=q_off, kv_off=kv_off, o_off=o_off))
            self.graphs[key] = got
            self.build_seconds += time.perf_counter() - t0
            return got

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor,
                 lens: torch.Tensor, max_len: int, out: torch.Tensor | None = None) -> torch.Tensor:
        for name, t, h in (("q", q, self.hq), ("k", k, self.hkv), ("v", v, self.hkv)):
            if t.dim() != 3 or t.shape[1:] != (h, self.d) or t.dtype != self.dtype or t.stride(2) != 1 \
                    or t.stride(1) != self.d:
                raise ValueError(f"CudnnPrefill: {name} {tuple(t.shape)} {t.dtype} strides {t.stride()}: expected "
                                 f"[T, {h}, {self.d}] {self.dtype} with each row's heads contiguous")
        if k.stride(0) != v.stride(0):
            raise ValueError(f"CudnnPrefill: keys' rows {k.stride(0)} and values' {v.stride(0)} elements apart")
        b = lens.numel()
        g, t = self._graph(b, length_bucket(max_len), q.stride(0), k.stride(0))
        if out is None:
            out = torch.empty(q.shape[0], self.hq, self.d, dtype=self.dtype, device=q.device)
        elif out.shape != (q.shape[0], self.hq, self.d) or out.dtype != self.dtype or not out.is_contiguous():
            raise ValueError(f"CudnnPrefill: out {tuple(out.shape)} {out.dtype}: expected a contiguous "
                             f"[{q.shape[0]}, {self.hq}, {self.d}] {self.dtype}")
        cu = starts.to(torch.int32)
        lens4 = lens.to(torch.int32).view(b, 1, 1, 1)
        pack = {t["q"]: q, t["k"]: k, t["v"]: v, t["o"]: out, t["lens"]: lens4,
                t["q_off"]: (cu * q.stride(0)).view(b + 1, 1, 1, 1),
                t["kv_off"]: (cu * k.stride(0)).view(b + 1, 1, 1, 1),
                t["o_off"]: (cu * (self.hq * self.d)).view(b + 1, 1, 1, 1)}
        self.cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream(q.device).cuda_stream)
        g.execute(pack, self.workspace, handle=self.handle)
        return out
