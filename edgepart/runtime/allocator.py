"""The process-wide malloc settings a worker runs with, shared by everything that times kernels for it."""
from __future__ import annotations

import ctypes
import ctypes.util

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Keep memory freed by one request's tensors for the next instead of handing it back to the OS.

    glibc serves allocations above its mmap threshold with fresh mmaps and trims the heaps of the
    compute and reader threads' arenas when they free, so every stage of every request page-faulted
    its activations and received pieces in again: 1000–2100 minor faults per request in the first,
    high-resolution stage of a MobileNetV2 split (1.3–1.7× its compute time, where the same stage
    run in one process faulted 0 times). Even glibc's largest mmap threshold (32 MiB) left a
    1024→1024 3×3 convolution's 38 MB of reordered weights mmapped afresh on every call: 9,231
    faults per YOLOv2-tiny request, 74 ms where the same worker takes 64 ms without them. So mmap is
    not used at all and heaps are never trimmed: a worker's memory grows to its largest request once
    and stays there. And every thread allocates from the main heap (one arena): a thread's own
    arena grows in heaps of at most 64 MiB, an allocation that does not fit the current one gets a
    new heap, and glibc unmaps a heap as soon as it is entirely free, trim threshold or not — the
    same 38 MB buffer, next to 30 MB a compute thread held, faulted 9,729 times per call (an
    `aofl` plan's edge stage of YOLOv2-tiny: 9,217 faults per request, 89 ms of CPU where the whole
    model takes 77); with the main heap, 0 after the first call. Call it before the threads that
    allocate start. Returns whether it took effect (False off glibc)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
    _applied = (bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2 ** 31 - 1))
                and bool(mallopt(m_arena_max, 1)))
    return _applied


def release_memory() -> bool:
    """Hand freed heap memory back to the OS now (glibc ``malloc_trim(0)``): the top of the heap and
    every free page inside it. :func:`keep_freed_memory` turns automatic trimming off so requests do
    not page-fault their buffers in again; this is for the moments that free much more than a
    request uses — after a deploy (the manifest, the files' buffers), a profile, or a flood of
    connections that never authenticated — so memory taken once is not kept for ever. The next
    request may fault its buffers in once. Returns whether anything was released (False off glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError, TypeError):
        return False
