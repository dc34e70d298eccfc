"""What the machine offers that decides numerics and speed: CPU features and the default dtype.

``dtype: auto`` resolves here (``choose_dtype``): bfloat16 on GPUs and TPUs; on a CPU,
bfloat16 only where the CPU has bfloat16 dot units, else float32. A CPU without them
runs bfloat16 dots by converting to float32 and back, which is slower than float32;
one with them runs the ParallelComp prefill about twice as fast in bfloat16 (both
measured in docs/bench/cpu_bf16/).
"""

from __future__ import annotations

import dataclasses
import functools
import sys

__all__ = ["BF16_CPU_FLAGS", "DtypeChoice", "choose_dtype", "cpu_flags", "read_cpu_flags"]

# Linux /proc/cpuinfo flags of x86 units that compute bfloat16 dot products natively:
# AVX512-BF16 (vdpbf16ps; Cooper Lake, Sapphire Rapids, AMD Zen 4 and later) and AMX-BF16
# (tile matmuls; Sapphire Rapids and later).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = "/proc/cpuinfo"


def read_cpu_flags(text: str) -> frozenset[str]:
    """The feature flags of the first processor in a ``/proc/cpuinfo`` text (x86 ``flags``
    line, or the ARM ``Features`` line); empty when there is none."""
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This machine's CPU feature flags (``read_cpu_flags`` of ``/proc/cpuinfo``); empty where
    the file does not exist (macOS, Windows) or cannot be read."""
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as f:
            return read_cpu_flags(f.read())
    except OSError:
        return frozenset()


@dataclasses.dataclass(frozen=True)
class DtypeChoice:
    """What ``dtype: auto`` chose (``"float32"`` or ``"bfloat16"``) and why, in words."""

    dtype: str
    reason: str


def choose_dtype(backend: str, flags: frozenset[str] | set[str]) -> DtypeChoice:
    """``dtype: auto`` for a JAX ``backend`` (``"cpu"``, ``"gpu"``, ``"tpu"``, ...) and the
    CPU's feature ``flags`` (used only on ``"cpu"``). Pure: tests give any flags."""
    if backend != "cpu":
        return DtypeChoice("bfloat16", f"the {backend} backend computes bfloat16 dots natively")
    units = [name for name in BF16_CPU_FLAGS if name in flags]
    if units:
        return DtypeChoice("bfloat16", f"the CPU has bfloat16 dot units ({', '.join(units)})")
    if not flags:
        return DtypeChoice("float32", "the CPU's features could not be read, so bfloat16 dot units are not assumed")
    return DtypeChoice("float32", f"the CPU has no bfloat16 dot units (neither {' nor '.join(BF16_CPU_FLAGS)})")


@functools.cache
def announce_auto_dtype(backend: str) -> DtypeChoice:
    """``choose_dtype`` for this machine, printed once per process to standard error."""
    choice = choose_dtype(backend, cpu_flags())
    print(f"dtype auto: {choice.dtype} ({choice.reason})", file=sys.stderr, flush=True)
    return choice
