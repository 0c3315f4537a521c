"""Budget allocation across heads and layers, simulated: does a non-uniform split of the same
token budget beat per-head uniform top-k in the teacher-forced quality benchmark?

This script is an experiment, independent of the library's cache: it keeps every key and value
of a transformers ``DynamicCache`` and evicts by masking. A custom attention function applies a
per-(layer, KV head) ``alive`` mask over positions, so each head can keep a different number of
tokens. Protocol as in ``benchmarks/quality.py`` (SmolLM2-135M-Instruct fp32, 2,048-token MATH-500
sequences, prefill ``budget + 64`` tokens, then chunks of 64 tokens with a compression to the
budget before each chunk; top-1 agreement and perplexity ratio over the positions after the
prefill). Scores are the default ``zipage`` scorer's: mean attention of the last 16 queries (each
causal over the alive keys), max over the GQA group, max-pooled over 5 neighbours at the first
compression; the last 16 tokens and the last ``min(64, budget // 2)`` tokens are always kept.

Policies (``--policies``), each keeping ``H * budget`` tokens per layer (``L * H * budget`` with
``global``):

* ``uniform``: ``budget`` tokens per head (what the library does; reproduces quality.py's row);
* ``head[a]``: per layer, the protected tokens of each head plus ``a`` of the rest split evenly,
  the remainder to the highest scores across the layer's heads (AdaKV-style; a = 0.2 default);
* ``global[a]``: the same across all layers and heads;
* ``merge[tau]``: ``uniform`` selection, and each evicted token is folded into the kept token of
  the same head with the most similar key (cosine >= tau; default -1, always): the kept token's
  value becomes the window-attention-weighted mean of both and a per-token logit bias (its
  log-mass) grows by ``log(1 + a_evicted / a_kept)``, ``a`` being the window attention (mean
  over the GQA group and the window), so the window queries' softmax mass is approximately kept;
* ``mergebias``: only the bias (mass compensation, values unchanged); ``mergenb``: only the
  values; ``mergek``: keys averaged as well.

    python benchmarks/quality_alloc.py --budgets 1/16,1/8,1/4 \\
        --policies uniform,head,head[0.6],global,global[0.5],merge,mergebias,mergenb,mergek
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from fractions import Fraction

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import quality as Q  # noqa: E402

from transformers import AttentionInterface, DynamicCache  # noqa: E402


class Sim:
    alive: list[torch.Tensor] = []  # per layer [B, Hkv, cap] bool
    queries: list[torch.Tensor | None] = []  # per layer [B, Hq, w, D], last w queries
    bias: list[torch.Tensor] = []  # per layer [B, Hkv, cap] float log-mass of merged tokens
    window = 16


def sim_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    B, Hq, q, D = query.shape
    Hkv, N = key.shape[1], key.shape[2]
    g = Hq // Hkv
    layer = module.layer_idx
    Sim.queries[layer] = query[:, :, -Sim.window :].detach()
    alive = Sim.alive[layer][:, :, :N].clone()
    alive[:, :, N - q :] = True
    causal = torch.arange(N)[None, :] <= torch.arange(N - q, N)[:, None]  # [q, N]
    mask = alive[:, :, None, :] & causal[None, None]  # [B, Hkv, q, N]
    mask = torch.where(mask, Sim.bias[layer][:, :, None, :N], float("-inf"))
    mask = mask.repeat_interleave(g, dim=1)
    k = key.repeat_interleave(g, dim=1)
    v = value.repeat_interleave(g, dim=1)
    scale = scaling if scaling is not None else D**-0.5
    out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("zipage_sim", sim_attention)


def window_scores(query, key, alive, scaling, bias=None, reduce="max"):
    """[B, Hkv, N]: mean over the window queries (the last w positions, causal, over alive keys) of
    the attention, max over the GQA group; 0 for dead keys."""
    B, Hq, w, D = query.shape
    Hkv, N = key.shape[1], key.shape[2]
    g = Hq // Hkv
    qf = query.float().view(B, Hkv, g, w, D)
    logits = torch.einsum("bhgwd,bhnd->bhgwn", qf, key.float()) * scaling
    if bias is not None:
        logits = logits + bias[:, :, None, None, :]
    causal = torch.arange(N)[None, :] <= torch.arange(N - w, N)[:, None]
    allowed = alive[:, :, None, None, :] & causal[None, None, None]
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    probs = probs.mean(dim=3)
    return probs.amax(dim=2) if reduce == "max" else probs.mean(dim=2)


def merge(layer_cache, layer: int, old: torch.Tensor, new: torch.Tensor, probs: torch.Tensor, tau: float,
          merge_keys: bool = False, use_bias: bool = True, use_values: bool = True) -> None:
    """Fold each evicted token into the kept token with the most similar key (cosine >= tau): the
    kept token's value becomes the window-attention-weighted mean and its log-mass grows by
    log(1 + a_j / a_i), so the window queries' output is approximately preserved."""
    n = old.shape[-1]
    keys = layer_cache.keys[:, :, :n].float()
    vals = layer_cache.values[:, :, :n]
    ev = old & ~new
    ne = int(ev[0, 0].sum())
    nk = int(new[0, 0].sum())
    if ne == 0:
        return
    ev_idx = ev.float().topk(ne, dim=-1).indices  # [B, H, e]
    kp_idx = new.float().topk(nk, dim=-1).indices  # [B, H, k]
    D = keys.shape[-1]
    ke = torch.nn.functional.normalize(keys.gather(2, ev_idx[..., None].expand(-1, -1, -1, D)), dim=-1)
    kk = torch.nn.functional.normalize(keys.gather(2, kp_idx[..., None].expand(-1, -1, -1, D)), dim=-1)
    cos = ke @ kk.transpose(-1, -2)  # [B, H, e, k]
    best, j = cos.max(-1)
    target = kp_idx.gather(2, j)  # [B, H, e] positions
    a_e = probs.gather(2, ev_idx) * (best >= tau)
    ve = vals.gather(2, ev_idx[..., None].expand(-1, -1, -1, D)).float()
    # Accumulate per target: sum a_e and sum a_e * v_e.
    B, H = new.shape[:2]
    add_a = torch.zeros(B, H, n).scatter_add_(2, target, a_e)
    add_v = torch.zeros(B, H, n, D).scatter_add_(2, target[..., None].expand(-1, -1, -1, D), a_e[..., None] * ve)
    a_self = probs
    upd = add_a > 0
    tot = a_self + add_a
    newv = (a_self[..., None] * vals.float() + add_v) / tot.clamp_min(1e-30)[..., None]
    if use_values:
        layer_cache.values[:, :, :n] = torch.where(upd[..., None], newv.to(vals.dtype), vals)
    if merge_keys:
        kraw = layer_cache.keys[:, :, :n]
        kev = kraw.gather(2, ev_idx[..., None].expand(-1, -1, -1, D)).float()
        add_k = torch.zeros(B, H, n, D).scatter_add_(2, target[..., None].expand(-1, -1, -1, D), a_e[..., None] * kev)
        newk = (a_self[..., None] * kraw.float() + add_k) / tot.clamp_min(1e-30)[..., None]
        layer_cache.keys[:, :, :n] = torch.where(upd[..., None], newk.to(kraw.dtype), kraw)
    ratio = torch.where(upd, tot / a_self.clamp_min(1e-30), torch.ones_like(tot))
    if use_bias:
        Sim.bias[layer][:, :, :n] += torch.log(ratio.clamp(max=1e4))


