"""Merged input projections and a fused SiLU-gate for the engine's forwards.

At decode batch sizes a layer's GEMMs are thin (a few dozen rows) and mostly read weights, so
each extra launch and each narrow output costs time: the key and value projections of a GQA
model are a quarter of the query's width, and the MLP's gate and up projections read the same
input. ``merge_projections`` concatenates, once, the weights of ``q_proj``/``k_proj``/``v_proj``
and of ``gate_proj``/``up_proj`` into one tensor per group and points each module's weight at its
row slice of it (the values, the ``Parameter`` objects and the state dict stay the same; no
memory is duplicated). Inside ``merged_projections``:

* the query projection runs one GEMM for all three and hands the key and value projections their
  slices when they are called on the same input (any other input takes the plain path);
* an MLP whose forward is ``down(silu(gate(x)) * up(x))`` (checked on a probe input) runs one GEMM
  for gate and up and ``silu_mul`` for the gate: one kernel instead of two, with the module's
  roundings (``silu`` rounded to the input dtype, then the product rounded).

A group whose weights no longer lie in their merged tensor (the model was moved or reloaded)
is left alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _silu_mul_kernel(h_ptr, out_ptr, n, h_stride, out_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < n
        g = tl.load(h_ptr + row * h_stride + cols, mask=m, other=0.0)
        u = tl.load(h_ptr + row * h_stride + n + cols, mask=m, other=0.0).to(tl.float32)
        gf = g.to(tl.float32)
        s = gf / (1.0 + tl.exp(-gf))
        if g.dtype != tl.float32:  # silu's output is rounded to the input dtype, as the module's is
            s = s.to(g.dtype, fp_downcast_rounding="rtne").to(tl.float32)
        out = s * u
        tl.store(out_ptr + row * out_stride + cols, out.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"),
                 mask=m)


def silu_mul_reference(h: torch.Tensor) -> torch.Tensor:
    """``silu(h[..., :n]) * h[..., n:]`` for ``h`` of width ``2n``, in plain PyTorch."""
    n = h.shape[-1] // 2
    return F.silu(h[..., :n]) * h[..., n:]


def silu_mul_triton(h: torch.Tensor) -> torch.Tensor:
    if h.shape[-1] % 2:
        raise ValueError(f"silu_mul: the last dimension ({h.shape[-1]}) must hold gate and up halves")
    n = h.shape[-1] // 2
    rows = h.reshape(-1, 2 * n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], n, dtype=h.dtype, device=h.device)
    if rows.shape[0] and n:
        block = 1024
        _silu_mul_kernel[(rows.shape[0], triton.cdiv(n, block))](rows, out, n, rows.stride(0), out.stride(0),
                                                               BLOCK=block, num_warps=4)
    return out.view(*h.shape[:-1], n)


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    if use_triton(h):
        return silu_mul_triton(h)
    return silu_mul_reference(h)


@dataclass
class MergedGroup:
    """Linear modules whose weights (and biases) are row slices of one merged tensor."""

    owner: torch.nn.Module
    linears: list[torch.nn.Linear]
    weight: torch.Tensor
    bias: torch.Tensor | None
    sizes: list[int]
    mlp: bool = False  # owner is an MLP whose whole forward is fused
    stash: dict = field(default_factory=dict)
    forwards: dict = field(default_factory=dict)  # kernel -> [(module, forward)], built once

    def __post_init__(self) -> None:
        # where each module's weight and bias start inside the merged tensors (checked at every entry)
        w, b, row = self.weight, self.bias, 0
        self._expected = []
        for n in self.sizes:
            self._expected.append((w.data_ptr() + row * w.stride(0) * w.element_size(),
                                   None if b is None else b.data_ptr() + row * b.element_size(), n))
            row += n

    def intact(self) -> bool:
        """True while every module's weight (and bias) is still its slice of the merged tensors."""
        for lin, (wp, bp, n) in zip(self.linears, self._expected):
            params = lin._parameters  # direct: this runs for every group at every eager forward
            w, b = params["weight"], params.get("bias")
            if w.data_ptr() != wp or w.shape[0] != n:
                return False
            if bp is not None and (b is None or b.data_ptr() != bp):
                return False
        return True


def _plain_linears(mods: list) -> bool:
    if not all(type(m) is torch.nn.Linear for m in mods):
        return False
    if any(m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m) or hasattr(m, "_hf_hook") for m in mods):
        return False
    w0 = mods[0].weight
    if any(m.weight.dtype != w0.dtype or m.weight.device != w0.device or m.weight.shape[1] != w0.shape[1]
           or m.weight.is_meta for m in mods):
        return False
    has_bias = [m.bias is not None for m in mods]
    return all(has_bias) or not any(has_bias)


