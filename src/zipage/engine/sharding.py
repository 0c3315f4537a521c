"""Tensor-parallel weights: each rank keeps its slice of every projection, in place.

The layout is the model's own tensor-parallel plan (``config.base_model_tp_plan``, the one
transformers ships for Llama, Qwen2/3, Mistral, ...): ``colwise`` projections (q/k/v, gate/up)
keep the output rows of the rank (its query and KV heads, its share of the MLP), ``rowwise`` ones
(o, down) keep the matching input columns and sum their partial outputs over the ranks with one
all-reduce (``RowParallelLinear``). Norms, embeddings and the LM head are replicated, so every rank
ends each layer with the same hidden states and computes the same logits (no gather of logits).

The column slices are still plain ``nn.Linear`` modules, so the engine's merged q/k/v and gate/up
GEMMs (``fusion.py``) apply to them as they do to a whole model. The modeling code reshapes with
``-1`` heads, so a rank's attention sees its ``H / N`` heads without any change to the model.
"""

from __future__ import annotations

import fnmatch

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..attention_checks import _safe  # (getattr, None where a per-layer config raises for a differing value)

COLWISE, ROWWISE = "colwise", "rowwise"


def head_counts(config) -> tuple[int, int, int]:
    """``(query heads, KV heads, head dim)`` of a text config."""
    cfg = config.get_text_config(decoder=True)
    hq = cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", None) or hq
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    return hq, hkv, d


# a text config's expert count, by the names transformers' mixture-of-experts configs give it
EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def check_tensor_parallel(config, size: int) -> None:
    """Refuse, before any process starts, a size the model cannot be split into."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"tensor_parallel_size={size!r} is invalid: expected an int >= 1")
    if size == 1:
        return
    cfg = config.get_text_config(decoder=True)
    hq, hkv, _ = head_counts(config)
    for what, n in (("KV heads", hkv), ("attention heads", hq)):
        if n % size:
            raise ValueError(f"tensor_parallel_size={size} does not divide the model's {n} {what}: each "
                             "rank holds the pages of its own heads, so the heads must split evenly "
                             f"(try a divisor of {hkv})")
    inter = getattr(cfg, "intermediate_size", None)
    if isinstance(inter, int) and inter % size:
        raise ValueError(f"tensor_parallel_size={size} does not divide the model's intermediate_size {inter}")
    experts = next(((name, n) for name in EXPERT_COUNTS if isinstance(n := _safe(cfg, name), int) and n > 1),
                   None)
    if experts is not None:
        # (transformers 5.24 and earlier list the experts in the plan with styles refused below; 5.25's plans of
        # Qwen3-MoE and Mixtral leave them out, which would have copied every expert whole onto every rank)
        raise NotImplementedError(f"{type(config).__name__} is a mixture of experts ({experts[0]}={experts[1]}): "
                                  "the zipage engine splits attention heads and dense MLP projections only, so every "
                                  "rank would hold every expert whole; run it in one process (tensor_parallel_size=1)")
    plan = tp_plan(config)
    odd = sorted({style for style in plan.values() if style not in (COLWISE, ROWWISE)
                  and not style.startswith("replicated")})
    if odd:
        raise NotImplementedError(f"the model's tensor-parallel plan uses {odd}: the zipage engine shards "
                                  "'colwise' and 'rowwise' projections only")


def tp_plan(config) -> dict[str, str]:
    """The model's tensor-parallel plan: module name pattern (under the base model) -> style."""
    cfg = config.get_text_config(decoder=True)
    plan = getattr(cfg, "base_model_tp_plan", None) or getattr(config, "base_model_tp_plan", None)
    if not plan:
        raise NotImplementedError(f"{type(config).__name__} has no tensor-parallel plan (config.base_model_tp_plan): "
                                  "the zipage engine does not know how to split this model")
    return dict(plan)


class RowParallelLinear(torch.nn.Module):
    """The rank's input columns of a ``rowwise`` projection: partial output, one all-reduce, the bias once."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = torch.nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.group = group
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        dist.all_reduce(out, group=self.group)
        return out + self.bias if self.bias is not None else out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features} (this rank's), out_features={self.out_features}"


def _rows(t: torch.Tensor, rank: int, size: int, device) -> torch.Tensor:
    n = t.shape[0] // size
    return t[rank * n : (rank + 1) * n].to(device, copy=True)


def shard_model(model: torch.nn.Module, rank: int, size: int, group, device=None) -> int:
    """Keep only rank ``rank``'s slice of every projection the plan names, in place (on ``device``,
    default where they are); returns how many modules were split. ``rowwise`` modules become
    ``RowParallelLinear`` (all-reduce over ``group``)."""
    config = model.config
    check_tensor_parallel(config, size)
    plan = tp_plan(config)
    base = getattr(model, "base_model", model)
    done = 0
    for name, module in list(base.named_modules()):
        style = next((s for pattern, s in plan.items() if fnmatch.fnmatchcase(name, pattern)), None)
        if style not in (COLWISE, ROWWISE):
            continue
        if type(module) is not torch.nn.Linear:
            raise NotImplementedError(f"{name} is a {type(module).__name__}: the zipage engine shards plain "
                                      "nn.Linear projections only")
        w, b = module.weight.data, module.bias.data if module.bias is not None else None
        if style == COLWISE:
            if w.shape[0] % size:
                raise ValueError(f"{name} has {w.shape[0]} output features, not divisible by {size}")
            module.weight = torch.nn.Parameter(_rows(w, rank, size, device or w.device), requires_grad=False)
            if b is not None:
                module.bias = torch.nn.Parameter(_rows(b, rank, size, device or b.device), requires_grad=False)
            module.out_features = module.weight.shape[0]
        else:
            if w.shape[1] % size:
                raise ValueError(f"{name} has {w.shape[1]} input features, not divisible by {size}")
            part = _rows(w.t(), rank, size, device or w.device).t().contiguous()
            parent_name, _, child = name.rpartition(".")
            parent = base.get_submodule(parent_name) if parent_name else base
            bias = b.to(part.device, copy=True) if b is not None else None
            setattr(parent, child, RowParallelLinear(part, bias, group))
        done += 1
    if not done:
        raise NotImplementedError(f"no module of {type(model).__name__} matches its tensor-parallel plan")
    return done
