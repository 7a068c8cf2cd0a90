"""Whether bf16 pays on this machine.

bf16 autocast is a fast path only where the hardware multiplies bf16 natively: AVX-512 BF16 or AMX on x86, the
BF16 extension on Arm, any recent GPU. Elsewhere (an AVX2-only CPU, for one) PyTorch emulates the bf16 matmul, and
it runs tens of times slower than fp32: on a 2-core AVX2 EPYC a 512-cube matmul does 41 GFLOP/s in fp32 and 0.9 in
bf16. A model folder that asks for bf16, or a training config written on a machine that had it, must not make a
user on such a machine wait 40x longer.

So the question is answered by measurement, not by reading CPU flags: one 256-cube matmul in each dtype, once per
process, on one thread (cheap where bf16 is native; 0.13-0.2 s where it is emulated, measured beside two other
jobs, which the fp32 path then saves many times over). Emulation measured 15-72x slower than fp32 on that AVX2
machine, while native bf16 is the faster dtype (7x fp32 on large matmuls on an AMX CPU, docs/performance.md), so
a 3x threshold leaves a wide margin on both sides.
"""

from __future__ import annotations

import functools
import time

import torch

NATIVE_THRESHOLD = 3.0  # bf16 counts as native when its matmul takes at most this many times fp32's
_SIZE = 256  # big enough that the kernel, not the call or a layout reorder, dominates


def _best_seconds(a: torch.Tensor, b: torch.Tensor, reps: int = 2) -> float:
    a[:16, :16] @ b[:16, :16]  # the first call initialises the kernel library; a small one keeps it cheap
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return best


@functools.cache
def bf16_slowdown(device_type: str = "cpu") -> float:
    """bf16 matmul time over fp32 matmul time on ``device_type`` (a (256, 256) @ (256, 256) product on one thread,
    best of 2; measured once per process). Below 1 where bf16 is faster; 1.0 for GPUs, whose bf16 support is checked
    instead (``bf16_is_native``)."""
    if device_type != "cpu":
        return 1.0
    g = torch.Generator().manual_seed(0)
    a = torch.randn(_SIZE, _SIZE, generator=g)
    b = torch.randn(_SIZE, _SIZE, generator=g)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: a busy second core (another job) does not stall the fp32 timing
    try:
        fp32 = _best_seconds(a, b)
        bf16 = _best_seconds(a.bfloat16(), b.bfloat16())
    finally:
        torch.set_num_threads(threads)
    return bf16 / max(fp32, 1e-9)


def bf16_is_native(device_type: str = "cpu") -> bool:
    """True where bf16 autocast is a fast path on ``device_type``: a CUDA device that supports bf16, or a CPU whose
    bf16 matmul is at most ``NATIVE_THRESHOLD`` times slower than its fp32 one (``bf16_slowdown``)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return True  # mps / xpu: trust the backend, which only offers bf16 where the hardware has it
    return bf16_slowdown("cpu") <= NATIVE_THRESHOLD


def bf16_advice(device_type: str = "cpu") -> str:
    """One line for users: why bf16 would be slow here, with the measured factor on CPUs."""
    if device_type != "cpu":
        return f"this {device_type} device does not support bf16"
    return f"this CPU has no native bf16 matmul (a bf16 matmul measured {bf16_slowdown('cpu'):.0f}x slower than fp32)"


def timed_precisions(device_type: str = "cpu") -> list[str]:
    """The precisions a benchmark should time on ``device_type`` by default: fp32, and bf16 where it is native. An
    emulated bf16 run takes tens of times longer and measures PyTorch's fallback, not the code being compared."""
    return ["fp32", "bf16"] if bf16_is_native(device_type) else ["fp32"]
