"""Compile the decode kernel on 8-bit pages for a Hopper GPU on a machine without one, and say what came out.

``kernels/paged_decode_fp8.py`` at Qwen3-8B's shapes (32 query / 8 KV heads, head dim 128, 256-token pages)
is built for ``sm_90`` with each launch asked for, on FP8 and INT8 pages, and for each the script prints
registers per thread, spilled bytes, shared memory, and what the pipelined code does with a tile:

* ``bufs``: buffers per pool for the tile copies (``num_stages`` asks; the pipeliner decides);
* ``v16``: whether the value tile goes through shared memory again as 16-bit values to reach the second
  dot's operand layout (Nsight Compute found that copy bank-conflicted on the H200,
  ``benchmarks/results/issue15/s30/``);
* ``lds8``: byte loads from shared memory (what the value operand costs without that copy).

The same compilation runs ``ptxas`` on the PTX the INT8 conversion writes by hand, which the interpreter (the
CPU tests) never reads. Exits non-zero when a launch does not compile.

    TRITON_INTERPRET=0 python benchmarks/decode_compile.py [--launches fp16/tma/128/4/3,fp16/page/128/4/3]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before the kernels are defined: compiled functions, not interpreted

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prefill_compile import compile_for, describe, timed_row  # noqa: E402

try:
    from zipage.kernels import paged_decode_fp8 as fp8
except ImportError:  # a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kernels import paged_decode_fp8 as fp8

HQ, HKV, D, PAGE = 32, 8, 128, 256
LAUNCHES = ("fp16/tma/128/2/3/plain/vdim", "fp16/tma/128/4/3/none/vdim", "fp16/tma/128/4/3", "fp16/page/128/4/3",
            "fp16/gather/128/4/3")  # convert/load/block_n/warps/stages[/v_edge][/vdim: values dimension-major]
NOT_ALIGNED = ("stride_st", "stride_sh")  # a scale pool's token stride is the KV head count (8): no 16 hint


def compile_decode(convert: str, load: str, block_n: int, warps: int, stages: int, codes: str, arch: int = 90,
                   v_edge: str = "bytes", v_dim_major: bool = False, maxnreg: int | None = None):
    """``_decode_split_fp8_kernel`` for one launch, ``codes`` "fp8" (e4m3) or "int8", bf16 queries."""
    kv = "fp8e4nv" if codes == "fp8" else "i8"
    types = {"Q": "*bf16", "K": f"*{kv}", "V": f"*{kv}", "KS": "*fp32", "VS": "*fp32", "KD": f"*{kv}", "VD": f"*{kv}",
             "PT": "*i32", "LENS": "*i32", "STARTS": "*i32", "MID_O": "*fp32", "MID_LSE": "*fp32"}
    if load == "tma":
        types["KD"] = types["VD"] = f"tensordesc<{kv}[{block_n}, {D}]>"
        if v_dim_major:
            types["VD"] = f"tensordesc<{kv}[{D}, {block_n}]>"
    int8 = codes == "int8"
    constexprs = dict(HKV=HKV, HQ=HQ, G=HQ // HKV, BLOCK_G=max(16, fp8.next_pow2(HQ // HKV)), D=D, BLOCK_D=D,
                      PAGE=PAGE, BLOCK_N=block_n, NUM_SPLITS=1, CONVERT=fp8.CONVERTS.index(convert), HEAD_FAST=True,
                      LOAD=fp8.LOADS.index(load), INT8_CODES=int8, WINDOW=0, SOFTCAP_LOG2=0.0,
                      INT8_PTX=int8 and convert == "fp16", V_EDGE=fp8.V_EDGES.index(v_edge),
                      V_DIM_MAJOR=v_dim_major, FP8_PTX=not int8)
    if not v_dim_major:  # token-major values: a launch specializes their dimension stride of 1 away
        constexprs["stride_vd"] = 1
    return compile_for(fp8._decode_split_fp8_kernel, constexprs, types, warps, stages, NOT_ALIGNED,
                       lambda name: "fp32" if name in ("scale_log2", "code_scale") else "i32", arch, maxnreg)


def tile_facts(kernel, block_n: int) -> dict:
    """Buffers per pool for the tile copies, the value tile's 16-bit copy, byte loads from shared memory."""
    ir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
    buffers = [int(n) for n in re.findall(rf"local_alloc : \(\) -> !ttg\.memdesc<(\d+)x{block_n}x{D}x(?:f8E4M3FN|i8)",
                                          ir)]
    v16 = re.search(rf"local_alloc %\S+ : \(tensor<{block_n}x{D}xf16", ir) is not None
    return dict(bufs=max(buffers) if buffers else 0, v16=v16, lds8=len(re.findall(r"ld\.shared\.(?:b8|u8|s8)", ptx)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--launches", default=",".join(LAUNCHES),
                    help="comma list of convert/load/block_n/warps/stages[/v_edge] (default %(default)s)")
    ap.add_argument("--codes", default="fp8,int8", help="comma list of fp8, int8")
    ap.add_argument("--maxnreg", type=int, default=None, help="a register cap per thread for every launch")
    args = ap.parse_args(argv)
    launches = []
    for text in args.launches.split(","):
        parts = text.split("/")
        dim_major = len(parts) >= 6 and parts[-1] == "vdim"
        if dim_major:
            parts.pop()
        edge = parts.pop() if len(parts) == 6 and parts[5] in fp8.V_EDGES else "bytes"
        if len(parts) != 5 or parts[0] not in fp8.CONVERTS or parts[1] not in fp8.LOADS or not all(
                p.isdigit() for p in parts[2:]):
            ap.error(f"--launches: {text!r} is not convert/load/block_n/warps/stages[/v_edge] (e.g. fp16/tma/128/4/3, "
                     f"fp16/tma/128/4/3/operand)")
        launches.append((parts[0], parts[1], *(int(p) for p in parts[2:]), edge, dim_major))
    codes = args.codes.split(",")
    if any(c not in ("fp8", "int8") for c in codes):
        ap.error(f"--codes: {args.codes!r}: expected fp8 and/or int8")
    failures = 0
    print(f"{'launch':22s} {'codes':5s} {'s':>5s} {'regs':>5s} {'stack':>6s} {'smem':>7s} {'bufs':>4s} {'v16':>4s} "
          f"{'lds8':>5s}")
    def build(launch, c) -> str:
        k = compile_decode(*launch[:5], c, v_edge=launch[5], v_dim_major=launch[6], maxnreg=args.maxnreg)
        d, f = describe(k), tile_facts(k, launch[2])
        return (f"{d['regs']:5d} {d['stack']:6d} {d['smem']:7d} {f['bufs']:4d} {'yes' if f['v16'] else 'no':>4s} "
                f"{f['lds8']:5d}")

    for launch in launches:
        for c in codes:
            if (c == "int8" and launch[0] not in fp8.INT8_CONVERTS) or (
                    c != "int8" and launch[5] == "none" and launch[0] != "fp16"):
                continue
            name = "/".join([str(x) for x in launch[:5]] + [launch[5]] * (launch[5] != "bytes")
                            + ["vdim"] * launch[6])
            failures += not timed_row(f"{name:22s} {c:5s}", lambda: build(launch, c))  # noqa: B023
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
