"""What the side-by-side comparisons share (vs_diffusers.py, vs_dalle2_pytorch.py): timing two implementations
alternately, so that load from other processes meets both alike."""

from __future__ import annotations

import time
from collections.abc import Callable


def alternate(f_a: Callable[[], object], f_b: Callable[[], object], repeats: int,
              sync: Callable[[], None] = lambda: None) -> tuple[list[float], list[float]]:  # fmt: skip
    """Seconds of each of ``repeats`` runs of ``f_a`` and ``f_b``, interleaved, after one warm-up run each;
    ``sync`` waits for queued device work (``torch.cuda.synchronize``) before a clock is read."""
    f_a(), f_b()
    sync()
    a, b = [], []
    for _ in range(repeats):
        for f, out in ((f_a, a), (f_b, b)):
            t0 = time.perf_counter()
            f()
            sync()
            out.append(time.perf_counter() - t0)
    return a, b
