"""Model surgery for the fused kernels: which modules of a model they stand in for, applied and undone.

The kernels in ``zipage.kernels`` (``rms_norm``, ``rope``, ``silu_mul``) are pure operations; this
module is the only place that walks a model to use them. ``ModelFusion.find(model)`` picks, once:

* the RMSNorm modules whose math ``rms_norm_triton`` reproduces (each distinct class checked on a
  probe input against its own forward, so a variant such as ``x * (1 + weight)`` is left alone);
* the modeling module whose ``apply_rotary_pos_emb`` ``rope_triton`` reproduces (checked on a probe);
* the q/k/v and gate/up projections, whose weights it merges, in place, into one tensor per group
  (each module's weight becomes its row slice of it: the values, the ``Parameter`` objects and the
  state dict stay the same and no memory is duplicated; this is not undone, as nothing changes for
  the model's own forward). An MLP is fused only if ``down(silu_mul(gate_up(x)))`` reproduces its
  forward on a probe input.

``ModelFusion.applied()`` patches the forwards (and the modeling module's ``apply_rotary_pos_emb``)
for the duration of a ``with`` block and puts the originals back after it, so the model computes as
before outside the engine's forwards. Inside it:

* the query projection runs one GEMM for all three and hands the key and value projections their
  slices when they are called on the same input (any other input takes the plain path);
* a fused MLP runs one GEMM for gate and up and ``silu_mul`` for the gate;
* a merged group whose weights no longer lie in their merged tensor (the model was moved or
  reloaded) is left alone, and rotary calls the kernel does not cover go to the original function.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType

import torch
import torch.nn.functional as F

from ..kernels import rms_norm_triton, rope_triton, silu_mul_triton


# ----------------------------------------------------------------------------------------- RMSNorm
def _eps(module: torch.nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def fusable_rms_norms(model: torch.nn.Module, kernel=rms_norm_triton) -> list[torch.nn.Module]:
    """The RMSNorm modules of ``model`` that ``kernel`` reproduces.

    A candidate is a module whose class name ends in ``RMSNorm`` with a 1-D ``weight`` and a
    float epsilon. Each (class, width, dtype) is checked once on a probe input against the
    module's own forward; a class that disagrees (another formula) is not fused."""
    verdict: dict[tuple, bool] = {}
    found = []
    for module in model.modules():
        if not type(module).__name__.endswith("RMSNorm"):
            continue
        w, eps = getattr(module, "weight", None), _eps(module)
        if not isinstance(w, torch.Tensor) or w.dim() != 1 or eps is None or "forward" in vars(module):
            continue
        key = (type(module), w.shape[0], w.dtype, w.device)
        if key not in verdict:
            g = torch.Generator(device="cpu").manual_seed(0)
            probe = (torch.randn(8, w.shape[0], generator=g) * 3).to(w.device, w.dtype)
            with torch.no_grad():
                ref, got = module(probe), kernel(probe, w, eps)
            tol = 1e-5 if w.dtype == torch.float32 else 2e-2
            verdict[key] = ref.dtype == got.dtype and ref.shape == got.shape and torch.allclose(
                ref.float(), got.float(), rtol=tol, atol=tol)
        if verdict[key]:
            found.append(module)
    return found


@contextlib.contextmanager
def fused_rms_norms(modules: list[torch.nn.Module], kernel=rms_norm_triton) -> Iterator[None]:
    """Run ``modules`` through ``kernel`` inside the block; their own forwards come back after."""
    for module in modules:
        module.forward = _fused_forward(module, kernel)
    try:
        yield
    finally:
        for module in modules:
            vars(module).pop("forward", None)


def _fused_forward(module: torch.nn.Module, kernel):
    w, eps = module.weight, _eps(module)

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        return kernel(hidden_states, w, eps)

    return forward