def _adjacent(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """A view over ``tensors`` concatenated along dim 0 when they already lie back to back in one
    storage (merged before, e.g. by another engine on the same model), else None."""
    first = tensors[0]
    if not all(t.is_contiguous() and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
               for t in tensors):
        return None
    for a, b in zip(tensors, tensors[1:]):
        if b.data_ptr() != a.data_ptr() + a.numel() * a.element_size():
            return None
    rows = sum(t.shape[0] for t in tensors)
    return torch.as_strided(first, (rows, *first.shape[1:]), first.stride())


def _merge(owner: torch.nn.Module, mods: list[torch.nn.Linear], mlp: bool) -> MergedGroup:
    sizes = [m.weight.shape[0] for m in mods]
    with torch.no_grad():
        weight = _adjacent([m.weight.data for m in mods])
        bias = _adjacent([m.bias.data for m in mods]) if mods[0].bias is not None else None
        if weight is None or (mods[0].bias is not None and bias is None):
            weight = torch.cat([m.weight for m in mods], dim=0)
            bias = torch.cat([m.bias for m in mods], dim=0) if mods[0].bias is not None else None
            row = 0
            for m, n in zip(mods, sizes):
                m.weight.data = weight[row : row + n]
                if bias is not None:
                    m.bias.data = bias[row : row + n]
                row += n
    return MergedGroup(owner, list(mods), weight, bias, sizes, mlp)


def _is_silu(act) -> bool:
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def _mlp_forward(group: MergedGroup, kernel):
    down = group.owner.down_proj

    def forward(x: torch.Tensor) -> torch.Tensor:
        return down(kernel(F.linear(x, group.weight, group.bias)))

    return forward


def merge_projections(model: torch.nn.Module, kernel=silu_mul_triton) -> list[MergedGroup]:
    """Merge the q/k/v and gate/up projections of ``model`` (once; see the module docstring).

    An attention module qualifies when it has plain ``nn.Linear`` ``q_proj``, ``k_proj`` and
    ``v_proj`` on one device and dtype with no hooks; an MLP when it has ``gate_proj``, ``up_proj``
    and ``down_proj`` and a SiLU ``act_fn``, and ``down(kernel(gate_up(x)))`` reproduces its
    forward on a probe input (checked once per class and shape). Returns the merged groups."""
    groups: list[MergedGroup] = []
    verdict: dict[tuple, bool] = {}
    for module in model.modules():
        if "forward" in vars(module):
            continue
        names = ("q_proj", "k_proj", "v_proj")
        if all(isinstance(getattr(module, n, None), torch.nn.Module) for n in names):
            mods = [getattr(module, n) for n in names]
            if _plain_linears(mods):
                groups.append(_merge(module, mods, mlp=False))
            continue
        names = ("gate_proj", "up_proj", "down_proj")
        if all(isinstance(getattr(module, n, None), torch.nn.Module) for n in names) and _is_silu(
                getattr(module, "act_fn", None)):
            mods = [module.gate_proj, module.up_proj]
            if not (_plain_linears(mods) and mods[0].weight.shape == mods[1].weight.shape):
                continue
            w = mods[0].weight
            key = (type(module), tuple(w.shape), w.dtype, w.device)
            group = _merge(module, mods, mlp=True)
            if key not in verdict:
                g = torch.Generator(device="cpu").manual_seed(0)
                probe = torch.randn(8, w.shape[1], generator=g).to(w.device, w.dtype)
                with torch.no_grad():
                    ref, got = module(probe), _mlp_forward(group, kernel)(probe)
                tol = 1e-5 if w.dtype == torch.float32 else 2e-2
                verdict[key] = ref.shape == got.shape and ref.dtype == got.dtype and torch.allclose(
                    ref.float(), got.float(), rtol=tol, atol=tol * float(ref.float().abs().max().clamp_min(1)))
            if verdict[key]:
                groups.append(group)
    return groups


def _query_forward(group: MergedGroup):
    def forward(x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, group.weight, group.bias)
        parts = out.split(group.sizes, dim=-1)
        group.stash["x"] = x
        group.stash["parts"] = list(parts[1:])
        return parts[0]

    return forward


def _slice_forward(group: MergedGroup, index: int):
    lin = group.linears[index]

    def forward(x: torch.Tensor) -> torch.Tensor:
        stash = group.stash
        if stash.get("x") is x and stash.get("parts"):
            part = stash["parts"][index - 1]
            stash["parts"][index - 1] = None
            if all(p is None for p in stash["parts"]):
                stash.clear()
            if part is not None:
                return part
        return F.linear(x, lin.weight, lin.bias)

    return forward


@contextlib.contextmanager
def merged_projections(groups: list[MergedGroup], kernel=silu_mul_triton) -> Iterator[None]:
    """Run the merged groups' GEMMs (and fused MLPs) inside the block; the modules' own forwards
    come back after."""
    patched: list[torch.nn.Module] = []
    for group in groups:
        if not group.intact():
            continue
        pairs = group.forwards.get(kernel)
        if pairs is None:  # the closures are made once per group, not at every forward
            if group.mlp:
                pairs = [(group.owner, _mlp_forward(group, kernel))]
            else:
                pairs = [(group.linears[0], _query_forward(group))]
                pairs += [(group.linears[i], _slice_forward(group, i)) for i in range(1, len(group.linears))]
            group.forwards[kernel] = pairs
        for module, forward in pairs:
            vars(module)["forward"] = forward  # what Module.__setattr__ ends up doing, without its checks
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            vars(module).pop("forward", None)
        for group in groups:
            group.stash.clear()
