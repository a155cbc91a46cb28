"""Peak memory of a block of code, on any device, so that memory estimates can be checked against measurements.

    with PeakMemory() as meter:
        loss = step(model, batch)
        loss.backward()
    print(meter.peak_bytes)  # the most bytes alive at once above the level at entry

On CUDA it reads the caching allocator's statistics (`reset_peak_memory_stats` / `max_memory_allocated`). Elsewhere
(CPU, MPS) there is no allocator to ask, so it watches every tensor operation through a `TorchDispatchMode`: each
new storage an operation creates is counted once, and uncounted again when the storage is freed (a
`weakref.finalize` on it). Tensors that existed before entry (the weights) are never counted, nor are outputs
that share an input's storage (views, in-place results), so a view of a weight or of a counted tensor adds
nothing. Autograd runs its backward operations through the same dispatcher, so gradients and the temporaries of
the backward pass are counted too.

torch's own `torch.distributed._tools.mem_tracker.MemTracker` (torch 2.13) does the same bookkeeping on CPU, but
counts a view of a pre-existing tensor (e.g. the `w.t()` a matmul's backward takes of a weight) as a new
allocation that stays counted while the weight lives: after `(w @ w).tanh().sum().backward()` and `w.grad = None`
it still reports a weight's size in use. It also hooks every module and copies snapshots at each new peak, which
is slow. Hence this small meter.
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _StorageTracker(TorchDispatchMode):
    """Counts the bytes of storages created by tensor operations while active, and their peak."""

    def __init__(self):
        super().__init__()
        self.current_bytes = 0
        self.peak_bytes = 0
        self._sizes: dict[int, int] = {}  # storage address (C++ object) -> bytes counted for it
        self._lock = threading.Lock()  # finalizers may run on autograd's worker threads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        inputs = {key for key in map(_storage_key, tree_leaves((args, kwargs))) if key is not None}
        for tensor in tree_leaves(output):
            self._count(tensor, inputs)
        return output

    def _count(self, tensor, input_keys: set[int]) -> None:
        storage = _storage(tensor)
        if storage is None:
            return
        key = storage._cdata
        if key in input_keys and key not in self._sizes:
            return  # a view or in-place result of a tensor from before entry: no new memory
        size = storage.nbytes()
        with self._lock:
            known = self._sizes.get(key)
            if known is None:
                self._sizes[key] = size
                self._add(size)
                weakref.finalize(storage, self._release, key)
            elif known != size:  # an in-place resize of a counted storage
                self._sizes[key] = size
                self._add(size - known)

    def _add(self, size: int) -> None:
        self.current_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)

    def _release(self, key: int) -> None:
        with self._lock:
            self.current_bytes -= self._sizes.pop(key, 0)


def _storage(tensor) -> torch.UntypedStorage | None:
    """The storage behind `tensor`, or None for what holds no memory of its own (meta, sparse, non-tensors)."""
    if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta" or tensor.layout != torch.strided:
        return None
    try:
        return tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
        return None


def _storage_key(tensor) -> int | None:
    storage = _storage(tensor)
    return None if storage is None else storage._cdata


class PeakMemory:
    """Context manager measuring the peak bytes allocated above the level at entry.

    `device`: a CUDA device (the allocator's statistics are used), or anything else / None for the dispatch
    tracker, which sees tensors on every device. `peak_bytes` and `current_bytes` are read after (or during) the
    block; `method` says which way they were measured.
    """

    def __init__(self, device: str | torch.device | None = None):
        self.device = torch.device(device) if device is not None else None
        self.method = "cuda" if self.device is not None and self.device.type == "cuda" else "dispatch"
        self._tracker: _StorageTracker | None = None
        self._base = 0
        self._peak = 0

    def __enter__(self) -> PeakMemory:
        if self.method == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._tracker = _StorageTracker()
            self._tracker.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.method == "cuda":
            torch.cuda.synchronize(self.device)
            self._peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._tracker.__exit__(*exc_info)

    @property
    def peak_bytes(self) -> int:
        if self.method == "cuda":
            return self._peak or (torch.cuda.max_memory_allocated(self.device) - self._base)
        return self._tracker.peak_bytes if self._tracker else 0

    @property
    def current_bytes(self) -> int:
        """Bytes created inside the block that are still alive."""
        if self.method == "cuda":
            return torch.cuda.memory_allocated(self.device) - self._base
        return self._tracker.current_bytes if self._tracker else 0
