"""The fused RMSNorm, RoPE and SiLU-gate kernels against the transformers code they stand in for,
and the model surgery that puts them in a model's forwards (``zipage.engine.fusion``).

On a CPU machine the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by
conftest); on a GPU the same tests run them compiled, in bf16 too, and the ``gpu`` case runs
them inside the engine.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CUDA, FAMILIES, requires_triton, tiny_model
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from zipage.engine.fusion import (
    ModelFusion,
    fusable_rms_norms,
    fusable_rope,
    fused_rms_norms,
    fused_rope,
    merge_projections,
    merged_projections,
)
from zipage.kernels import (
    rms_norm,
    rms_norm_reference,
    rms_norm_triton,
    rope,
    rope_reference,
    rope_triton,
    silu_mul,
    silu_mul_reference,
    silu_mul_triton,
)

pytestmark = requires_triton
DEV = "cuda" if CUDA else "cpu"


class OnePlusRMSNorm(torch.nn.Module):
    """Another formula under the same kind of name (Gemma-style ``x * (1 + w)``): must not be fused."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n) * 0.1)
        self.eps = 1e-6

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight.float())).to(x.dtype)


def _module(cls, n: int, dtype: torch.dtype, eps: float = 1e-6):
    m = cls(n, eps=eps).to(DEV, dtype)
    with torch.no_grad():
        m.weight.normal_(1.0, 0.2)
    return m


@pytest.mark.parametrize("cls", [LlamaRMSNorm, Qwen3RMSNorm])
@pytest.mark.parametrize("n", [64, 100, 576])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else []))
@pytest.mark.parametrize("eps", [1e-6, 0.5])
def test_kernel_matches_the_module(cls, n, dtype, eps):
    m = _module(cls, n, dtype, eps)
    x = torch.randn(3, 5, n, device=DEV).to(dtype)
    ref = m(x)
    out = rms_norm_triton(x, m.weight, m.variance_epsilon)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    # same formula, only the order of the sum of squares differs: at most one unit of the last place
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(rms_norm_reference(x, m.weight, m.variance_epsilon).float(), ref.float(), rtol=0, atol=0)


def test_kernel_handles_strided_rows_and_mixed_dtypes():
    w = torch.randn(96, device=DEV)  # float32 weight over float16 activations: promoted output, as torch does
    x = torch.randn(4, 2 * 96, device=DEV, dtype=torch.float16)[:, ::2]
    out = rms_norm_triton(x, w, 1e-5)
    ref = rms_norm_reference(x, w, 1e-5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="weight"):
        rms_norm_triton(x, torch.ones(5, device=DEV), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else []))
def test_per_head_norm_reads_a_merged_projection_slice_in_place(dtype):
    """q_norm / k_norm over the query part of a merged q/k/v output, viewed as heads ([1, T, H, D], rows 48 heads
    apart): read where it lies (no copy first), several rows a program, each row as the module normalises it."""
    from zipage.kernels.rmsnorm import _row_view

    T, H, D = 37, 32, 64
    m = _module(Qwen3RMSNorm, D, dtype)
    qkv = torch.randn(1, T, 48 * D, device=DEV).to(dtype)
    x = qkv[..., : H * D].view(1, T, H, D)
    assert not x.is_contiguous() and _row_view(x, D)[0] is x  # folds to [T, H] rows in place
    out = rms_norm_triton(x, m.weight, m.variance_epsilon)
    assert out.shape == x.shape and out.is_contiguous()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), m(x).float(), rtol=tol, atol=tol)
    y = torch.randn(3, 2, T, D, device=DEV).to(dtype).transpose(0, 1)  # leading dims that do not fold: a copy
    assert _row_view(y, D)[0] is not y
    torch.testing.assert_close(rms_norm_triton(y, m.weight, m.variance_epsilon).float(), m(y).float(), rtol=tol,
                               atol=tol)


def test_only_modules_the_kernel_reproduces_are_fused_and_forwards_come_back():
    model = torch.nn.Sequential(_module(Qwen3RMSNorm, 64, torch.float32), OnePlusRMSNorm(64).to(DEV),
                                torch.nn.Linear(64, 64).to(DEV), _module(LlamaRMSNorm, 32, torch.float32))
    found = fusable_rms_norms(model)
    assert found == [model[0], model[3]]
    x = torch.randn(2, 64, device=DEV)
    calls = []

    def counting(x, w, eps):
        calls.append(x.shape)
        return rms_norm_triton(x, w, eps)

    with fused_rms_norms(found, kernel=counting):
        y = model[0](x)
        model[1](x)
    assert calls == [x.shape]  # the one fused module went through the kernel, the other did not
    torch.testing.assert_close(y, Qwen3RMSNorm.forward(model[0], x), rtol=1e-6, atol=1e-6)
    assert all("forward" not in vars(m) for m in model)  # the model is as it was
    model[0](x)
    assert len(calls) == 1


