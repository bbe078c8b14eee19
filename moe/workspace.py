"""Scratch buffers kept between calls, for the CPU expert paths' temporaries.

On CPU a fresh large tensor costs page faults: glibc hands large freed blocks back to the kernel,
so the next step's buffer of the same size is faulted in (and zeroed by the kernel) again, 4 KB at
a time. The hand-written expert paths (moe/experts.py) need the same few temporaries on every
call; a lease hands them the buffers of the previous call instead. Only temporaries that die
inside one forward or one backward come from a lease, never a tensor that is saved for backward
or returned, so no result ever aliases a buffer that a later call overwrites.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator

import torch


class Lease:
    """The buffers one call may use until its `with WORKSPACE.lease()` block ends."""

    def __init__(self, free: list[torch.Tensor]):
        self.free, self.used = free, []

    def empty(self, like: torch.Tensor, *shape: int) -> torch.Tensor:
        """An uninitialised tensor of `shape`, like `like.new_empty(shape)`, from a kept buffer if one fits."""
        n = math.prod(shape)
        if like.device.type != "cpu":  # CUDA has its caching allocator; only CPU gains
            return like.new_empty(shape)
        fits = [i for i, b in enumerate(self.free) if b.dtype == like.dtype and b.device == like.device
                and b.numel() >= n]
        if fits:
            buf = self.free.pop(min(fits, key=lambda i: self.free[i].numel()))
        else:  # an eighth spare, so that the next call's few more rows still fit
            buf = like.new_empty(n + n // 8)
        self.used.append(buf)
        return buf[:n].view(shape)


class Workspace:
    """A pool of flat buffers. A lease takes all of them: a nested or concurrent lease finds none
    and allocates fresh ones, so the pool only ever changes speed, never results."""

    def __init__(self, keep: int = 6):
        self.keep = keep  # buffers kept between calls (each expert path's backward uses 6)
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def lease(self) -> Iterator[Lease]:
        with self._lock:
            lease, self._free = Lease(self._free), []
        try:
            yield lease
        finally:
            with self._lock:  # keep the largest
                kept = sorted(lease.used + lease.free + self._free, key=torch.Tensor.numel, reverse=True)
                self._free = kept[:self.keep]

    def clear(self) -> None:
        """Release the kept buffers (their memory goes back to the allocator)."""
        with self._lock:
            self._free = []

    def nbytes(self) -> int:
        with self._lock:
            return sum(b.numel() * b.element_size() for b in self._free)


WORKSPACE = Workspace()
