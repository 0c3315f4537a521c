"""Where FP8 KV loses quality: keys or values, and whether rescaling key channels helps (CPU).

One teacher-forced forward of real math text (``benchmarks/quality.py``'s sequences) through
SmolLM2-135M-Instruct (or Gemma 3 270M, ``--model gemma3``: its keys pass an RMSNorm) with its keys or values rounded through e4m3 (per token and head, as the
FP8 pages store them) right before attention, nothing evicted, against the same forward unrounded:
top-1 agreement and mean KL of the next-token distributions. Variants of the keys:

* ``keys``: per-token scales, as stored;
* ``keys/channel``: each channel first divided by a power of two near its maximum over the
  sequence (so outlier channels stop setting the token's scale), multiplied back after rounding;
* ``keys/channel-sqrt``: the same with the square root of the maximum (half the smoothing);
* ``values``: the values rounded, the keys exact;
* for scale, both rounded to bf16 (what a bf16 deployment stores; 8 significant bits to e4m3's 4).

    python benchmarks/fp8_key_rounding.py [--model smollm2|gemma3] [--seqs 2 --seq-len 1024]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


def e4m3(x: torch.Tensor) -> torch.Tensor:
    """``x`` [..., D] rounded through e4m3 with one scale per row (the FP8 pages' rounding)."""
    from zipage.kernels.fp8 import dequantize_reference, quantize_reference

    return dequantize_reference(*quantize_reference(x)).to(x.dtype)


def channel_smoothed(k: torch.Tensor, power: float) -> torch.Tensor:
    c = k.abs().amax(dim=2, keepdim=True).clamp(min=1e-6) ** power
    c = torch.exp2(torch.round(torch.log2(c)))
    return e4m3(k / c) * c


VARIANTS = {
    "keys": lambda k, v: (e4m3(k), v),
    "keys/channel": lambda k, v: (channel_smoothed(k, 1.0), v),
    "keys/channel-sqrt": lambda k, v: (channel_smoothed(k, 0.5), v),
    "values": lambda k, v: (k, e4m3(v)),
    "keys and values in bf16 (for scale)": lambda k, v: (k.bfloat16().to(k.dtype), v.bfloat16().to(v.dtype)),
}


def main() -> None:
    import quality
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from scorer_comparison import MODELS, load

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    ap.add_argument("--seqs", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    model, tok = load(args.model, args.threads)
    ids, _ = quality.build_sequences(tok, args.seqs, args.seq_len)
    state = {"variant": None}

    def attention(module, q, k, v, mask, **kw):
        if state["variant"] is not None:
            k, v = VARIANTS[state["variant"]](k, v)
        return sdpa_attention_forward(module, q, k, v, mask, **kw)

    AttentionInterface.register("fp8_rounding", attention)
    model.set_attn_implementation("fp8_rounding")

    def log_probs(variant):
        state["variant"] = variant
        with torch.inference_mode():
            return torch.log_softmax(model(ids).logits.float(), -1)

    ref = log_probs(None)
    print(f"{MODELS[args.model]}, float32, {args.seqs} x {args.seq_len} tokens of MATH-500 solutions, nothing evicted\n")
    print("| rounded through e4m3 | top-1 agreement | mean KL (nats) |")
    print("|---|---|---|")
    for name in VARIANTS:
        lp = log_probs(name)
        top1 = (lp.argmax(-1) == ref.argmax(-1)).float().mean().item()
        kl = (ref.exp() * (ref - lp)).sum(-1).mean().item()
        print(f"| {name} | {100 * top1:.2f}% | {kl:.5f} |")


if __name__ == "__main__":
    main()