# --------------------------------------------------------------------------------------- RoPE
def _rope_inputs(B, H, T, D, dtype, transposed=True):
    g = torch.Generator().manual_seed(1)
    # the layout the attention modules produce: [B, T, H, D] projections viewed as [B, H, T, D]
    x = torch.randn(B, T, H, D, generator=g).to(DEV, dtype)
    x = x.transpose(1, 2) if transposed else x.permute(0, 2, 1, 3).contiguous()
    angle = torch.rand(B, T, D // 2, generator=g) * 20
    cos = torch.cat([angle.cos()] * 2, -1).to(DEV, dtype)
    sin = torch.cat([angle.sin()] * 2, -1).to(DEV, dtype)
    return x, cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else []))
@pytest.mark.parametrize("transposed", [True, False])
@pytest.mark.parametrize("D, Hq", [(64, 4), (128, 4), (96, 4), (128, 40)])  # 40 heads: two programs a token
def test_rope_kernel_matches_the_transformers_function(dtype, transposed, D, Hq):
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

    q, cos, sin = _rope_inputs(2, Hq, 5, D, dtype, transposed)
    k, _, _ = _rope_inputs(2, 2, 5, D, dtype, transposed)
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin)
    out_q, out_k = rope_triton(q, cos, sin), rope_triton(k, cos, sin)
    for out, ref in ((out_q, ref_q), (out_k, ref_k)):
        assert out.shape == ref.shape and out.dtype == ref.dtype
        # the kernel rounds once, the eager ops after each product and the sum: one unit in the last place
        ulp = {torch.float32: 2.0**-22, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
        torch.testing.assert_close(out, ref, rtol=ulp, atol=4 * ulp)
        exact = rope_reference(x=q.double() if out is out_q else k.double(), cos=cos.double(), sin=sin.double())
        # and it is closer to the exact rotation than the eager ops are
        assert (out.double() - exact).abs().max() <= (ref.double() - exact).abs().max() + 1e-12
    torch.testing.assert_close(rope_reference(q, cos, sin), ref_q, rtol=0, atol=0)


def test_rope_swap_covers_the_model_and_falls_back_elsewhere():
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from transformers.models.qwen3 import modeling_qwen3

    cfg = Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = Qwen3ForCausalLM(cfg).to(DEV)
    module = fusable_rope(model)
    assert module is modeling_qwen3
    original = modeling_qwen3.apply_rotary_pos_emb
    calls = []

    def counting(x, cos, sin):
        calls.append(x.shape)
        return rope_triton(x, cos, sin)

    ids = torch.randint(0, 64, (2, 7), device=DEV)
    with torch.no_grad():
        ref = model(ids).logits
        with fused_rope(module, kernel=counting):
            assert modeling_qwen3.apply_rotary_pos_emb is not original
            assert fusable_rope(model) is modeling_qwen3  # (another engine built meanwhile finds it fusable too)
            out = model(ids).logits
            q, cos, sin = _rope_inputs(1, 2, 3, 16, torch.float32)
            q = q.transpose(1, 2)  # [B, T, H, D] with unsqueeze_dim=2: not covered, the original runs
            got = modeling_qwen3.apply_rotary_pos_emb(q, q, cos, sin, unsqueeze_dim=2)
            torch.testing.assert_close(got[0], original(q, q, cos, sin, unsqueeze_dim=2)[0], rtol=0, atol=0)
    assert modeling_qwen3.apply_rotary_pos_emb is original
    assert len(calls) == 2 * cfg.num_hidden_layers  # q and k of every layer, nothing else
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_rope_swap_is_per_thread_and_restored_when_no_thread_is_inside():
    """Two engines on models of one family (one modeling module) in two threads, their forwards overlapping
    (A's block opened first and closed first): B's forward after A left still runs B's kernel, a third thread
    outside any block runs the module's own function meanwhile, a model checked for fusion then sees the module's
    own function, and once neither is inside, the module has its own function back."""
    import threading
    import types

    mod = types.ModuleType("zipage_test_fake_modeling")

    def original(q, k, cos, sin, *args, **kwargs):
        calls.append(("own", threading.current_thread().name))
        return q, k

    def kernel_of(tag):
        def kernel(x, cos, sin):
            calls.append((tag, threading.current_thread().name))
            return x

        return kernel

    mod.apply_rotary_pos_emb = original
    calls = []
    q, cos, sin = _rope_inputs(1, 2, 3, 16, torch.float32)
    a_in, b_in, a_out, b_done = (threading.Event() for _ in range(4))

    def engine_a():
        with fused_rope(mod, kernel=kernel_of("a")):
            a_in.set()
            assert b_in.wait(30)
            mod.apply_rotary_pos_emb(q, q, cos, sin)
        a_out.set()

    def engine_b():
        assert a_in.wait(30)
        with fused_rope(mod, kernel=kernel_of("b")):
            b_in.set()
            assert a_out.wait(30)
            mod.apply_rotary_pos_emb(q, q, cos, sin)  # (A's block closed: B's still open)
            other = threading.Thread(target=mod.apply_rotary_pos_emb, args=(q, q, cos, sin), name="plain")
            other.start()
            other.join(30)
            assert getattr(mod.apply_rotary_pos_emb, "zipage_original", None) is original
        b_done.set()

    threads = [threading.Thread(target=engine_a, name="A"), threading.Thread(target=engine_b, name="B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    assert b_done.is_set()
    assert calls == [("a", "A"), ("a", "A"), ("b", "B"), ("b", "B"), ("own", "plain")]
    assert mod.apply_rotary_pos_emb is original


def test_rope_swap_tells_two_modules_of_one_name_apart():
    """Two modeling modules of one name (a module reloaded, remote code loaded twice), their blocks overlapping:
    each runs its own block's kernel and gets its own function back."""
    import types

    q, cos, sin = _rope_inputs(1, 2, 3, 16, torch.float32)
    mods = [types.ModuleType("zipage_test_same_name") for _ in range(2)]
    owns = []
    for i, mod in enumerate(mods):
        def own(q, k, cos, sin, *args, __i=i, **kwargs):
            return ("own", __i)

        mod.apply_rotary_pos_emb = own
        owns.append(own)
    kernels = [lambda x, c, s: "k0", lambda x, c, s: "k1"]
    first, second = fused_rope(mods[0], kernel=kernels[0]), fused_rope(mods[1], kernel=kernels[1])
    first.__enter__()
    second.__enter__()
    assert [m.apply_rotary_pos_emb(q, q, cos, sin) for m in mods] == [("k0", "k0"), ("k1", "k1")]
    first.__exit__(None, None, None)
    second.__exit__(None, None, None)
    assert [m.apply_rotary_pos_emb for m in mods] == owns


# ----------------------------------------------------------------------------- merged projections


@pytest.mark.parametrize("n", [64, 100, 1500])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else []))
def test_silu_mul_kernel_matches_the_module_math(n, dtype):
    h = (torch.randn(3, 5, 2 * n, device=DEV) * 4).to(dtype)
    ref = torch.nn.functional.silu(h[..., :n]) * h[..., n:]
    out = silu_mul_triton(h)
    assert out.dtype == dtype and out.shape == ref.shape
    # the same two roundings as the module; exp may differ by an ulp in float32, so one unit at most
    tol = 1e-6 if dtype == torch.float32 else (1e-2 if dtype == torch.bfloat16 else 2e-3)
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(silu_mul_reference(h), ref, rtol=0, atol=0)
    strided = torch.randn(4, 4 * n, device=DEV).to(dtype)[:, ::2]
    torch.testing.assert_close(silu_mul_triton(strided).float(), silu_mul_reference(strided).float(), rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="gate and up"):
        silu_mul_triton(h[..., :-1])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_merged_projections_keep_the_model_and_its_outputs(family):
    model = tiny_model(family).to(DEV)
    L = model.config.num_hidden_layers
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    ids = torch.randint(3, 96, (2, 9), device=DEV)
    with torch.no_grad():
        ref = model(ids).logits
    calls = []

    def counting(h):
        calls.append(h.shape)
        return silu_mul_reference(h)

    groups = merge_projections(model, kernel=counting)
    calls.clear()  # the probe of each MLP class ran once
    assert sorted(g.mlp for g in groups) == [False] * L + [True] * L
    # same parameters, same values, no copies: q/k/v (and gate/up) are slices of one tensor
    assert dict(model.named_parameters()) == params
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.weight.data_ptr() == attn.q_proj.weight[attn.q_proj.weight.shape[0] - 1].data_ptr() + \
        attn.q_proj.weight.shape[1] * attn.q_proj.weight.element_size()
    with torch.no_grad(), merged_projections(groups, kernel=counting):
        out = model(ids).logits
        assert "forward" in vars(attn.k_proj)
        x = torch.randn(3, model.config.hidden_size, device=DEV)  # another input: the plain projection
        torch.testing.assert_close(attn.v_proj(x), torch.nn.functional.linear(x, attn.v_proj.weight, attn.v_proj.bias))
    assert len(calls) == L
    assert all(not g.stash for g in groups)
    # a second engine on the same model finds the weights merged already: no copy, both groups intact
    again = merge_projections(model, kernel=counting)
    assert [g.weight.data_ptr() for g in again] == [g.weight.data_ptr() for g in groups]
    assert all(g.intact() for g in groups + again)
    assert all("forward" not in vars(m) for m in model.modules())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_groups_whose_weights_moved_or_other_mlps_are_left_alone():
    model = tiny_model("llama", hidden_act="gelu").to(DEV)  # a GELU MLP: its gate/up stay separate GEMMs
    groups = merge_projections(model, kernel=silu_mul_reference)
    assert [g.mlp for g in groups] == [False] * model.config.num_hidden_layers

    class SumMLP(torch.nn.Module):  # silu act_fn, but another formula: the probe rejects it
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = (torch.nn.Linear(8, 16), torch.nn.Linear(8, 16),
                                                            torch.nn.Linear(16, 8))
            self.act_fn = torch.nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))

    assert merge_projections(SumMLP().to(DEV), kernel=silu_mul_reference) == []
    # weights pointed elsewhere after merging (a reload, a move): that group runs its own forwards
    attn = model.model.layers[1].self_attn
    with torch.no_grad():
        attn.k_proj.weight.data = attn.k_proj.weight.data.clone()
    ids = torch.randint(3, 96, (1, 6), device=DEV)
    with torch.no_grad():
        ref = model(ids).logits
        with merged_projections(groups, kernel=silu_mul_reference):
            assert "forward" not in vars(attn.q_proj) and "forward" in vars(model.model.layers[0].self_attn.q_proj)
            out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_a_merged_model_still_saves_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("qwen2")  # q/k/v with biases
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        ref = model(ids).logits
    assert merge_projections(model, kernel=silu_mul_reference)
    model.save_pretrained(tmp_path)  # slices of one storage: safetensors must still accept them
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ref, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------- dispatch, surgery
def test_dispatch_functions_pick_the_kernel_for_cuda_and_the_reference_elsewhere():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(3, 64, generator=g).to(DEV), torch.randn(64, generator=g).to(DEV)
    q, cos, sin = _rope_inputs(2, 4, 5, 32, torch.float32)
    h = torch.randn(3, 128, generator=g).to(DEV)
    pairs = [(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6)), (rope(q, cos, sin), rope_reference(q, cos, sin)),
             (silu_mul(h), silu_mul_reference(h))]
    for got, ref in pairs:
        assert got.shape == ref.shape and got.dtype == ref.dtype
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_model_fusion_applies_every_kernel_and_undoes_every_patch():
    from transformers.models.qwen3 import modeling_qwen3

    model = tiny_model("qwen3").to(DEV)
    L = model.config.num_hidden_layers
    ids = torch.randint(3, 96, (1, 6), device=DEV)
    original = modeling_qwen3.apply_rotary_pos_emb
    with torch.no_grad():
        ref = model(ids).logits
        fusion = ModelFusion.find(model)
        # per layer: input, post-attention, q and k norms; plus the final norm
        assert len(fusion.norms) == 4 * L + 1 and fusion.rope_module is modeling_qwen3
        assert sorted(g.mlp for g in fusion.merged) == [False] * L + [True] * L
        with fusion.applied():
            assert modeling_qwen3.apply_rotary_pos_emb is not original
            assert all("forward" in vars(m) for m in fusion.norms)
            out = model(ids).logits
        assert modeling_qwen3.apply_rotary_pos_emb is original
        assert all("forward" not in vars(m) for m in model.modules())
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)  # the model computes as before
    assert not ModelFusion() and fusion


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_engine_with_fused_ops_on_cuda_gives_the_tokens_of_the_plain_model(family):
    from zipage import LLM, SamplingParams

    model = tiny_model(family, scale=1.0).cuda()
    prompts = [torch.randint(3, 96, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 23, 40)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    outs = {}
    for fuse in (False, True):
        llm = LLM(model, budget=16, page_size=4, buffer=4, num_pages=128, fuse_ops=fuse)
        assert bool(llm.runner.fusion) is fuse
        if fuse:
            assert llm.runner.fusion.norms and llm.runner.fusion.rope_module and llm.runner.fusion.merged
        outs[fuse] = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert all("forward" not in vars(m) for m in model.modules())
    assert outs[True] == outs[False]
