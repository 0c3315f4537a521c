"""The engine's fused kernels on Gemma 3 and GPT-OSS (``zipage.engine.fusion``, Triton's interpreter
on a CPU): what the probes pick and that the model computes the same logits with them in place.

Gemma 3's norms are ``x * (1 + w)``: the RMSNorm kernel (``x * w``) must leave them alone. Its RoPE
differs per layer type (a local base for sliding layers), which the fused rotary function gets as
each layer's ``cos``/``sin``: the logits show whether it is applied per layer as the model does.
"""

from __future__ import annotations

import pytest
import torch
from conftest import requires_triton, tiny_sliding_model

from zipage.engine.fusion import ModelFusion

pytestmark = requires_triton


@pytest.mark.parametrize("family", ["gemma3", "gpt_oss"])
def test_fusion_keeps_the_logits(family):
    model = tiny_sliding_model(family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:  # (Gemma's zero-initialised (1 + w) weights would hide a swap)
                p.normal_(0.0, 0.3)
    ids = torch.randint(3, 96, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    fusion = ModelFusion.find(model)
    norm_types = {type(m).__name__ for m in fusion.norms}
    if family == "gemma3":
        assert not fusion.norms  # Gemma3RMSNorm is (1 + w): not the kernel's formula
        assert fusion.rope_module is not None  # the standard rotate-half layout, per layer cos/sin
    else:
        assert norm_types == {"GptOssRMSNorm"}
    assert fusion.merged  # q/k/v merged into one GEMM per attention
    with torch.no_grad(), fusion.applied():
        out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
