"""Flush-to-zero and denormals-are-zero on the threads that run a model on the CPU.

float32 values below 1.2e-38 (subnormals) cost some x86 CPUs ~45x per operation, so a
model whose activations or weights underflow runs tens of times slower there than on
others (benchmarks/bench_denormals.py: 57-148x). Flushed, every such operand and result
counts as 0, on every CPU alike; in ordinary models no output moves (none did there).

The switches are per thread: MXCSR's FTZ and DAZ bits on x86-64, FPCR's FZ bit on AArch64
(inputs and results). onnxruntime's session entry ``session.set_denormal_as_zero`` sets
them on the session's intra-op pool threads (x86 only: its SetDenormalAsZero does nothing
elsewhere) and on the thread constructing the process's first session (a std::call_once
in inference_session.cc), never on the thread that later calls ``run``: at one intra-op
thread there is no pool and the entry alone changes nothing. So the server also sets them
on each thread that calls ``run``, and constructs sessions on a flushed thread, whose pool
threads inherit its environment ([cfenv.thread]; what covers AArch64 pools), restoring the
constructing thread afterwards. Through libm's fegetenv/fesetenv (ctypes: no compiler, no
torch). glibc has no FE_DFL_DISABLE_SSE_DENORMS_ENV (that is macOS's), and handing its
fesetenv ``(fenv_t *) -3`` segfaults: the bits are set in a copy of the thread's own.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import platform
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from serving.compat import EngineError, load_sidecar, sidecar_path

ORT_CONFIG_KEY = "session.set_denormal_as_zero"
SIDECAR_KEY = "flush_denormals"  # in an onnxruntime engine's sidecar: what its accuracy run used

# Where the switches sit in glibc's and musl's fenv_t (bits/fenv.h): (uint32 word, bits).
_SWITCHES = {
    "x86_64": (7, 0x8040),  # __mxcsr at byte 28: FTZ (bit 15) | DAZ (bit 6)
    "aarch64": (0, 1 << 24),  # __fpcr: FZ
}
_ENV_WORDS = 8  # fenv_t is 32 bytes on x86-64 and 8 on AArch64: room for either


@functools.cache
def _libm() -> tuple[ctypes.CDLL, int, int]:
    machine = platform.machine().lower()
    if sys.platform != "linux" or machine not in _SWITCHES:
        raise EngineError(
            f"flushing denormals needs Linux on x86_64 or aarch64, not {sys.platform} on "
            f"{platform.machine()}: serve with --no-flush-denormals, or build the engine with "
            "engine.flush_denormals: false"
        )
    return (ctypes.CDLL(ctypes.util.find_library("m")), *_SWITCHES[machine])


def _environment(libm: ctypes.CDLL) -> ctypes.Array:
    env = (ctypes.c_uint32 * _ENV_WORDS)()
    if libm.fegetenv(env) != 0:
        raise EngineError("fegetenv failed: cannot read this thread's floating-point environment")
    return env


def flush_denormals() -> None:
    """Flush subnormals to zero on the calling thread from now on (EngineError if it can't)."""
    libm, word, bits = _libm()
    env = _environment(libm)
    env[word] |= bits
    libm.fesetenv(env)
    tiny = sys.float_info.min  # Python floats are computed by this thread's FPU
    if tiny * 0.5 != 0.0:
        raise EngineError("setting the flush-to-zero bits had no effect on this CPU")


@contextlib.contextmanager
def flushed(on: bool = True) -> Iterator[None]:
    """Flush subnormals on this thread within the block (when ``on``), then restore."""
    if not on:
        yield
        return
    libm = _libm()[0]
    saved = _environment(libm)
    try:
        flush_denormals()
        yield
    finally:
        libm.fesetenv(saved)


def require() -> None:
    """EngineError (one line) unless this host can flush; tried on this thread, then undone."""
    with flushed():
        pass


def for_session(options: Any, on: bool) -> contextlib.AbstractContextManager:
    """Have the onnxruntime session built on ``options`` flush (when ``on``): the entry for
    its pool threads on x86, and the block to construct it in, whose environment they inherit."""
    if on:
        options.add_session_config_entry(ORT_CONFIG_KEY, "1")
    return flushed(on)


def decide(flag: bool | None, engine: Path) -> bool:
    """``flag`` if given, else what the engine's sidecar records (the setting its accuracy
    was measured with; off without one); EngineError if that is on and this host can't."""
    on = _recorded(engine) if flag is None else flag
    if on:
        require()
    return on


def _recorded(engine: Path) -> bool:
    if not sidecar_path(engine).is_file():
        return False
    value = load_sidecar(engine).get(SIDECAR_KEY, False)
    if not isinstance(value, bool):
        raise EngineError(
            f"sidecar {sidecar_path(engine)}: {SIDECAR_KEY} must be true or false, not {value!r}"
        )
    return value
