"""System calls that Python's os module lacks (syncfs, prctl, renameat2), looked up once in the C library."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable


@functools.cache
def libc_function(name: str, argtypes: tuple[type, ...]) -> Callable[..., int] | None:
    """The C library's function `name`, returning an int and setting errno; None where this system has none."""
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (AttributeError, OSError):
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return function
