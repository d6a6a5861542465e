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
    not used at all (glibc still falls back to it when a thread's 64 MiB heap cannot hold a request)
    and heaps are never trimmed: a worker's memory grows to its largest request once and stays
    there. Returns whether it took effect (False off glibc)."""
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
    m_trim_threshold, m_mmap_max = -1, -4
    _applied = bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2 ** 31 - 1))
    return _applied
