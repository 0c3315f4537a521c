"""Paged prefill kernels against gather + SDPA, on one GPU, in one call (under two minutes).

Qwen3-8B attention shapes (32 query heads over 8 KV heads, head dim 128), 256-token pages, bf16.
Cases: whole prompts of 512-4096 tokens in batches of 8K-16K tokens per step; prefix-cached
prompts (the queries are the second half of the stored context); a chunked-prefill step (a
2048-token chunk beside 64 single-query rows). Kernels: the first prefill kernel
(``paged_attention.py``), each launch variant of the second (``paged_prefill.py``) and, for the
chunked step, the engine's split of it (a prefill kernel on the chunk + the decode kernel on the
rows, with either prefill kernel); for whole prompts also PyTorch's own attention over the step's keys and
values with no gather (what a prefill with nothing stored before it could call instead of reading the pool):
``flash-fresh`` (its FlashAttention forward, variable-length, one launch), ``sdpa-fresh`` (SDPA once per
sequence) and ``cudnn-varlen`` (cuDNN's ragged form, one launch). The baseline gathers each sequence's pages into contiguous K/V and runs
``torch.nn.functional.scaled_dot_product_attention`` (``is_causal`` for whole prompts, an explicit
mask where queries are the last tokens of a longer context), gather included, as
``benchmarks/kernel_bench.py`` does: one SDPA call per distinct length, so ragged cases also time ``padded`` (every
prompt padded to the longest, an explicit causal and padding mask, one SDPA call). Every kernel's output is
checked against the baseline's: the relative error over the whole output (``rel_err`` below 2e-2) and that of
its worst query row and head (``row_rel_err`` below ``ROW_TOL``: a masking error confined to a few rows barely
moves the whole output's error).

    python3 benchmarks/prefill_tune.py --out $OUT/prefill_tune.json

Prints one table: the baseline's milliseconds (and the fastest of its other formulations: a
lower-right causal bias instead of the explicit mask, K/V repeated to the query heads, SDPA held to cuDNN or
to FlashAttention, the padded batch of a ragged case), then per kernel ``fastest_baseline_ms / kernel_ms``
(``ratio_best``; above 1: faster than the fastest formulation; ``!`` marks an output that disagrees with the
baseline). The JSON has the ratio to the ``mask`` formulation too (``ratio``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    from zipage.kernels import paged_attention as v1
    from zipage.kernels import paged_prefill as v2
    from zipage.kernels import fresh_prefill as fresh
    from zipage.kernels.fp8 import quantize_reference
except ImportError:  # a checkout without the package installed: the kernels folder is self-contained
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kernels import paged_attention as v1
    from kernels import paged_prefill as v2
    from kernels import fresh_prefill as fresh
    from kernels.fp8 import quantize_reference

HQ, HKV, D, PAGE = 32, 8, 128, 256
DT = torch.bfloat16
DEVICE = "cuda"
ROW_TOL = 0.1  # the largest relative error of one query row and head (bf16 output rounding: well below 1e-2)

# the second kernel's launch variants, by name (v2.parse_config reads them; ZIPAGE_PREFILL_KERNEL=v2:<name>
# runs the engine with one): tiles x warps x stages, and two ablations of the default
VARIANTS = {name: v2.parse_config(name) for name in (
    "m128n64w8s3",  # the default
    "m128n64w8s3-tma",
    "m128n128w8s3-tma",
    "m64n64w4s3-tma",  # (~180 registers: two programs per SM)
    "m64n64w4s3",
    "m128n32w8s3",
    "m128n64w8s3-nopack",  # ablations of the default: no GQA packing; no mask-free tiles and in-order blocks
    "m128n64w8s3-nosplit-inorder",
)}

# (name, batch, context, queries per sequence); queries are each sequence's last tokens
CASES = [
    ("prompt 512 x16", 16, 512, 512),
    ("prompt 1024 x8", 8, 1024, 1024),
    ("prompt 2048 x4", 4, 2048, 2048),
    ("prompt 4096 x4", 4, 4096, 4096),
    ("prefix 4K q2K x4", 4, 4096, 2048),
]
# whole prompts of mixed lengths (seeded), each its own shape for the baseline's SDPA
RAGGED = [("ragged 384-640 x16", 16, 384, 640), ("ragged 1.5K-2.5K x4", 4, 1536, 2560),
          ("ragged 3K-5K x4", 4, 3072, 5120), ("ragged 6K-10K x2", 2, 6144, 10240)]
MIXED = ("chunk 2K + 64x1", 4096, 2048, 64, 2048)  # name, chunk context, chunk queries, rows, row ctx
FP8_CASE = ("fp8 prompt 2K x4", 4, 2048, 2048)
# launches timed on FP8 pages: dequantized first (the default, then the 16-bit launches), and read as codes
FP8_VARIANTS = ("m64n64w4s3-tma", "m128n128w8s3-tma", "m128n64w8s3-tma-codes", "m64n64w4s3-tma-codes")


def smoke_setup() -> None:
    """``--smoke``: the same script at toy sizes on the CPU (Triton's interpreter, float32, one timed call
    each), so CI checks its plumbing; the numbers mean nothing."""
    global HQ, HKV, D, PAGE, DT, DEVICE, CASES, RAGGED, MIXED, FP8_CASE, VARIANTS, FP8_VARIANTS, bench
    HQ, HKV, D, PAGE, DT, DEVICE = 4, 2, 16, 16, torch.float32, "cpu"
    CASES = [("prompt 24 x2", 2, 24, 24), ("prefix 24 x2 (q 12)", 2, 24, 12)]
    RAGGED = []
    MIXED = ("chunk 12@24 + 2x1@16", 24, 12, 2, 16)
    FP8_CASE = ("fp8 prompt 16 x1", 1, 16, 16)
    VARIANTS = {n: v2.parse_config(n) for n in ("m32n16w4s1", "m16n16w4s1-nopack-nosplit-inorder")}
    FP8_VARIANTS = tuple(VARIANTS)

    def once(fn, **_):
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1000

    bench = once


def bench(fn, warmup: int = 5, rep: int = 25) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")  # milliseconds


class Step:
    """One step's paged inputs: pools, page table, packed queries, and the dense baseline."""

    def __init__(self, kv_lens: list[int], q_lens: list[int], fp8: bool = False, seed: int = 0):
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        self.kv_lens_list, self.q_lens_list = kv_lens, q_lens
        B = len(kv_lens)
        per_row = max(-(-n // PAGE) for n in kv_lens)
        P = B * per_row
        self.k = torch.randn(P, PAGE, HKV, D, device=DEVICE, dtype=DT, generator=g)
        self.v = torch.randn(P, PAGE, HKV, D, device=DEVICE, dtype=DT, generator=g)
        self.ks = self.vs = None
        if fp8:  # the baseline reads the dequantized values the kernels see
            (self.k8, self.ks), (self.v8, self.vs) = quantize_reference(self.k), quantize_reference(self.v)
            self.k = (self.k8.float() * self.ks[..., None]).to(DT)
            self.v = (self.v8.float() * self.vs[..., None]).to(DT)
        self.table = torch.randperm(P, device=DEVICE, generator=g).view(B, per_row).to(torch.int32)
        self.cu_host = [0] + torch.tensor(q_lens).cumsum(0).tolist()
        self.cu = torch.tensor(self.cu_host, dtype=torch.int32, device=DEVICE)
        self.lens = torch.tensor(kv_lens, dtype=torch.int32, device=DEVICE)
        self.q = torch.randn(sum(q_lens), HQ, D, device=DEVICE, dtype=DT, generator=g)
        self.max_q = max(q_lens)
        self.scale = D**-0.5
        self.head_map = torch.arange(HQ, device=DEVICE) // (HQ // HKV)  # query head -> its KV head
        # index and mask tensors of the baseline built once, outside its timing (it only gathers and attends)
        self.groups = []  # sequences of one shape go through SDPA together
        for shape in sorted(set(zip(kv_lens, q_lens)), reverse=True):
            idx = [b for b in range(B) if (kv_lens[b], q_lens[b]) == shape]
            n, nq = shape
            pos = torch.arange(n, device=DEVICE)
            slots = self.table[idx][:, pos // PAGE].long() * PAGE + pos % PAGE  # [b, n]
            rows = torch.cat([torch.arange(int(self.cu[b]), int(self.cu[b + 1]), device=DEVICE) for b in idx])
            if rows[-1] - rows[0] + 1 == len(rows):  # one run of rows: a view, no copy in the timing
                rows = slice(int(rows[0]), int(rows[-1]) + 1)
            mask = None
            if nq != n:  # queries are the last nq of n keys: bottom-right causal, explicit
                mask = torch.arange(n, device=DEVICE)[None, :] <= torch.arange(n - nq, n, device=DEVICE)[:, None]
            self.groups.append((len(idx), n, nq, slots, rows, mask))
        self.padded_inputs = None
        if len(self.groups) > 1 and kv_lens == q_lens:  # ragged whole prompts: one padded SDPA call as well
            n = max(kv_lens)
            pos = torch.arange(n, device=DEVICE)
            valid = pos[None, :] < self.lens[:, None]  # [B, n]
            slots = (self.table[:, pos // PAGE].long() * PAGE + pos % PAGE) * valid  # (padding reads slot 0)
            qrows = (self.cu[:-1, None].long() + pos) * valid  # packed query row of each (sequence, position)
            # query i of a sequence sees keys 0..i; a padding query sees key 0 (no row of only -inf)
            mask = (pos[None, :] <= pos[:, None]) & valid[:, None, :] | (pos[None, :] == 0)
            self.padded_inputs = (n, slots, qrows, valid, mask[:, None])  # mask [B, 1, n, n]

    def pools(self):
        return (self.k8, self.v8) if self.ks is not None else (self.k, self.v)

    def baseline(self, how: str = "mask"):
        """Gather every sequence's pages to dense K/V and run SDPA; outputs as SDPA gives them.
        ``how``: ``mask`` (``is_causal`` for whole prompts, an explicit boolean mask where the queries
        are the last tokens of a longer context: the formulation the targets are set against),
        ``lower_right`` (torch's lower-right causal bias instead of the explicit mask, which the
        fused backends take) or ``expand`` (K/V gathered already repeated to the query heads, no
        ``enable_gqa``, lower-right causal): the fastest of them is reported too."""
        if how == "padded":  # ragged whole prompts padded to the longest: one SDPA call, [B, HQ, n, D]
            n, slots, qrows, valid, mask = self.padded_inputs
            qd = self.q[qrows].transpose(1, 2)  # [B, HQ, n, D]
            kd = self.k.view(-1, HKV, D)[slots].transpose(1, 2)
            vd = self.v.view(-1, HKV, D)[slots].transpose(1, 2)
            return F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, enable_gqa=True)
        if how in ("cudnn", "flash"):  # the "mask" formulation with SDPA held to one backend
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION if how == "cudnn" else SDPBackend.FLASH_ATTENTION):
                return self.baseline("mask")
        outs = []
        for nb, n, nq, slots, rows, mask in self.groups:
            qd = self.q[rows].view(nb, nq, HQ, D).transpose(1, 2)
            if how == "expand":
                idx = slots[..., None] * HKV + self.head_map  # [b, n, HQ] rows of the [slots * HKV, D] view
                kd = self.k.view(-1, D)[idx].transpose(1, 2)  # [b, HQ, n, D]
                vd = self.v.view(-1, D)[idx].transpose(1, 2)
                gqa = {}
            else:
                kd = self.k.view(-1, HKV, D)[slots].transpose(1, 2)  # [b, HKV, n, D]
                vd = self.v.view(-1, HKV, D)[slots].transpose(1, 2)
                gqa = {"enable_gqa": True}
            if nq == 1:
                outs.append(F.scaled_dot_product_attention(qd, kd, vd, **gqa))
            elif mask is None:
                outs.append(F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, **gqa))
            elif how == "mask":
                outs.append(F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, **gqa))
            else:
                from torch.nn.attention.bias import causal_lower_right

                outs.append(F.scaled_dot_product_attention(qd, kd, vd, attn_mask=causal_lower_right(nq, n), **gqa))
        return outs

    def gather_only(self):
        for nb, n, nq, slots, rows, mask in self.groups:
            self.k.view(-1, HKV, D)[slots], self.v.view(-1, HKV, D)[slots]

    def packed(self, outs) -> torch.Tensor:
        """The baseline's outputs in the kernels' packed [T, Hq, D] layout (for the error check only)."""
        out = torch.empty_like(self.q)
        if isinstance(outs, torch.Tensor):  # the padded formulation
            n, slots, qrows, valid, mask = self.padded_inputs
            out[qrows[valid]] = outs.transpose(1, 2)[valid]
            return out
        for (nb, n, nq, slots, rows, mask), o in zip(self.groups, outs):
            out[rows] = o.transpose(1, 2).reshape(nb * nq, HQ, D)
        return out

    def args(self):
        k, v = self.pools()
        return (self.q, k, v, self.table, self.cu, self.lens, self.scale)

    def run_v1(self):
        return v1.paged_prefill_attention_triton(*self.args(), max_q_len=self.max_q, k_scale=self.ks, v_scale=self.vs)

    def run_v2(self, config):
        return v2.paged_prefill_attention_v2(*self.args(), max_q_len=self.max_q, k_scale=self.ks, v_scale=self.vs,
                                             config=config)

    def fresh(self) -> bool:
        """Whole prompts: every sequence's stored tokens are exactly its queries'."""
        return self.ks is None and self.kv_lens_list == self.q_lens_list

    def fresh_kv(self):
        """The step's own keys and values packed [T, Hkv, D], as the engine holds them (built untimed)."""
        if not hasattr(self, "_fresh"):
            slots = []
            for b, n in enumerate(self.kv_lens_list):
                pos = torch.arange(n, device=DEVICE)
                slots.append(self.table[b, pos // PAGE].long() * PAGE + pos % PAGE)
            slots = torch.cat(slots)
            self._fresh = (self.k.view(-1, HKV, D)[slots].contiguous(), self.v.view(-1, HKV, D)[slots].contiguous())
        return self._fresh

    def run_flash_fresh(self):
        """PyTorch's FlashAttention forward in its variable-length form over the step's own K/V, one launch."""
        k, v = self.fresh_kv()
        return torch.ops.aten._flash_attention_forward(self.q, k, v, self.cu, self.cu, self.max_q, self.max_q, 0.0,
                                                       True, False, scale=self.scale)[0]

    def run_sdpa_fresh(self):
        """SDPA once per sequence over the step's own keys/values (no gather; torch picks the backend)."""
        k, v = self.fresh_kv()
        out = torch.empty_like(self.q)
        for b, n in enumerate(self.q_lens_list):
            a, e = int(self.cu_host[b]), int(self.cu_host[b + 1])
            t = lambda x: x[a:e].unsqueeze(0).transpose(1, 2)  # noqa: E731  [1, H, n, D]
            out[a:e] = F.scaled_dot_product_attention(t(self.q), t(k), t(v), is_causal=True, enable_gqa=True,
                                                      scale=self.scale)[0].transpose(0, 1)
        return out

    def run_bucketed(self, backend=None):
        """``kernels/fresh_prefill.py``: prompts padded to length buckets, batched, one SDPA call per batch over
        the step's own K/V (the plan made on the host, outside the timing; held to ``backend`` if given)."""
        k, v = self.fresh_kv()
        if not hasattr(self, "_plan"):
            self._plan = fresh.plan_fresh(self.q_lens_list, self.cu_host[:-1], DEVICE)
        return fresh.fresh_prefill_attention(self.q, k, v, self._plan, self.scale, backend=backend)

    def run_cudnn_varlen(self):
        """cuDNN attention over the packed step in one launch (its ragged, cumulative-length form)."""
        k, v = self.fresh_kv()
        return torch.ops.aten._cudnn_attention_forward(self.q, k, v, None, self.cu, self.cu, self.max_q, self.max_q,
                                                       False, 0.0, True, False, scale=self.scale)[0]


def engine_path(step: Step, n_chunk: int, prefill=None):
    """What the engine runs for a mixed step: a prefill kernel (the first one unless given) on the
    chunk's rows, the decode kernel on the single-query rows."""
    q, k, v, table, cu, lens, scale = step.args()
    t, hint = int(cu[1]), int(lens[1:].max())  # host values read once, outside the timing
    prefill = prefill or v1.paged_prefill_attention_triton

    def run():
        out = torch.empty_like(q)
        out[:t] = prefill(q[:t], k, v, table[:1], cu[:2], lens[:1], scale, max_q_len=n_chunk, k_scale=step.ks,
                          v_scale=step.vs)
        out[t:] = v1.paged_decode_attention_triton(q[t:], k, v, table[1:], lens[1:], scale,
                                                   max_len_hint=hint, k_scale=step.ks, v_scale=step.vs)
        return out

    return run


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    diff = (out.float() - ref.float())
    return (diff.norm() / ref.float().norm()).item(), diff.abs().max().item()


def row_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest relative error of one row (a query row and head of a [T, Hq, D] output): the whole
    output's relative error hides a wrong tile of rows among many right ones."""
    ref = ref.float()
    diff = (out.float() - ref).norm(dim=-1)
    return (diff / ref.norm(dim=-1).clamp_min(1e-6)).max().item()


def agrees(out: torch.Tensor, ref: torch.Tensor) -> tuple[bool, dict]:
    """Whether a kernel's output matches the baseline's: the whole output's relative error below 2e-2 and
    every row's below ``ROW_TOL``; with the errors."""
    rel, mx = rel_err(out, ref)
    row = row_rel_err(out, ref)
    return rel < 2e-2 and row < ROW_TOL, dict(rel_err=rel, row_rel_err=row, max_abs_err=mx)


def measure(name: str, step: Step, kernels: dict, deadline: float, flops: float) -> dict:
    ref = step.packed(step.baseline())
    base_ms = bench(step.baseline)
    others = {}
    for how in ("lower_right", "expand", "cudnn", "flash", "padded"):
        if how == "lower_right" and all(g[5] is None for g in step.groups):
            continue  # whole prompts: the same call as "mask"
        if how in ("cudnn", "flash") and DEVICE != "cuda":
            continue
        if how == "padded" and step.padded_inputs is None:
            continue  # (ragged whole prompts only)
        try:
            ok, err = agrees(step.packed(step.baseline(how)), ref)
            ok = ok and err["rel_err"] < 1e-2
            others[how] = (bench(lambda how=how: step.baseline(how)) if ok
                           else f"disagrees: {err['rel_err']:.3g} (worst row {err['row_rel_err']:.3g})")
        except Exception as err:  # a formulation this torch does not take
            others[how] = f"{type(err).__name__}: {err}"[:200]
    best_ms = min([base_ms] + [v for v in others.values() if isinstance(v, float)])
    row = dict(case=name, kv_lens=sorted(set(step.kv_lens_list)), q_tokens=int(step.q.shape[0]),
               baseline_ms=base_ms, best_baseline_ms=best_ms, baseline_variants_ms=others,
               gather_ms=bench(step.gather_only), tflops_baseline=flops / base_ms / 1e9, kernels={})
    for kname, fn in kernels.items():
        if time.perf_counter() > deadline:
            row["kernels"][kname] = {"skipped": "out of time"}
            continue
        try:
            ok, err = agrees(fn(), ref)
            ms = bench(fn)
            row["kernels"][kname] = dict(ms=ms, ratio=base_ms / ms, ratio_best=best_ms / ms, **err, ok=ok,
                                         tflops=flops / ms / 1e9)
        except Exception as err:  # a variant that fails to compile is reported, not fatal
            row["kernels"][kname] = {"error": f"{type(err).__name__}: {err}"[:300]}
    return row


def first_calls() -> list[dict]:
    """The bucketed cuDNN path's first call on shapes no case used (cuDNN builds a plan for each new shape),
    then its second call: wall milliseconds, synchronized."""
    from torch.nn.attention import SDPBackend

    res = []
    for n, L in ((2, 1152), (1, 2304), (8, 640)):
        q = torch.randn(n * L, HQ, D, device=DEVICE, dtype=DT)
        k, v = (torch.randn(n * L, HKV, D, device=DEVICE, dtype=DT) for _ in range(2))
        plan = fresh.plan_fresh([L] * n, [i * L for i in range(n)], DEVICE)
        ms = []
        for _ in range(2):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fresh.fresh_prefill_attention(q, k, v, plan, D**-0.5, backend=SDPBackend.CUDNN_ATTENTION)
            torch.cuda.synchronize()
            ms.append(1000 * (time.perf_counter() - t))
        res.append(dict(batch=n, length=L, first_ms=ms[0], second_ms=ms[1]))
    return res


def causal_flops(kv_lens, q_lens) -> float:
    """Multiply-adds x 2 of QK^T and PV over the allowed (query, key) pairs."""
    pairs = sum(nq * (n - nq) + nq * (nq + 1) / 2 for n, nq in zip(kv_lens, q_lens))
    return 4 * pairs * HQ * D


def main(argv: list[str] | None = None) -> int:
    import triton

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/prefill_tune.json")
    ap.add_argument("--budget-s", type=float, default=95.0, help="stop timing new kernels after this many seconds")
    ap.add_argument("--variants", default=None, help="comma list of variant names to time (default: all of VARIANTS)")
    ap.add_argument("--fp8-variants", default=None, help="comma list for the FP8 case (default: FP8_VARIANTS)")
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU under TRITON_INTERPRET=1 (CI)")
    args = ap.parse_args(argv)
    if args.smoke:
        smoke_setup()
    elif not torch.cuda.is_available():
        raise SystemExit("prefill_tune needs a CUDA GPU (or --smoke on a CPU, under TRITON_INTERPRET=1)")
    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    fp8_names = args.fp8_variants.split(",") if args.fp8_variants else list(FP8_VARIANTS)
    try:  # a bad launch name is a usage error, before any GPU work
        variants = {n: VARIANTS.get(n) or v2.parse_config(n) for n in names}
        fp8_variants = {n: v2.parse_config(n) for n in fp8_names}
    except ValueError as err:
        ap.error(str(err))
    rows = []
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke)"
    summary = dict(device=device, torch=torch.__version__, triton=triton.__version__,
                   python=platform.python_version(), heads=[HQ, HKV], head_dim=D, page=PAGE, dtype=str(DT))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every case: a run cut short keeps what it measured
        summary["seconds"] = time.perf_counter() - t0
        with open(args.out, "w") as f:
            json.dump(dict(summary=summary, variants={n: vars(c) for n, c in {**variants, **fp8_variants}.items()},
                           rows=rows), f, indent=1)

    mname, n_c, q_c, rows_n, ctx_r = MIXED
    fname, fb, fn, fq = FP8_CASE
    cases = [(name, [n] * B, [nq] * B, False) for name, B, n, nq in CASES]
    gen = torch.Generator().manual_seed(0)
    for name, B, lo, hi in RAGGED:
        lens = torch.randint(lo, hi + 1, (B,), generator=gen).tolist()
        cases.append((name, lens, lens, False))
    cases += [(mname, [n_c] + [ctx_r] * rows_n, [q_c] + [1] * rows_n, False), (fname, [fn] * fb, [fq] * fb, True)]
    for name, kv_lens, q_lens, fp8 in cases:
        step = Step(kv_lens, q_lens, fp8=fp8)
        kernels = {"v1": step.run_v1}
        if name == mname:  # the engine's split: prefill kernel on the chunk, decode kernel on the rows
            kernels["v1-prefill+decode"] = engine_path(step, q_c)
            kernels["v2-prefill+decode"] = engine_path(step, q_c, v2.paged_prefill_attention_v2)
        for vname, cfg in (fp8_variants if fp8 else variants).items():
            kernels[vname] = lambda cfg=cfg, step=step: step.run_v2(cfg)
        if not args.smoke and step.fresh():  # PyTorch's own attention over the step's K/V (no gather), CUDA only
            kernels["flash-fresh"] = step.run_flash_fresh
            kernels["sdpa-fresh"] = step.run_sdpa_fresh
            kernels["cudnn-varlen"] = step.run_cudnn_varlen
            from torch.nn.attention import SDPBackend

            kernels["sdpa-bucket"] = step.run_bucketed
            kernels["cudnn-bucket"] = lambda step=step: step.run_bucketed(SDPBackend.CUDNN_ATTENTION)
        rows.append(measure(name, step, kernels, deadline, causal_flops(kv_lens, q_lens)))
        print(f"{time.perf_counter() - t0:5.1f} s  {name}", flush=True)
        save()
        del step
    if not args.smoke:
        summary["first_calls"] = first_calls()
        save()
        print("bucketed cuDNN, first and second call of a new shape (host + device ms):",
              "; ".join(f"{c['batch']} x {c['length']}: {c['first_ms']:.1f} then {c['second_ms']:.2f}"
                        for c in summary["first_calls"]))
    print(table(rows))
    print(f"{summary['seconds']:.0f} s on {device}, triton {triton.__version__}")
    return 0


def table(rows: list[dict]) -> str:
    """Kernels down, cases across: the fastest baseline formulation's ms / kernel_ms (``ratio_best``; ``!``:
    disagrees with the baseline)."""
    names = []
    for r in rows:
        names += [k for k in r["kernels"] if k not in names]
    width = max(len(n) for n in names + ["(fastest base ms)"]) + 1
    short = [r["case"][:16] for r in rows]
    lines = [" " * width + " ".join(f"{s:>16s}" for s in short)]
    lines.append(f"{'baseline ms':{width}s}" + " ".join(f"{r['baseline_ms']:16.3f}" for r in rows))
    lines.append(f"{'(fastest base ms)':{width}s}" + " ".join(f"{r['best_baseline_ms']:16.3f}" for r in rows))
    lines.append(f"{'(gather ms)':{width}s}" + " ".join(f"{r['gather_ms']:16.3f}" for r in rows))
    for n in names:
        cells = []
        for r in rows:
            k = r["kernels"].get(n)
            if k is None:
                cells.append(f"{'':>16s}")
            elif "ms" not in k:
                cells.append(f"{'error' if 'error' in k else 'skipped':>16s}")
            else:
                cells.append(f"{k['ratio_best']:6.2f}x {k['ms']:7.3f}{'' if k['ok'] else '!'}".rjust(16))
        lines.append(f"{n:{width}s}" + " ".join(cells))
    best = []
    for r in rows:
        done = {k: v for k, v in r["kernels"].items() if "ms" in v and v["ok"] and not k.startswith("v1")}
        if done:
            k = max(done, key=lambda k: done[k]["ratio_best"])
            best.append(f"{r['case']}: {k} {done[k]['ratio_best']:.2f}x")
    return "\n".join(lines + ["best v2 per case (against the fastest baseline): " + "; ".join(best)])


if __name__ == "__main__":
    sys.exit(main())
