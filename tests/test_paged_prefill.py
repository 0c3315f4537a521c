"""The second prefill kernel (kernels/paged_prefill.py) against the PyTorch reference: in the Triton
interpreter on a CPU (small shapes, every launch variant's code path), compiled on a GPU (every
variant the tuning benchmark times)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import CUDA, requires_triton, tiny_model

from zipage.kernels import paged_prefill_attention_reference, quantize_reference
from zipage.kernels.paged_prefill import PrefillConfig, heads_per_program, paged_prefill_attention_v2

cpu_only = pytest.mark.skipif(CUDA, reason="interpreter case (the GPU runs the gpu cases)")
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in kernel output"
    return ((out - ref).norm() / ref.norm().clamp(min=1e-12)).item()


def make_case(device, dtype, Hq, Hkv, D, page, lens, q_lens, starts=None, fp8=False, seed=0, index=torch.int32,
              codes=torch.float8_e4m3fn):
    """Pools (uninitialized slots filled with NaN: a kernel reading outside its range shows), a
    shuffled page table, packed queries; every sequence's queries are its last ``q_lens[b]`` tokens.
    ``fp8``: 8-bit pages of ``codes`` (e4m3 or int8) with a scale per token and head."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    B = len(lens)
    per_row = max(-(-n // page) for n in lens)
    P = B * per_row + 2
    mag = torch.exp(torch.randn(P, page, Hkv, 1, generator=g))
    k = torch.randn(P, page, Hkv, D, generator=g) * mag
    v = torch.randn(P, page, Hkv, D, generator=g)
    table = torch.randperm(P, generator=g)[: B * per_row].view(B, per_row).to(index)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=index)
    q = torch.randn(int(cu[-1]), Hq, D, generator=g)
    ks = vs = None
    stored = torch.zeros(P, page, dtype=torch.bool)
    for b, n in enumerate(lens):
        pos = torch.arange(n)
        stored[table[b, pos // page].long(), pos % page] = True
    if fp8:
        (k, ks), (v, vs) = quantize_reference(k, codes), quantize_reference(v, codes)
        for codes, scales in ((k, ks), (v, vs)):
            codes.view(torch.uint8)[~stored] = 0x7F  # an e4m3 NaN (compiled; the interpreter reads it as 480)
            scales[~stored] = float("nan")
    else:
        k, v = k.to(dtype), v.to(dtype)
        k[~stored] = float("nan")
        v[~stored] = float("nan")
    kv_lens = torch.tensor(lens, dtype=index)
    kv_starts = torch.tensor(starts or [0] * B, dtype=index)
    to = lambda t: t.to(device) if t is not None else None  # noqa: E731
    return dict(q=to(q.to(dtype)), k_cache=to(k), v_cache=to(v), page_table=to(table), cu_seqlens_q=to(cu),
                kv_lens=to(kv_lens), kv_starts=to(kv_starts), k_scale=to(ks), v_scale=to(vs))


def check(case, dtype, config=None, tol_scale=1.0, **features):
    D = case["q"].shape[-1]
    args = (case["k_cache"], case["v_cache"], case["page_table"], case["cu_seqlens_q"], case["kv_lens"], D**-0.5,
            case["kv_starts"])
    ref = paged_prefill_attention_reference(case["q"].float(), *args, k_scale=case["k_scale"], v_scale=case["v_scale"],
                                            **features)
    out = paged_prefill_attention_v2(case["q"], *args, k_scale=case["k_scale"], v_scale=case["v_scale"],
                                     config=config, **features)
    assert out.dtype == case["q"].dtype and out.shape == case["q"].shape
    assert rel_err(out, ref) < TOL[dtype] * tol_scale, config


# every code path of the kernel at interpreter sizes: packing 1/2/4/8, split or not, both grid orders,
# tiles inside one page and tiles spanning pages, tensor-descriptor tiles (where they apply) and pointer tiles
CPU_CONFIGS = [
    PrefillConfig(block_m=32, block_n=16, num_warps=4, num_stages=1, tma=True),
    PrefillConfig(block_m=64, block_n=16, num_warps=4, num_stages=1, longest_first=False),
    PrefillConfig(block_m=128, block_n=32, num_warps=4, num_stages=1),
    PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=1, pack_gqa=False, split_mask=False),
]
LENS, QLENS = [50, 17, 45, 33, 9], [50, 17, 13, 1, 1]  # a full prompt, prefix-cached ones, single queries


def test_heads_per_program():
    assert [heads_per_program(g, 128, True) for g in (1, 2, 3, 4, 6, 8, 16)] == [1, 2, 1, 4, 2, 8, 8]
    assert heads_per_program(8, 32, True) == 2 and heads_per_program(8, 128, False) == 1


def test_config_is_checked():
    case = make_case("cpu", torch.float32, 2, 1, 16, 16, [5], [5])
    with pytest.raises(ValueError, match="block_n"):
        paged_prefill_attention_v2(case["q"], case["k_cache"], case["v_cache"], case["page_table"],
                                   case["cu_seqlens_q"], case["kv_lens"], 0.25, config=PrefillConfig(block_n=24))
    with pytest.raises(ValueError, match="window"):
        paged_prefill_attention_v2(case["q"], case["k_cache"], case["v_cache"], case["page_table"],
                                   case["cu_seqlens_q"], case["kv_lens"], 0.25, window=0)


@cpu_only
@requires_triton
@pytest.mark.parametrize("Hq, Hkv, configs", [(4, 4, [0, 3]), (8, 2, [0, 1, 2, 3]), (8, 1, [0, 2])])
def test_interpreter_gqa_groups(Hq, Hkv, configs):
    case = make_case("cpu", torch.float32, Hq, Hkv, 16, 16, LENS, QLENS, starts=[0, 0, 3, 0, 2], seed=Hq + Hkv)
    for i in configs:
        check(case, torch.float32, CPU_CONFIGS[i])


@cpu_only
@requires_triton
def test_interpreter_fp16_page_smaller_than_tile_and_odd_head_dim():
    case = make_case("cpu", torch.float16, 6, 2, 24, 8, LENS, QLENS, seed=3)  # G=3 (no packing), D=24 (padded)
    for config in (CPU_CONFIGS[0], CPU_CONFIGS[2]):
        check(case, torch.float16, config)


@cpu_only
@requires_triton
@pytest.mark.parametrize("codes", [torch.float8_e4m3fn, torch.int8])
def test_interpreter_fp8_pages(codes, monkeypatch):
    """8-bit pages: dequantized first into a scratch pool (the default, spied on), and read as codes by the kernel
    (``-codes`` configs, and any config once the scratch would pass its limit)."""
    import zipage.kernels.paged_prefill as pp

    case = make_case("cpu", torch.float16, 8, 2, 16, 16, LENS, QLENS, starts=[0, 4, 0, 0, 0], fp8=True, seed=5,
                     codes=codes)
    calls = []
    real = pp.dequantize_pages
    monkeypatch.setattr(pp, "dequantize_pages", lambda *a: calls.append(1) or real(*a))
    for config in CPU_CONFIGS[:3]:
        check(case, torch.float16, config)
        assert len(calls) == 1, "the 16-bit queries' prefill did not dequantize the pages"
        check(case, torch.float16, dataclasses.replace(config, dequantize=False))
        assert len(calls) == 1
        calls.clear()
    monkeypatch.setattr(pp, "DEQUANTIZE_LIMIT_BYTES", 0)
    check(case, torch.float16, CPU_CONFIGS[0])
    assert not calls, "dequantized past the scratch limit"


def test_bad_arguments_are_refused_before_8bit_pages_are_dequantized(monkeypatch):
    """A bad softmax scale or window on 8-bit pages is named before any scratch pool is allocated or filled."""
    import zipage.kernels.paged_prefill as pp

    case = make_case("cpu", torch.float16, 8, 2, 16, 16, LENS, QLENS, fp8=True, seed=5)
    calls = []
    monkeypatch.setattr(pp, "dequantize_pages", lambda *a: calls.append(1))
    args = (case["q"], case["k_cache"], case["v_cache"], case["page_table"], case["cu_seqlens_q"], case["kv_lens"])
    scales = dict(k_scale=case["k_scale"], v_scale=case["v_scale"])
    with pytest.raises(ValueError, match="scale=0.0: the softmax scale must be positive"):
        paged_prefill_attention_v2(*args, 0.0, **scales)
    with pytest.raises(ValueError, match="window=0: must be >= 1"):
        paged_prefill_attention_v2(*args, 0.25, window=0, **scales)
    with pytest.raises(ValueError, match="block_m"):
        paged_prefill_attention_v2(*args, 0.25, config=pp.PrefillConfig(block_m=0, block_n=16), **scales)
    assert not calls


@pytest.mark.parametrize("interpret", [True, False])
def test_dequantize_pages_equals_the_reference(interpret, monkeypatch):
    """The scratch pool: entry (b, w) of the table at page b * W + w, each slot ``code * scale`` in the queries'
    dtype, as ``dequantize_reference``: bit for bit in PyTorch, within one bf16 step under the interpreter (whose
    float32 -> bf16 cast truncates where the GPU's rounds to nearest)."""
    from zipage.kernels import dequantize_reference
    from zipage.kernels.paged_prefill import HAS_TRITON, dequantize_pages

    if interpret and not HAS_TRITON:
        pytest.skip("needs triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1" if interpret else "0")
    for codes in (torch.float8_e4m3fn, torch.int8):
        case = make_case("cpu", torch.bfloat16, 4, 2, 24, 8, [20, 9, 17], [20, 9, 1], fp8=True, seed=9, codes=codes)
        k, v, table = dequantize_pages(case["k_cache"], case["v_cache"], case["k_scale"], case["v_scale"],
                                       case["page_table"], torch.bfloat16)
        B, W = case["page_table"].shape
        assert k.shape == (B * W, 8, 2, 24) and k.dtype == v.dtype == torch.bfloat16
        assert torch.equal(table, torch.arange(B * W, dtype=table.dtype).view(B, W))
        padded = case["page_table"].clone()
        padded[1, -1] = -1  # a padding entry outside the pool: read as page 0, nothing past the pool
        kp, _, _ = dequantize_pages(case["k_cache"], case["v_cache"], case["k_scale"], case["v_scale"], padded,
                                    torch.bfloat16)
        assert torch.equal(kp[W * 2 - 1].nan_to_num(), dequantize_pages(
            case["k_cache"], case["v_cache"], case["k_scale"], case["v_scale"], padded.clamp(min=0),
            torch.bfloat16)[0][W * 2 - 1].nan_to_num())
        pages = case["page_table"].reshape(-1).long()
        for got, pool, scales in ((k, case["k_cache"], case["k_scale"]), (v, case["v_cache"], case["v_scale"])):
            want = dequantize_reference(pool[pages], scales[pages], torch.bfloat16)
            assert torch.equal(got.isnan(), want.isnan())
            got, want = got.nan_to_num().float(), want.nan_to_num().float()
            if interpret:
                torch.testing.assert_close(got, want, rtol=2**-7, atol=0)
            else:
                assert torch.equal(got, want)


@cpu_only
@requires_triton
@pytest.mark.parametrize("window", [1, 20])
def test_interpreter_window_sinks_softcap(window):
    case = make_case("cpu", torch.float32, 8, 2, 16, 16, LENS, QLENS, starts=[0, 2, 0, 0, 0], seed=window)
    sinks = torch.randn(8) * 2
    check(case, torch.float32, CPU_CONFIGS[0], window=window)
    check(case, torch.float32, CPU_CONFIGS[2], window=window, sinks=sinks, softcap=3.0)
    if window > 1:
        check(case, torch.float32, CPU_CONFIGS[1], window=window)
        check(case, torch.float32, CPU_CONFIGS[0], sinks=sinks)
        check(case, torch.float32, CPU_CONFIGS[1], softcap=2.0)


@cpu_only
@requires_triton
def test_interpreter_empty_rows_and_no_queries():
    """A sequence with no queries in the batch, and queries before their sequence's first stored
    key: rows that see no key give zeros (the reference's convention). int64 tables and lengths."""
    case = make_case("cpu", torch.float32, 4, 2, 16, 16, [20, 30, 12], [5, 0, 12], starts=[0, 0, 5], seed=9,
                     index=torch.int64)
    for config in CPU_CONFIGS[:2]:
        check(case, torch.float32, config)
    sinks = torch.randn(4)
    check(case, torch.float32, CPU_CONFIGS[0], sinks=sinks, window=1)


@cpu_only
@requires_triton
def test_interpreter_head_dims_past_256_take_the_first_kernel(monkeypatch):
    import zipage.kernels.paged_prefill as pp

    ran = []
    first = pp.paged_prefill_attention_triton
    monkeypatch.setattr(pp, "paged_prefill_attention_triton", lambda *a, **k: ran.append(1) or first(*a, **k))
    case = make_case("cpu", torch.float32, 2, 1, 288, 16, [20, 9], [20, 3], seed=11)
    check(case, torch.float32, CPU_CONFIGS[0], softcap=5.0)
    assert ran == [1]


# ----------------------------------------------------------------------------- compiled, on the GPU
def gpu_configs() -> list[PrefillConfig]:
    """Every variant benchmarks/prefill_tune.py times (and the default)."""
    try:
        from zipage.bench.prefill_tune import VARIANTS
    except ImportError:  # run from a checkout without the package installed
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
        from prefill_tune import VARIANTS
    return list(VARIANTS.values())


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_every_variant_gpu(dtype):
    lens, q_lens = [1100, 700, 1300, 2048, 515], [1100, 1, 513, 64, 515]
    case = make_case("cuda", dtype, 32, 8, 128, 256, lens, q_lens, starts=[0, 0, 9, 0, 0], seed=1)
    fp8 = make_case("cuda", dtype, 32, 8, 128, 64, lens, q_lens, starts=[0, 0, 9, 0, 0], fp8=True, seed=2)
    int8 = make_case("cuda", dtype, 32, 8, 128, 256, lens, q_lens, starts=[0, 0, 9, 0, 0], fp8=True, seed=6,
                     codes=torch.int8)
    small_page = make_case("cuda", dtype, 16, 2, 64, 16, lens, q_lens, seed=3)
    d256 = make_case("cuda", dtype, 8, 4, 256, 256, lens, q_lens, seed=4)
    sinks = torch.randn(32, device="cuda")
    for config in (gpu_configs() if dtype == torch.bfloat16 else []) + [None]:  # fp16: the default launch
        check(case, dtype, config)
        check(fp8, dtype, config, tol_scale=1.5)
        check(int8, dtype, config, tol_scale=1.5)
        check(fp8, dtype, dataclasses.replace(config or PrefillConfig(), dequantize=False), tol_scale=1.5)
        check(small_page, dtype, config)
        check(case, dtype, config, window=300, sinks=sinks, softcap=30.0)
    # the default launch above 2,048 queries per sequence (128 x 128 tiles), with a cached prefix
    long = make_case("cuda", dtype, 32, 8, 128, 256, [3000, 2600, 700], [2100, 2600, 1], seed=5)
    check(long, dtype, None)
    check(long, dtype, None, window=1000, sinks=sinks, softcap=30.0)
    for config in (None, PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)):
        check(d256, dtype, config)
        check(d256, dtype, dataclasses.replace(config or PrefillConfig(block_m=64, block_n=32), pack_gqa=False))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_8bit_pages_dequantized_first_gpu(dtype, monkeypatch):
    """FP8 and INT8 pages at the engine's shapes: the default launch dequantizes the step's pages (spied on) and
    matches the reference, as the kernel reading the codes does; long prompts with a cached prefix, and a
    window with sinks and a softcap."""
    import zipage.kernels.paged_prefill as pp

    calls = []
    real = pp.dequantize_pages
    monkeypatch.setattr(pp, "dequantize_pages", lambda *a: calls.append(1) or real(*a))
    sinks = torch.randn(32, device="cuda")
    for codes in (torch.float8_e4m3fn, torch.int8):
        case = make_case("cuda", dtype, 32, 8, 128, 256, [3000, 2600, 700, 515], [2100, 2600, 1, 515],
                         starts=[0, 0, 9, 0], fp8=True, seed=11, codes=codes)
        for features in ({}, dict(window=1000, sinks=sinks, softcap=30.0)):
            calls.clear()
            check(case, dtype, None, tol_scale=1.5, **features)
            assert calls == [1]
            check(case, dtype, pp.parse_config("m128n64w8s3-tma-codes"), tol_scale=1.5, **features)
            assert calls == [1]


def test_default_launch_follows_the_sweep():
    """The engine's launch per case (the H200 sweep in benchmarks/results/prefill/prefill_tune.json);
    tensor descriptors are never used off a CUDA device."""
    from zipage.kernels.paged_prefill import config_name, default_config, tma_applies

    assert config_name(default_config(128, True, 512)) == "m64n64w4s3-tma"
    assert config_name(default_config(128, True, 2048)) == "m64n64w4s3-tma"
    assert config_name(default_config(128, True, 2049)) == "m128n128w8s3-tma"
    assert config_name(default_config(128, True, 4096, fp8=True)) == "m128n64w8s3-tma"
    assert config_name(default_config(256, True, 4096)) == "m64n32w4s2"
    assert config_name(default_config(128, False, 4096)) == "m32n16w4s1"
    pool = torch.zeros(4, 64, 2, 128)
    assert not tma_applies(pool, pool, 64)


def test_config_names_round_trip_and_the_switch(monkeypatch):
    from zipage.kernels import paged_attention
    from zipage.kernels.paged_prefill import config_name, kernel_for, parse_config

    for cfg in CPU_CONFIGS + [PrefillConfig()]:
        assert parse_config(config_name(cfg)) == cfg
    assert config_name(PrefillConfig()) == "m128n64w8s3"
    with pytest.raises(ValueError, match="prefill config"):
        parse_config("m128n64")
    with pytest.raises(ValueError, match="ZIPAGE_PREFILL_KERNEL"):
        kernel_for("v3")
    assert kernel_for("v2:m64n32w4s2").keywords["config"] == PrefillConfig(block_m=64, block_n=32, num_warps=4,
                                                                            num_stages=2)
    # the dispatch runs the kernel the variable names (stand-ins record which one ran)
    seen = []
    monkeypatch.setattr(paged_attention, "use_triton", lambda *t: True)
    monkeypatch.setattr(paged_attention, "paged_prefill_attention_triton", lambda *a, **k: seen.append("v1"))
    monkeypatch.setattr("zipage.kernels.paged_prefill.paged_prefill_attention_v2",
                        lambda *a, **k: seen.append(("v2", k.get("config"))))
    kernel_for.cache_clear()
    case = make_case("cpu", torch.float32, 2, 1, 16, 16, [5], [5])
    args = [case[k] for k in ("q", "k_cache", "v_cache", "page_table", "cu_seqlens_q", "kv_lens")] + [0.25]
    for choice in (None, "v1", "v2", "v2:m64n32w4s2-nosplit"):
        if choice is None:
            monkeypatch.delenv("ZIPAGE_PREFILL_KERNEL", raising=False)
        else:
            monkeypatch.setenv("ZIPAGE_PREFILL_KERNEL", choice)
        paged_attention.paged_prefill_attention(*args)
    kernel_for.cache_clear()
    assert seen == [("v2", None), "v1", ("v2", None), ("v2", parse_config("m64n32w4s2-nosplit"))]


@cpu_only
@requires_triton
def test_tuning_benchmark_smoke(tmp_path):
    """benchmarks/prefill_tune.py end to end at toy sizes: every kernel agrees with gather + SDPA."""
    import json

    import zipage.bench.prefill_tune as tune

    assert tune.main(["--smoke", "--out", str(tmp_path / "t.json")]) == 0
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert [r["case"].split()[0] for r in rows] == ["prompt", "prefix", "chunk", "fp8"]
    for r in rows:
        assert r["kernels"] and all(k["ok"] and k["rel_err"] < 1e-5 for k in r["kernels"].values()), r
    assert {"v1-prefill+decode", "v2-prefill+decode"} <= set(rows[2]["kernels"])


@pytest.mark.parametrize("flag", ["--variants", "--fp8-variants"])
def test_tuning_benchmark_refuses_a_bad_launch_name(flag, tmp_path, capsys):
    import zipage.bench.prefill_tune as tune

    with pytest.raises(SystemExit) as e:
        tune.main(["--smoke", flag, "m64n64w4s3,m64x", "--out", str(tmp_path / "t.json")])
    assert e.value.code == 2 and "prefill config 'm64x'" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("choice, page", [("v2", 16), ("v2:m64n32w4s2-tma", 64)])
def test_engine_with_the_second_kernel_matches_generate_gpu(choice, page, monkeypatch):
    """ZIPAGE_PREFILL_KERNEL runs the engine's prefill (prefix caching and chunked prefill included)
    through the second kernel: the same greedy tokens as generate() (float32)."""
    from test_engine import prompts_of, reference

    from zipage import LLM, SamplingParams

    monkeypatch.setenv("ZIPAGE_PREFILL_KERNEL", choice)
    model = tiny_model("qwen3", scale=1.0).cuda()
    shared = prompts_of((40,), seed=3)[0]
    prompts = prompts_of((12, 90, 7, 150), seed=1) + prompts_of((5, 33), seed=2, prefix=shared)
    llm = LLM(model, budget=None, page_size=page, num_pages=256, enable_prefix_caching=True, max_num_seqs=3,
              max_num_batched_tokens=64)
    outs = llm.generate(prompts, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == reference(model, torch.tensor(prompt).tolist(), 20)


@cpu_only
@requires_triton
def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter accepts code the compiler refuses: benchmarks/prefill_compile.py builds a
    tensor-descriptor variant of the second kernel for sm_90 here (no GPU needed)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "prefill_compile.py"
    r = subprocess.run([sys.executable, str(script), "--variants", "m64n64w4s3-tma", "--features", "bf16", "--only-v2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines() if line.startswith("m64")}
    wgmma, tma = rows["m64n64w4s3-tma"][-3], rows["m64n64w4s3-tma"][-1]
    assert int(wgmma) > 0 and int(tma) > 0, r.stdout  # Hopper MMAs and descriptor copies in the pipelined code
