"""A signal stack of our own for threads that compile or release OpenVINO graphs.

OpenVINO's CPU plugin (seen with 2026.4), when it compiles a graph with bf16 or int8
kernels, gives the compiling thread an alternate signal stack of its own (11.5 KB, sized
for AMX tile state) and puts the previous one back when that compiled model is destroyed.
Destroyed in another order than created (two precisions timed against each other by
`--precision auto`, a Segmenter's several modes), the thread is left pointing at the freed
stack of the first, and the next signal delivered to it (SIGTERM from Slurm's scancel or
systemd, Ctrl-C) kills the process with SIGSEGV instead of stopping it cleanly: no
cleanup runs, and a half-written file stays in the output folder.

`own_signal_stack()` gives the calling thread a stack that is allocated once per thread and
never freed, large enough for any CPU's signal frame (AMX included), so whatever the plugin
installed or put back, the thread's signal stack is always valid memory. Linux only (the
other platforms this code runs on have no such plugin behaviour to repair); a no-op
elsewhere.
"""

from __future__ import annotations

import ctypes
import sys
import threading

# Far above the kernel's AT_MINSIGSTKSZ with AMX state (~11 KB) and MINSIGSTKSZ (2 KB).
STACK_BYTES = 256 * 1024


class _StackT(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int),
                ("ss_size", ctypes.c_size_t)]


_stacks: dict[int, ctypes.Array[ctypes.c_char]] = {}  # thread id -> its stack, kept forever
_lock = threading.Lock()


def current_signal_stack() -> tuple[int, int] | None:
    """(address, size) of the calling thread's alternate signal stack, None when it has
    none (disabled) or on a platform without sigaltstack."""
    if not sys.platform.startswith("linux"):
        return None
    state = _StackT()
    if ctypes.CDLL(None).sigaltstack(None, ctypes.byref(state)) != 0:
        return None
    ss_disable = 2
    return None if state.ss_flags & ss_disable else (state.ss_sp or 0, state.ss_size)


def own_signal_stack() -> None:
    """Install this thread's own never-freed signal stack (see the module docstring)."""
    if not sys.platform.startswith("linux"):
        return
    ident = threading.get_ident()
    with _lock:
        buffer = _stacks.setdefault(ident, ctypes.create_string_buffer(STACK_BYTES))
    stack = _StackT(ctypes.cast(buffer, ctypes.c_void_p).value, 0, STACK_BYTES)
    # Fails only with EPERM while this thread runs on its current signal stack, which
    # compiling or releasing a graph never does.
    ctypes.CDLL(None).sigaltstack(ctypes.byref(stack), None)
