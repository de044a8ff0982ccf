"""Handing freed host memory back to the operating system (glibc), so RSS tracks what
is alive, not what glibc's heap kept: the figure `bench/gptq_memory.py` holds to a target.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_MMAP_THRESHOLD = 4 << 20


@functools.cache
def _glibc():
    """libc, looked up once: `find_library` runs ldconfig in a subprocess, and this is now
    called between every two solves."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def give_back_freed_memory(first: bool = False) -> None:
    """Make freed layers leave the process, not just the Python heap.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MB), after
    which a layer's 8-32 MB tensors come from the heap, whose freed middle is not returned:
    RSS then grew layer after layer (past 2.2 GB on the 1.2B bench model, floor 0.49). A
    fixed 4 MB threshold keeps every weight-sized block in its own mapping, unmapped when
    freed; `malloc_trim` returns what the heap still holds. Called between the solves of
    a layer too: the blocks under the threshold that a solve frees (its column blocks and
    grids) otherwise stayed in the heap, and RSS before a layer's last solve ran 0.4-0.5 GB
    above what was alive (1.2B bench model, down_proj). No-op off glibc.
    """
    libc = _glibc()
    if libc is None:
        return
    if first:
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    libc.malloc_trim(0)
