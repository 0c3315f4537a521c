"""The fused RMSNorm kernel against the transformers modules it stands in for.

On a CPU machine the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set by
conftest); the ``gpu`` cases run it compiled, in bf16 too, and inside the engine.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from zipage.kernels import fusable_rms_norms, fused_rms_norms, rms_norm_reference, rms_norm_triton
from zipage.kernels._triton import HAS_TRITON, interpreting

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not HAS_TRITON or not (CUDA or interpreting()), reason="needs triton (GPU or interpreter)")
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
