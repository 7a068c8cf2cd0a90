"""Whether bf16 pays on this machine.

bf16 autocast is a fast path only where the hardware multiplies bf16 natively: AVX-512 BF16 or AMX on x86, the
BF16 extension on Arm, any recent GPU. Elsewhere (an AVX2-only CPU, for one) PyTorch emulates the bf16 matmul, and
it runs tens of times slower than fp32: on a 2-core AVX2 EPYC a 512-cube matmul does 41 GFLOP/s in fp32 and 0.9 in
bf16. A model folder that asks for bf16, or a training config written on a machine that had it, must not make a
user on such a machine wait 40x longer.

On x86 the answer is the CPU's own: bf16 is native where it has AVX-512 BF16 or AMX tiles, as PyTorch's cpuinfo
reports them. A timing alone is not enough there: on an AVX-512 Xeon without BF16 (Ice Lake class) emulation is
only 3-10x slower than fp32, not tens of times, and the first version of this check (the best of two single 256-cube
products, about 0.2 ms each in fp32, shorter than the jitter of a shared core) returned 0.25x to 5.9x on it from one
run to the next, so a process picked emulated bf16 for a shipped model about half the time. Elsewhere (Arm's BF16
extension, a PyTorch build without the query) a measurement decides: a 256-cube matmul in each dtype on one thread,
each timed in rounds of at least 2 ms of repeated products, the best round kept (another job can only add time),
after one untimed product at that size (kernel selection), against a 1.5x threshold: native bf16 is at most about
as slow as fp32 at this size and faster on large matmuls (7x fp32 on an AMX CPU, 2.3x on an AVX-512 BF16 EPYC;
docs/performance.md), emulation 3x and more. The factor is also what `t2i info` and the advice below print; it
costs about 15 ms where bf16 is native and 0.1-0.3 s where it is emulated (fp32 then saves that many times over).
"""

from __future__ import annotations

import functools
import platform
import time

import torch

NATIVE_THRESHOLD = 1.5  # where no CPU flag says: native when a bf16 matmul takes at most this many times fp32's
_SIZE = 256  # big enough that the kernel, not the call or a layout reorder, dominates
_ROUND_SECONDS = 2e-3  # each timed round repeats the product for at least this long
_ROUNDS = 3


def _per_call_seconds(a: torch.Tensor, b: torch.Tensor, clock=time.perf_counter) -> float:
    """Seconds per ``a @ b``: the best of ``_ROUNDS`` rounds, each repeating the product until it has run for
    ``_ROUND_SECONDS``, after one untimed product (the kernel library's first call at this size and dtype)."""
    a @ b
    best = float("inf")
    for _ in range(_ROUNDS):
        calls, start = 0, clock()
        while True:
            a @ b
            calls += 1
            elapsed = clock() - start
            if elapsed >= _ROUND_SECONDS:
                break
        best = min(best, elapsed / calls)
    return best


@functools.cache
def bf16_slowdown(device_type: str = "cpu") -> float:
    """bf16 matmul time over fp32 matmul time on ``device_type`` (a (256, 256) @ (256, 256) product on one thread,
    ``_per_call_seconds``; measured once per process). Below 1 where bf16 is faster; 1.0 for GPUs, whose bf16
    support is checked instead (``bf16_is_native``)."""
    if device_type != "cpu":
        return 1.0
    g = torch.Generator().manual_seed(0)
    a = torch.randn(_SIZE, _SIZE, generator=g)
    b = torch.randn(_SIZE, _SIZE, generator=g)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: a busy second core (another job) does not stall the fp32 timing
    try:
        fp32 = _per_call_seconds(a, b)
        bf16 = _per_call_seconds(a.bfloat16(), b.bfloat16())
    finally:
        torch.set_num_threads(threads)
    return bf16 / max(fp32, 1e-9)


def bf16_is_native(device_type: str = "cpu") -> bool:
    """True where bf16 autocast is a fast path on ``device_type``: a CUDA device that supports bf16, an x86 CPU with
    AVX-512 BF16 or AMX (``x86_bf16_units``), or another CPU whose bf16 matmul is at most ``NATIVE_THRESHOLD`` times
    slower than its fp32 one (``bf16_slowdown``)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return True  # mps / xpu: trust the backend, which only offers bf16 where the hardware has it
    units = x86_bf16_units()
    if units is not None:
        return units
    return bf16_slowdown("cpu") <= NATIVE_THRESHOLD


@functools.cache
def x86_bf16_units() -> bool | None:
    """Whether this x86 CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX tiles), as PyTorch's cpuinfo reads
    its flags; None on other architectures or where this PyTorch cannot say (then ``bf16_slowdown`` decides)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "x86", "i386", "i686"):
        return None
    try:  # private, but the query inductor itself uses; guarded against a build that lacks it
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return None


def bf16_advice(device_type: str = "cpu") -> str:
    """One line for users: why bf16 would be slow here, with the measured factor on CPUs."""
    if device_type != "cpu":
        return f"this {device_type} device does not support bf16"
    return f"this CPU has no native bf16 matmul (a bf16 matmul measured {bf16_slowdown('cpu'):.0f}x slower than fp32)"


def timed_precisions(device_type: str = "cpu") -> list[str]:
    """The precisions a benchmark should time on ``device_type`` by default: fp32, and bf16 where it is native. An
    emulated bf16 run takes tens of times longer and measures PyTorch's fallback, not the code being compared."""
    return ["fp32", "bf16"] if bf16_is_native(device_type) else ["fp32"]
