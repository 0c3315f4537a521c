"""Where 8-bit KV pages lose quality: keys or values, e4m3 or int8 codes, and what helps (CPU).

One teacher-forced forward of real math text (``benchmarks/quality.py``'s sequences) through
SmolLM2-135M-Instruct (or Gemma 3 270M, ``--model gemma3``: its keys pass an RMSNorm) with its keys
or values rounded right before attention (per token and head, as the quantized pages store them),
nothing evicted, against the same forward unrounded: top-1 agreement and mean KL of the next-token
distributions. Variants (``VARIANTS``; ``--variants`` picks some):

* ``keys``: e4m3 codes with per-token scales, as ``kv_cache_dtype="fp8"`` stores them;
* ``keys/channel``, ``keys/channel-sqrt``: each channel first divided by a power of two near its
  maximum over the sequence (or its square root), multiplied back after rounding;
* ``keys - mean of ...``: a per-channel mean subtracted before rounding and kept exactly (of the
  first tokens: one offset per sequence and head, which softmax ignores; of each page: one per page;
  of the whole sequence: an oracle);
* ``int8``: int8 codes, ``round(x / s)`` with ``s = max|x| / 127`` (``kv_cache_dtype="int8"``);
* ``values``: the values rounded, the keys exact;
* ``rotated``: rounded in a Hadamard-rotated basis (``round(x H) H``): pages that store ``x H``, with
  the queries rotated the same way, give every dot product and norm unchanged, and an outlier
  channel's size is spread over all channels before the per-token scale is taken;
* ``query-weighted``: e4m3 keys whose scale search compares candidates by what their rounding does to the
  logits of the layer's queries, ``e^T (m m^T + diag(var)) e`` (``kernels/fp8.py``'s ``query_weights``, what FP8
  pages do), the moments from ``--calibration`` text (queries of other text than the scored; the pages count
  their prompts'), or, with ``own queries``, from the scored sequences' own queries;
* for scale, both rounded to bf16 (what a bf16 deployment stores; 8 significant bits to e4m3's 4).

    python benchmarks/fp8_key_rounding.py [--model smollm2|gemma3] [--seqs 2 --seq-len 1024] [--variants 'a;b']
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


# The query weights of the layer being rounded (set by the attention hook: its index, and per basis the moments'
# weights of the calibration text's queries and of the scored sequences' own)
WEIGHTS: dict = {}


def e4m3_weighted(k: torch.Tensor, source: str, basis: str = "plain") -> torch.Tensor:
    """Keys ``[B, H, S, D]`` rounded through e4m3 by the query-weighted search (``source``: "calibration" or
    "own"; ``basis``: "plain" or "rotated", the queries' moments in the basis the keys are rounded in)."""
    from zipage.kernels.fp8 import FP8, dequantize_reference, quantize_reference

    w = WEIGHTS[(source, basis)]
    rows = k.transpose(1, 2)  # [B, S, H, D]: the weights are per head
    return dequantize_reference(*quantize_reference(rows, FP8, w)).to(k.dtype).transpose(1, 2)


def channel_smoothed(k: torch.Tensor, power: float) -> torch.Tensor:
    c = k.abs().amax(dim=2, keepdim=True).clamp(min=1e-6) ** power
    c = torch.exp2(torch.round(torch.log2(c)))
    return e4m3(k / c) * c


def mean_offset(k: torch.Tensor, span: int | None, per_block: bool, rounding=None) -> torch.Tensor:
    """Keys rounded as ``rounding(k - m) + m`` (e4m3 by default), ``m`` a per-channel mean kept exactly
    beside the pages: of the first ``span`` tokens (one offset per sequence and head: a query's logits
    all shift by the same ``q . m``, which softmax ignores, so attention needs no change), of every
    ``span``-token block (one per page: a query adds ``q . m`` back per page), or of the whole
    sequence (``span=None``, an oracle)."""
    rounding = rounding or e4m3
    S = k.shape[2]
    if span is None:
        m = k.mean(dim=2, keepdim=True)
        return rounding(k - m) + m
    if not per_block:
        m = k[:, :, :span].mean(dim=2, keepdim=True)
        return rounding(k - m) + m
    out = torch.empty_like(k)
    for a in range(0, S, span):
        blk = k[:, :, a:a + span]
        m = blk.mean(dim=2, keepdim=True)
        out[:, :, a:a + span] = rounding(blk - m) + m
    return out


def int8(x: torch.Tensor) -> torch.Tensor:
    """``x`` [..., D] rounded through int8 codes with one scale per row (max|x| / 127; the INT8
    pages' rounding, ``kv_cache_dtype="int8"``): the same bytes as e4m3."""
    from zipage.kernels.fp8 import INT8, dequantize_reference, quantize_reference

    return dequantize_reference(*quantize_reference(x, INT8)).to(x.dtype)


def rotated(x: torch.Tensor, rounding) -> torch.Tensor:
    """``x`` rounded in a rotated basis: ``round(x H) H``. Storing ``x H`` and rotating the queries
    the same way leaves every dot product, norm and cosine unchanged, so only the rounding differs."""
    from zipage.kernels.fp8 import _hadamard

    h = _hadamard(x.shape[-1], str(x.device)).to(x.dtype)  # (the INT8 pages' rotation)
    return rounding(x @ h) @ h


VARIANTS = {
    "keys": lambda k, v: (e4m3(k), v),
    "keys/channel": lambda k, v: (channel_smoothed(k, 1.0), v),
    "keys/channel-sqrt": lambda k, v: (channel_smoothed(k, 0.5), v),
    "keys - mean of the first 256 tokens": lambda k, v: (mean_offset(k, 256, False), v),
    "keys - mean of the first 16 tokens": lambda k, v: (mean_offset(k, 16, False), v),
    "keys - mean of each 256-token page": lambda k, v: (mean_offset(k, 256, True), v),
    "keys - mean of each 16-token page": lambda k, v: (mean_offset(k, 16, True), v),
    "keys - sequence mean (oracle)": lambda k, v: (mean_offset(k, None, False), v),
    "values": lambda k, v: (k, e4m3(v)),
    "keys and values e4m3": lambda k, v: (e4m3(k), e4m3(v)),
    "keys as int8": lambda k, v: (int8(k), v),
    "keys as int8, values e4m3": lambda k, v: (int8(k), e4m3(v)),
    "keys and values int8": lambda k, v: (int8(k), int8(v)),
    "keys int8 - mean of the first 256 tokens, values int8": lambda k, v: (mean_offset(k, 256, False, int8), int8(v)),
    "keys int8 - mean of each 16-token page, values int8": lambda k, v: (mean_offset(k, 16, True, int8), int8(v)),
    "keys int8 - sequence mean (oracle), values int8": lambda k, v: (mean_offset(k, None, False, int8), int8(v)),
    "keys rotated (Hadamard), e4m3": lambda k, v: (rotated(k, e4m3), v),
    "keys and values rotated, e4m3": lambda k, v: (rotated(k, e4m3), rotated(v, e4m3)),
    "keys rotated, values e4m3": lambda k, v: (rotated(k, e4m3), e4m3(v)),
    "keys rotated, int8": lambda k, v: (rotated(k, int8), v),
    "keys and values rotated, int8": lambda k, v: (rotated(k, int8), rotated(v, int8)),
    "keys - mean of the first 16 tokens, values e4m3": lambda k, v: (mean_offset(k, 16, False), e4m3(v)),
    "keys - mean of the first 64 tokens, values e4m3": lambda k, v: (mean_offset(k, 64, False), e4m3(v)),
    "keys - mean of the first 16 tokens, rotated, values e4m3":
        lambda k, v: (mean_offset(k, 16, False, lambda x: rotated(x, e4m3)), e4m3(v)),
    "keys - mean of the first 16 tokens, keys and values rotated":
        lambda k, v: (mean_offset(k, 16, False, lambda x: rotated(x, e4m3)), rotated(v, e4m3)),
    "keys and values in bf16 (for scale)": lambda k, v: (k.bfloat16().to(k.dtype), v.bfloat16().to(v.dtype)),
    "keys and values e4m3, query-weighted keys": lambda k, v: (e4m3_weighted(k, "calibration"), e4m3(v)),
    "query-weighted keys (values exact)": lambda k, v: (e4m3_weighted(k, "calibration"), v),
    "keys and values e4m3, query-weighted keys (own queries)": lambda k, v: (e4m3_weighted(k, "own"), e4m3(v)),
    "keys and values rotated, e4m3, query-weighted keys":
        lambda k, v: (rotated(k, lambda x: e4m3_weighted(x, "calibration", "rotated")), rotated(v, e4m3)),
    "keys and values e4m3, query-weighted keys, rotated where it helps": lambda k, v: (
        (rotated(k, lambda x: e4m3_weighted(x, "calibration", "rotated")), rotated(v, e4m3)) if WEIGHTS["rotate"]
        else (e4m3_weighted(k, "calibration"), e4m3(v))),
}


def logit_error(q: torch.Tensor, k: torch.Tensor, rounded: torch.Tensor, scaling: float) -> float:
    """What ``rounded`` keys do to causal attention of the queries ``q`` (``[B, Hq, S, D]``, the keys ``[B, Hkv, S,
    D]``): the variance, under each query's attention weights ``p``, of the change ``d`` of its logits, averaged
    over the queries (``sum p d^2 - (sum p d)^2``: to first order twice the KL the rounding puts between a query's
    attention weights and the exact ones)."""
    g = q.shape[1] // k.shape[1]
    kk, e = k.repeat_interleave(g, dim=1).float(), (rounded - k).repeat_interleave(g, dim=1).float()
    qf = q.float()
    S = q.shape[2]
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    p = torch.softmax((qf @ kk.transpose(-1, -2) * scaling).masked_fill(~causal, float("-inf")), dim=-1)
    d = (qf @ e.transpose(-1, -2)) * scaling
    return ((p * d * d).sum(-1) - (p * d).sum(-1).pow(2)).mean().item()

# Variants whose last ``W`` tokens before each query (itself included) stay exact, the rest rounded as
# the named variant: pages that keep a short tail of recent tokens in the model's dtype until it is
# quantized. Name: "<variant>, last W exact".
RECENT = {f"{base}, last {w} exact": (base, w, 0)
          for base in ("keys and values e4m3", "keys and values rotated, e4m3", "keys and values e4m3, query-weighted "
                       "keys", "keys and values rotated, e4m3, query-weighted keys") for w in (1, 2, 4, 8, 16, 64, 128, 256)}
# ... and the first ``F`` tokens of the sequence exact too (where attention sinks sit): "<variant>, first F and
# last W exact"
RECENT.update({f"{base}, first {f} and last {w} exact": (base, w, f)
               for base in ("keys and values e4m3", "keys and values rotated, e4m3") for f in (1, 4, 16)
               for w in (0, 16)})
RECENT.update({f"{base}, last 64 exact": (base, 64, 0) for base in ("values", "query-weighted keys (values exact)",
               "keys and values e4m3, query-weighted keys, rotated where it helps")})
RECENT.update({f"{base}, first {f} and last 64 exact": (base, 64, f)
               for base in ("keys and values e4m3, query-weighted keys",
                            "keys and values rotated, e4m3, query-weighted keys") for f in (1, 4, 16)})


def recent_exact_attention(q, k, v, mask, scaling, rounded, w, first=0):
    """Causal attention of ``q`` [B, Hq, S, D] over keys/values [B, Hkv, S, D] where a query at
    position ``i`` reads keys ``j > i - w`` (and ``j < first``) exactly and the others as ``rounded(k, v)``
    does."""
    kr, vr = rounded(k, v)
    g = q.shape[1] // k.shape[1]
    k, v, kr, vr = (t.repeat_interleave(g, dim=1) for t in (k, v, kr, vr))
    S = q.shape[2]
    i = torch.arange(S).view(-1, 1)
    j = torch.arange(S).view(1, -1)
    near = (j <= i) & ((j > i - w) | (j < first))
    allowed = j <= i
    if mask is not None:
        allowed = allowed & (mask if mask.dtype == torch.bool else mask > -1e30)[..., -S:]
    logits = torch.where(near, q @ k.transpose(-1, -2), q @ kr.transpose(-1, -2)) * scaling
    p = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    out = (p * near) @ v + (p * ~near) @ vr
    return out.transpose(1, 2).contiguous()


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
    ap.add_argument("--variants", default="", help="variant names separated by ';' (default: all of VARIANTS)")
    ap.add_argument("--calibration", default="math_train",
                    help="the text whose queries' moments weight the query-weighted variants (2 x 1,024 tokens of "
                         "a split of MATH), or 'zipage': the engine's fixed calibration text "
                         "(ZIPAGE_FP8_QUERY_WEIGHTS=calibrated; zipage/calibration.py)")
    ap.add_argument("--reference", default="float32", choices=["float32", "bf16"],
                    help="what every variant is scored against: the model's float32 keys and values (default), or "
                         "keys and values rounded to bf16, what a bf16 deployment stores (every variant then rounds "
                         "the bf16 keys and values, and its exact tokens are the bf16 ones)")
    ap.add_argument("--layers", default="",
                    help="round only in these layers (comma-separated indices; default: every layer), or 'each': "
                         "every variant once per layer, that layer alone rounded")
    args = ap.parse_args()
    model, tok = load(args.model, args.threads)
    ids, _ = quality.build_sequences(tok, args.seqs, args.seq_len)
    state = {"variant": None, "calibrating": False}
    moments: dict = {}  # (layer, basis) -> the calibration text's query moments
    rotate_layer: dict = {}  # layer -> whether its calibration keys round better rotated (by their logit error)

    def attention(module, q, k, v, mask, **kw):
        if args.reference == "bf16":
            k, v = k.bfloat16().to(k.dtype), v.bfloat16().to(v.dtype)
        if state.get("layers") is not None and module.layer_idx not in state["layers"]:
            return sdpa_attention_forward(module, q, k, v, mask, **kw)
        if state["calibrating"] or "query-weighted" in (state["variant"] or ""):
            from zipage.kernels.fp8 import _hadamard, query_weights

            h = _hadamard(q.shape[-1], str(q.device))
            for basis, x in (("plain", q), ("rotated", q.float() @ h)):
                rows = x.transpose(1, 2).reshape(-1, k.shape[1], q.shape[1] // k.shape[1], q.shape[-1]).double()
                own = (rows.sum(dim=(0, 2)), (rows * rows).sum(dim=(0, 2)), rows.shape[0] * rows.shape[2])
                if state["calibrating"]:
                    moments[(module.layer_idx, basis)] = own
                    WEIGHTS[("calibration", basis)] = query_weights(*own)
                else:
                    WEIGHTS[("own", basis)] = query_weights(*own)
                    WEIGHTS[("calibration", basis)] = query_weights(*moments[(module.layer_idx, basis)])
            if state["calibrating"] and choose_rotation:  # rotate this layer where that rounds calibration keys better
                scaling = kw.get("scaling") or module.scaling
                plain = logit_error(q, k, e4m3_weighted(k, "calibration"), scaling)
                rot = logit_error(q, k, rotated(k, lambda x: e4m3_weighted(x, "calibration", "rotated")), scaling)
                rotate_layer[module.layer_idx] = rot < plain
            WEIGHTS["rotate"] = rotate_layer.get(module.layer_idx, False)
        if state["variant"] in RECENT:
            base, w, first = RECENT[state["variant"]]
            scaling = kw.get("scaling") or module.scaling
            return recent_exact_attention(q, k, v, mask, scaling, VARIANTS[base], w, first), None
        if state["variant"] is not None:
            k, v = VARIANTS[state["variant"]](k, v)
        return sdpa_attention_forward(module, q, k, v, mask, **kw)

    AttentionInterface.register("fp8_rounding", attention)
    model.set_attn_implementation("fp8_rounding")

    def log_probs(variant, tokens=ids):
        state["variant"] = variant
        with torch.inference_mode():
            return torch.log_softmax(model(tokens).logits.float(), -1)

    names = [n.strip() for n in args.variants.split(";") if n.strip()] or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS and n not in RECENT]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS) + list(RECENT)}")
    count = model.config.num_hidden_layers
    if args.layers and args.layers != "each":
        try:
            only = {int(i) for i in args.layers.split(",")}
        except ValueError:
            raise SystemExit(f"--layers {args.layers!r}: expected 'each' or comma-separated layer indices") from None
        if not only or min(only) < 0 or max(only) >= count:
            raise SystemExit(f"--layers {args.layers!r}: the model has layers 0 to {count - 1}")
    choose_rotation = any("rotated where it helps" in n for n in names)  # (the per-layer choice, only if asked)
    state["calibrating"] = True
    if args.calibration == "zipage":  # (the engine's: zipage.calibration, one sequence)
        from zipage.calibration import calibration_ids

        calibration = torch.tensor([calibration_ids(tok, model.config.vocab_size, 1 << 16)])
    else:
        calibration = quality.build_sequences(tok, 2, 1024, args.calibration)[0]
    print(f"calibration: {args.calibration}, {calibration.numel()} tokens")
    log_probs(None, calibration)  # (every layer's query moments)
    state["calibrating"] = False
    if choose_rotation:
        print(f"layers whose calibration keys round better rotated: {sorted(i for i, r in rotate_layer.items() if r)}")
    ref = log_probs(None)
    against = "keys and values in bf16" if args.reference == "bf16" else "float32 keys and values"
    print(f"{MODELS[args.model]}, float32, {args.seqs} x {args.seq_len} tokens of MATH-500 solutions, nothing evicted; "
          f"scored against {against}\n")
    print("| rounded | top-1 agreement | mean KL (nats) |")
    print("|---|---|---|")
    if args.layers == "each":
        runs = [(f"{name}, layer {i} alone", name, {i}) for name in names for i in range(count)]
    elif args.layers:
        runs = [(f"{name}, layers {args.layers}", name, only) for name in names]
    else:
        runs = [(name, name, None) for name in names]
    for label, name, layers in runs:
        state["layers"] = layers
        lp = log_probs(name)
        top1 = (lp.argmax(-1) == ref.argmax(-1)).float().mean().item()
        kl = (ref.exp() * (ref - lp)).sum(-1).mean().item()
        print(f"| {label} | {100 * top1:.2f}% | {kl:.5f} |")


if __name__ == "__main__":
    main()