def max_pool(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    B, H, N = scores.shape
    return torch.nn.functional.max_pool1d(scores.reshape(B * H, 1, N), kernel, 1, kernel // 2).view(B, H, N)


def select(scores: torch.Tensor, alive: torch.Tensor, budget: int, recent: int, policy: str, alpha: float) -> torch.Tensor:
    """New alive masks for one group ``[..., H, N]`` (layers stacked in front for ``global``)."""
    N = scores.shape[-1]
    s = scores.masked_fill(~alive, float("-inf"))
    # Protected: the last `recent` alive tokens of each head (recent >= window).
    rank_from_end = alive.flip(-1).long().cumsum(-1).flip(-1)  # 1 for the last alive token
    protected = alive & (rank_from_end <= recent)
    if policy == "uniform":
        s = s.masked_fill(protected, float("inf"))
        idx = torch.topk(s, budget, dim=-1).indices
        return torch.zeros_like(alive).scatter_(-1, idx, True)
    # Adaptive: flatten heads (and layers for global) of each batch row.
    lead = s.shape[:-1]  # [B, H] or [L, B, H]
    H = lead[-1] if policy == "head" else lead[0] * lead[-1]
    # Move batch first: [B, units, N]
    if policy == "head":
        s2, prot2 = s, protected  # [B, H, N]
    else:
        s2 = s.permute(1, 0, 2, 3).reshape(s.shape[1], -1, N)
        prot2 = protected.permute(1, 0, 2, 3).reshape(s.shape[1], -1, N)
    Bn = s2.shape[0]
    total = H * budget
    # Per unit: protected tokens, then a share `alpha` of the rest split evenly (top scores per unit).
    even = int(alpha * (budget - recent))
    s_free = s2.masked_fill(prot2, float("-inf"))
    keep = prot2.clone()
    if even > 0:
        idx = torch.topk(s_free, even, dim=-1).indices
        keep.scatter_(-1, idx, True)
    rest = total - int(keep[0].sum())  # identical for every batch row (same counts)
    rem = s_free.masked_fill(keep, float("-inf")).reshape(Bn, -1)
    if rest > 0:
        idx = torch.topk(rem, rest, dim=-1).indices
        keep.view(Bn, -1).scatter_(-1, idx, True)
    if policy == "head":
        return keep
    return keep.view(Bn, s.shape[0], s.shape[2], N).permute(1, 0, 2, 3)


@torch.inference_mode()
def run(model, ids, budget: int, policy: str, alpha: float, tracker: Q.Tracker) -> dict:
    cfg = model.config
    L, Hkv = cfg.num_hidden_layers, cfg.num_key_value_heads
    B, N = ids.shape
    buffer, window = 64, 16
    recent = min(64, budget // 2)
    scaling = (cfg.hidden_size // cfg.num_attention_heads) ** -0.5
    Sim.alive = [torch.ones(B, Hkv, N, dtype=torch.bool) for _ in range(L)]
    Sim.queries = [None] * L
    Sim.bias = [torch.zeros(B, Hkv, N) for _ in range(L)]
    do_merge = policy.startswith("merge")
    cache = DynamicCache()
    first = budget + buffer
    model(input_ids=ids[:, :first], **{Q.CACHE: cache}, use_cache=True, logits_to_keep=1)
    pos, ncomp, counts = first, 0, []
    while pos < N - 1:
        # Compress to the budget (per head on average).
        scores = []
        for layer in range(L):
            key = cache.layers[layer].keys
            n = key.shape[2]
            al = Sim.alive[layer][:, :, :n]
            sc = window_scores(Sim.queries[layer], key, al, scaling, Sim.bias[layer][:, :, :n])
            if ncomp == 0:
                sc = max_pool(sc, 5)
            scores.append(sc)
        n = cache.layers[0].keys.shape[2]
        if policy == "global":
            st = torch.stack(scores)
            al = torch.stack([Sim.alive[layer][:, :, :n] for layer in range(L)])
            new = select(st, al, budget, recent, policy, alpha)
            for layer in range(L):
                Sim.alive[layer][:, :, :n] = new[layer]
        else:
            for layer in range(L):
                old = Sim.alive[layer][:, :, :n].clone()
                new = select(scores[layer], old, budget, recent, "uniform" if do_merge else policy, alpha)
                if do_merge:
                    probs = window_scores(Sim.queries[layer], cache.layers[layer].keys, old, scaling,
                                          Sim.bias[layer][:, :, :n], reduce="mean")
                    merge(cache.layers[layer], layer, old, new, probs, alpha, policy == "mergek",
                          policy != "mergenb", policy != "mergebias")
                Sim.alive[layer][:, :, :n] = new
        counts.append(torch.stack([Sim.alive[layer][:, :, :n].sum(-1).float() for layer in range(L)]))  # [L, B, H]
        ncomp += 1
        end = min(pos + buffer, N - 1)
        out = model(input_ids=ids[:, pos:end], **{Q.CACHE: cache}, use_cache=True)
        tracker.update(out.logits, pos, end)
        pos = end
    c = torch.stack(counts).mean(0)  # [L, B, H]
    per_layer = c.mean(dim=(1, 2))
    return {"compressions": ncomp, "per_layer_mean": [round(x, 1) for x in per_layer.tolist()],
            "head_min": c.min().item(), "head_max": c.max().item()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default="1/8,1/4")
    p.add_argument("--policies", default="uniform,head,global")
    p.add_argument("--seqs", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = Q.load_model(args.threads)
    model.set_attn_implementation("zipage_sim")
    ids, _ = Q.build_sequences(tok, args.seqs, args.seq_len)
    t0 = time.time()
    model.set_attn_implementation("sdpa")
    ref = Q.reference(model, ids)
    model.set_attn_implementation("zipage_sim")
    print(f"reference {time.time() - t0:.1f}s", flush=True)
    print("| policy | budget | top-1 | ppl ratio | kl | per-layer mean kept (first 6 / last 6) | head min/max | s |")
    print("|---|---|---:|---:|---:|---|---|---:|")
    for frac in [Fraction(b) for b in args.budgets.split(",")]:
        budget = int(args.seq_len * frac)
        for spec in args.policies.split(","):
            name, _, a = spec.partition("[")
            alpha = float(a.rstrip("]")) if a else (-1.0 if name.startswith("merge") else 0.2)
            t0 = time.time()
            tracker = Q.Tracker(ids, ref)
            info = run(model, ids, budget, name, alpha, tracker)
            s = tracker.summary(budget + 64, args.seq_len - 1)
            pl = info["per_layer_mean"]
            print(f"| {spec} | {frac} | {100 * s['top1']:.2f}% | {s['ppl_ratio']:.4f} | {s['kl']:.4f} | "
                  f"{pl[:6]} / {pl[-6:]} | {info['head_min']:.0f}/{info['head_max']:.0f} | {time.time() - t0:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
