"""Where does the CUDA generate() path part from plain generate()? Each zipage piece on and off.

    python benchmarks/diagnose_generate.py
"""

from __future__ import annotations

import sys

import torch

sys.path.insert(0, "tests")
from conftest import left_padded_batch, tiny_model  # noqa: E402

import zipage  # noqa: E402,F401
import zipage.cache as cache_mod  # noqa: E402
from zipage.kernels import paged_decode_attention_reference, paged_decode_attention_triton  # noqa: E402

kw = dict(max_new_tokens=30, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)


def logits(model, ids, mask, **extra):
    out = model.generate(ids, attention_mask=mask, **kw, **extra)
    return torch.stack(out.logits, 1), out.sequences


def main():
    for lengths in ((20, 20, 20), (20, 7, 13)):
        model = tiny_model("llama", scale=1.0).cuda()
        ids, mask = left_padded_batch(lengths=lengths)
        ids, mask = ids.cuda(), mask.cuda()
        ref, _ = logits(model, ids, mask)
        cfg = {"cache_implementation": "zipage", "cache_config": {"budget": 96, "page_size": 16}}
        full, _ = logits(model, ids, mask, **cfg)
        orig = cache_mod.use_triton
        cache_mod.use_triton = lambda *t: False  # dense attention, Triton store
        dense, _ = logits(model, ids, mask, **cfg)
        cache_mod.use_triton = orig
        ref_attn = cache_mod.paged_decode_attention
        cache_mod.paged_decode_attention = lambda *a, **k: paged_decode_attention_reference(*a[:6], a[6])
        paged_ref, _ = logits(model, ids, mask, **cfg)
        cache_mod.paged_decode_attention = ref_attn
        gap = lambda a: (a - ref).abs().amax(dim=-1).amax(dim=0)  # noqa: E731
        print(f"lengths {lengths}")
        print("  paged Triton decode   per-step max gap:", [f"{x:.1e}" for x in gap(full)[:8].tolist()])
        print("  dense decode          per-step max gap:", [f"{x:.1e}" for x in gap(dense)[:8].tolist()])
        print("  paged reference decode per-step max gap:", [f"{x:.1e}" for x in gap(paged_ref)[:8].tolist()])
    torch.manual_seed(0)
    for D, page, Hq, Hkv in ((16, 16, 4, 2), (16, 4, 4, 2), (64, 16, 4, 2), (128, 16, 32, 8)):
        for dtype in (torch.float32, torch.bfloat16):
            per_row = -(-80 // page)
            P = 3 * per_row + 2
            k = torch.randn(P, page, Hkv, D, device="cuda").to(dtype)
            v = torch.randn(P, page, Hkv, D, device="cuda").to(dtype)
            table = torch.randperm(P, device="cuda")[: 3 * per_row].view(3, per_row)
            lens = torch.tensor([80, 80, 80], dtype=torch.int32, device="cuda")
            starts = torch.tensor([0, 13, 7], dtype=torch.int32, device="cuda")
            q = torch.randn(3, Hq, D, device="cuda").to(dtype)
            ref = paged_decode_attention_reference(q.float(), k.float(), v.float(), table, lens, D**-0.5, starts)
            out = paged_decode_attention_triton(q, k, v, table, lens, D**-0.5, starts, max_len_hint=80)
            print(f"kernel D={D} page={page} {dtype}: max err {(out.float() - ref).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
