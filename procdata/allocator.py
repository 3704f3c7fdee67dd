"""Keep freed memory in the process heap while generating.

Generators allocate many short-lived blocks of 0.1–30 MB per batch. glibc's malloc serves blocks
that large by ``mmap`` and unmaps them on free, so each batch faults every page back in; under a
sandboxed kernel that costs more than the arithmetic (measured: the shader generator runs 1.5×
faster with the heap kept). ``keep_heap`` raises the mmap and trim thresholds once per process,
the in-process form of ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``. The cost is that
the process keeps its peak heap instead of returning it to the OS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3


@functools.cache
def keep_heap(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 31, top_pad: int = 64 << 20) -> bool:
    """Set glibc's malloc thresholds for this process; False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(option, min(value, 2 ** 31 - 1)) == 1 for option, value in
               ((M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold), (M_TOP_PAD, top_pad)))
