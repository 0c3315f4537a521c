"""Peak bytes of tensor storage allocated by PyTorch ops, measured deterministically on any device.

``torch.cuda.max_memory_allocated`` has no CPU counterpart, and timing-free tests need a number
that does not depend on the allocator or on other processes. ``StoragePeak`` is a dispatch mode
that sees every op's outputs: a storage it has not seen (and that no input of the op shares, so
views and in-place ops count nothing) is an allocation; the storage's finaliser is its release.
The peak is taken over op boundaries, so buffers an op frees before returning are not seen; both
caches compared here run the same model ops, so the comparison is like for like.

    with StoragePeak() as mem:
        model.generate(...)
    mem.peak  # bytes above what was allocated before the block
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storage_ptrs(values) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tree_flatten(values)[0] if isinstance(t, torch.Tensor)}


class StoragePeak(TorchDispatchMode):
    """Live and peak bytes of the storages that ops inside the block allocate."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: set[int] = set()

    def _release(self, ptr: int, nbytes: int) -> None:
        self._live.discard(ptr)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = None
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.is_meta:
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if ptr == 0 or ptr in self._live:
                continue
            if inputs is None:
                inputs = _storage_ptrs((args, kwargs))
            if ptr in inputs:  # a view or an in-place result: no new memory
                continue
            self._live.add(ptr)
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._release, ptr, nbytes)
        return out
