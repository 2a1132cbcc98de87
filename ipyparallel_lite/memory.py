"""Handing memory a process has freed back to the operating system.

glibc's allocator keeps freed heap memory for reuse instead of returning it. After a
large transfer made of many buffers below its mmap threshold (which grows to 32 MB
once a large buffer was freed), a controller that dropped those buffers would still
hold their pages: 1 MB frames of a 500 MB round trip stayed 880 MB resident after
they were purged. ``malloc_trim`` returns the free pages; it is only worth its cost
after big frees, so callers use it then, not per message.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys


def _load_malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


_malloc_trim = _load_malloc_trim()


def release_free_memory() -> bool:
    """Return freed heap pages to the OS where the allocator supports it (glibc);
    whether it could try."""
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True
