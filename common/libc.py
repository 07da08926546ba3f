"""System calls that Python's os module lacks (syncfs, prctl, renameat2), looked up once in the C library.

ctypes is loaded on the first such call, not at import: it is among the slowest modules to load and a
command's `--help` never needs it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable


@functools.cache
def libc_function(name: str, argtypes: tuple[str, ...]) -> Callable[..., int] | None:
    """The C library's function `name` taking C types named like ctypes' own ("int", "ulong", "char_p", "uint"),
    returning an int and setting errno; None where this system has none."""
    import ctypes

    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (AttributeError, OSError):
        return None
    function.argtypes = [getattr(ctypes, f"c_{type_name}") for type_name in argtypes]
    function.restype = ctypes.c_int
    return function


def last_errno() -> int:
    """errno as the last call through libc_function left it."""
    import ctypes

    return ctypes.get_errno()
