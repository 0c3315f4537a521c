"""Compile the paged prefill kernels for a Hopper GPU on a machine without one, and say what came out.

Triton's compiler runs without a device: this builds each launch variant of the second prefill
kernel (and the first kernel, for comparison) for ``sm_90`` at Qwen3-8B's shapes (head dim 128,
256-token pages, a GQA group of 4), in bf16, with FP8 pages and with window + sinks + softcap, and
prints registers per thread, spilled bytes (the stack), shared memory, and how many warp-group
MMAs, asynchronous copies and tensor-memory (TMA) copies the pipelined code holds. Integer
arguments get the divisibility-by-16 hint a real launch gives them, so pipelining shows as it
would on the GPU. Exits non-zero when a variant does not compile: the interpreter, which the CPU
tests use, accepts code the compiler refuses.

    TRITON_INTERPRET=0 python benchmarks/prefill_compile.py [--variants m128n64w8s3,m64n64w4s3-tma]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before the kernels are defined: compiled functions, not interpreted

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

try:
    from zipage.kernels import paged_attention as v1
    from zipage.kernels import paged_prefill as v2
except ImportError:  # a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kernels import paged_attention as v1
    from kernels import paged_prefill as v2

D, PAGE, G = 128, 256, 4
POINTERS = ("Q", "K", "V", "KS", "VS", "KD", "VD", "PT", "CU_Q", "LENS", "STARTS", "OUT", "SINKS")
NOT_ALIGNED = ("stride_st",)  # a scale pool's token stride is the KV head count (8): no 16 hint
FEATURES = {"bf16": {}, "fp8": {"FP8": True}, "window+sinks+softcap": {"WINDOW": 300, "HAS_SINKS": True,
                                                                       "SOFTCAP_LOG2": 40.0}}


def set_shape(head_dim: int, page: int, group: int) -> None:
    global D, PAGE, G
    D, PAGE, G = head_dim, page, group


def compile_kernel(fn, constexprs: dict, num_warps: int, num_stages: int, tma_block: int | None = None, arch=90):
    """Compile ``fn`` with the given constexprs; every pointer bf16 (FP8 pools e4m3, scales fp32)."""
    fp8 = constexprs.get("FP8", False)
    kv = "fp8e4nv" if fp8 else "bf16"
    types = {"Q": "*bf16", "OUT": "*bf16", "K": f"*{kv}", "V": f"*{kv}", "KD": f"*{kv}", "VD": f"*{kv}",
             "KS": "*fp32" if fp8 else f"*{kv}", "VS": "*fp32" if fp8 else f"*{kv}", "SINKS": "*fp32",
             "PT": "*i32", "CU_Q": "*i32", "LENS": "*i32", "STARTS": "*i32"}
    if tma_block is not None:
        types["KD"] = types["VD"] = f"tensordesc<{kv}[{tma_block}, {D}]>"
    if "stride_vd" in fn.arg_names:  # token-major values: a launch specializes their dimension stride of 1 away
        constexprs = dict(constexprs, stride_vd=1)
    return compile_for(fn, constexprs, types, num_warps, num_stages, NOT_ALIGNED, "fp32", arch)


def compile_for(fn, constexprs: dict, pointers: dict, num_warps: int, num_stages: int, not_aligned=(),
                other: str = "fp32", arch: int = 90, maxnreg: int | None = None):
    """Compile ``fn`` for ``sm_<arch>``: ``pointers`` maps its pointer (and tensor-descriptor) arguments to their
    types, ``stride_*`` arguments are i32 and any other non-constexpr argument ``other``. Pointers and strides get
    the divisibility-by-16 hint a real launch gives them (strides in ``not_aligned`` excepted)."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name.startswith("stride_"):
            sig[name] = "i32"
        else:
            sig[name] = other(name) if callable(other) else other
        aligned = (name in pointers and not sig[name].startswith("tensordesc")) or (
            name.startswith("stride_") and name not in not_aligned)
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    options = dict(num_warps=num_warps, num_stages=num_stages)
    if maxnreg:  # a register cap per thread (ptxas .maxnreg), as a launch's maxnreg= asks
        options["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def timed_row(label: str, build) -> bool:
    """Print ``label``, the seconds ``build()`` took and the columns it returns, or FAILED and why; True on success."""
    t = time.perf_counter()
    try:
        columns = build()
    except Exception as err:
        print(f"{label} FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)
        return False
    print(f"{label} {time.perf_counter() - t:5.1f} {columns}", flush=True)
    return True


def describe(kernel) -> dict:
    """Registers, stack (spills) and shared memory of the binary, and what the pipelined IR holds."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    out = dict(smem=kernel.metadata.shared)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        use = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    for key, pattern in (("regs", r"REG:(\d+)"), ("stack", r"STACK:(\d+)")):
        m = re.search(pattern, use)
        out[key] = int(m.group(1)) if m else -1
    ir = kernel.asm["ttgir"]
    out.update(wgmma=ir.count("warp_group_dot"), async_copies=ir.count("async_copy_global_to_local"),
               tma_copies=ir.count("async_tma_copy"))
    return out


def v2_constexprs(cfg: v2.PrefillConfig, features: dict) -> tuple[dict, int | None]:
    P = v2.heads_per_program(G, cfg.block_m, cfg.pack_gqa)
    tma = cfg.tma and PAGE % cfg.block_n == 0 and D == v2.next_pow2(D)
    c = dict(G=G, P=P, D=D, BLOCK_D=max(16, v2.next_pow2(D)), PAGE=PAGE, BLOCK_M=cfg.block_m, BLOCK_Q=cfg.block_m // P, BLOCK_N=cfg.block_n,
             PRECISION="tf32", FP8=False, TILE_IN_PAGE=PAGE % cfg.block_n == 0, SPLIT_MASK=cfg.split_mask,
             LONGEST_FIRST=cfg.longest_first, TMA=tma, WINDOW=0, HAS_SINKS=False, SOFTCAP_LOG2=0.0)
    c.update(features)
    return c, (cfg.block_n if tma else None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=None, help="comma list of config names (default: prefill_tune's VARIANTS)")
    ap.add_argument("--features", default=",".join(FEATURES), help=f"comma list of {', '.join(FEATURES)}")
    ap.add_argument("--only-v2", action="store_true", help="skip the first kernel")
    ap.add_argument("--shape", default=f"{D},{PAGE},{G}", help="head dim, page size, GQA group (default %(default)s)")
    args = ap.parse_args(argv)
    set_shape(*(int(x) for x in args.shape.split(",")))
    if args.variants:
        names = args.variants.split(",")
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from prefill_tune import VARIANTS

        names = list(VARIANTS)
    failures = 0
    print(f"{'kernel':30s} {'features':22s} {'s':>5s} {'regs':>5s} {'stack':>6s} {'smem':>7s} {'wgmma':>5s} "
          f"{'async':>5s} {'tma':>4s}")
    jobs = [] if args.only_v2 else [("v1 m128n64w8s3", v1._prefill_kernel, None, 8, 3)]
    jobs += [(n, v2._prefill_v2_kernel, v2.parse_config(n), None, None) for n in names]
    def build(fn, cfg, warps, stages, feat) -> str:
        if cfg is None:  # the first kernel
            c = dict(G=G, D=D, BLOCK_D=v2.next_pow2(D), PAGE=PAGE, BLOCK_M=128, BLOCK_N=64, PRECISION="tf32", FP8=False,
                     WINDOW=0, HAS_SINKS=False, SOFTCAP_LOG2=0.0)
            c.update(FEATURES[feat])
            k = compile_kernel(fn, c, warps, stages)
        else:
            c, block = v2_constexprs(cfg, FEATURES[feat])
            k = compile_kernel(fn, c, cfg.num_warps, cfg.num_stages, block)
        d = describe(k)
        return (f"{d['regs']:5d} {d['stack']:6d} {d['smem']:7d} {d['wgmma']:5d} {d['async_copies']:5d} "
                f"{d['tma_copies']:4d}")

    for name, fn, cfg, warps, stages in jobs:
        for feat in args.features.split(","):
            ok = timed_row(f"{name:30s} {feat:22s}", lambda: build(fn, cfg, warps, stages, feat))  # noqa: B023
            failures += not ok
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