# ----------------------------------------------------------------------------------------- RoPE
def _covered(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    return (t.dim() == 4 and cos.dim() == 3 and t.dtype == cos.dtype == sin.dtype and t.shape[-1] % 2 == 0
            and cos.shape[1:] == (t.shape[2], t.shape[3]) and cos.shape[0] in (1, t.shape[0]) and sin.shape == cos.shape
            and cos.stride() == sin.stride() and t.stride(-1) == 1 and cos.stride(-1) == 1)


def _fused_call(original, kernel, q, k, cos, sin, *args, **kwargs):
    unsqueeze = kwargs.get("unsqueeze_dim", args[0] if args else 1)
    if unsqueeze != 1 or len(args) > 1 or set(kwargs) - {"unsqueeze_dim"} \
            or not (_covered(q, cos, sin) and _covered(k, cos, sin)):
        return original(q, k, cos, sin, *args, **kwargs)
    return kernel(q, cos, sin), kernel(k, cos, sin)


# The modeling module's function is shared by every model of its family, which engines in other threads (or
# plain transformers use) may be running at the same time: it is replaced once, while any thread is inside a
# fused_rope block for it, by one that runs the kernel of the calling thread's innermost block, and the
# module's own function for threads outside any.
_rope_lock = threading.Lock()
_rope_patched: dict[int, list] = {}  # id(module) -> [module, its own function, blocks open in all threads]
_rope_local = threading.local()  # .kernels: id(module) -> this thread's open blocks' kernels


def _thread_kernels() -> dict[int, list]:
    kernels = getattr(_rope_local, "kernels", None)
    if kernels is None:
        kernels = _rope_local.kernels = {}
    return kernels


def _dispatching_apply(original, key: int):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        stack = _thread_kernels().get(key)
        if not stack:  # (a thread outside any block: the model's own function)
            return original(q, k, cos, sin, *args, **kwargs)
        return _fused_call(original, stack[-1], q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.zipage_fused = True
    apply_rotary_pos_emb.zipage_original = original
    return apply_rotary_pos_emb


def fusable_rope(model: torch.nn.Module, kernel=rope_triton) -> ModuleType | None:
    """The modeling module of ``model`` when its ``apply_rotary_pos_emb`` matches ``kernel``."""
    module = sys.modules.get(type(model).__module__)
    original = getattr(module, "apply_rotary_pos_emb", None)
    original = getattr(original, "zipage_original", original)  # (another engine's forward in another thread)
    if module is None or not callable(original) or getattr(original, "zipage_fused", False):
        return None
    cfg = model.config.get_text_config(decoder=True)
    p = next(model.parameters())
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if D % 2:
        return None
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k = (torch.randn(2, h, 3, D, generator=g).to(p.device, p.dtype) for h in (4, 2))
    angle = torch.rand(2, 3, D // 2, generator=g) * 6
    cos = torch.cat([angle.cos()] * 2, -1).to(p.device, p.dtype)
    sin = torch.cat([angle.sin()] * 2, -1).to(p.device, p.dtype)
    try:
        with torch.no_grad():
            ref, got = original(q, k, cos, sin), (kernel(q, cos, sin), kernel(k, cos, sin))
    except Exception:  # another signature or layout: leave it alone
        return None
    tol = 1e-5 if p.dtype == torch.float32 else 1e-2
    ok = all(r.shape == o.shape and r.dtype == o.dtype and torch.allclose(r.float(), o.float(), rtol=tol, atol=tol)
             for r, o in zip(ref, got))
    return module if ok else None


@contextlib.contextmanager
def fused_rope(module: ModuleType | None, kernel=rope_triton) -> Iterator[None]:
    """Inside the block, ``module.apply_rotary_pos_emb`` runs ``kernel`` in this thread (where it applies);
    other threads outside such a block keep the module's own function, and the module has it back once no
    thread is inside one."""
    if module is None:
        yield
        return
    key = id(module)  # (not its name: a module reloaded, or remote code loaded twice, is another object)
    with _rope_lock:
        entry = _rope_patched.get(key)
        if entry is None:
            original = module.apply_rotary_pos_emb
            entry = _rope_patched[key] = [module, original, 0]  # (the module kept: its id stays its own)
            module.apply_rotary_pos_emb = _dispatching_apply(original, key)
        entry[2] += 1
    stack = _thread_kernels().setdefault(key, [])
    stack.append(kernel)
    try:
        yield
    finally:
        stack.pop()
        with _rope_lock:
            entry[2] -= 1
            if entry[2] == 0:
                module.apply_rotary_pos_emb = entry[1]
                del _rope_patched[key]


# ------------------------------------------------------------------------------ merged projections
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


# ------------------------------------------------------------------------------------ all together
@dataclass
class ModelFusion:
    """What of one model runs through the fused kernels (see the module docstring)."""

    norms: list[torch.nn.Module] = field(default_factory=list)
    rope_module: ModuleType | None = None
    merged: list[MergedGroup] = field(default_factory=list)

    @classmethod
    def find(cls, model: torch.nn.Module) -> ModelFusion:
        """Check ``model``'s norms, rotary function and projections against the kernels (merging the
        projections' weights in place; see the module docstring)."""
        return cls(fusable_rms_norms(model), fusable_rope(model), merge_projections(model))

    def __bool__(self) -> bool:
        return bool(self.norms) or self.rope_module is not None or bool(self.merged)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the model runs the fused kernels; its own forwards come back after."""
        with fused_rms_norms(self.norms), fused_rope(self.rope_module), merged_projections(self.merged):
            yield
