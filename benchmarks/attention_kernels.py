"""SDPA against the explicit-math attention kernel (``t2i.nn.attention``), forward + backward, fp32 and bf16.

    python benchmarks/attention_kernels.py [--threads 1]

The shapes are the unCLIP Unet's cross-attention at its two attention levels of the DALLE2 comparison config
(32x32 and 16x16 feature maps, 8 heads x 32, 82 context tokens with key padding), its 16x16 self-attention,
and the prior's causal self-attention (batch 32, 8 heads x 64, 81 tokens). Median of ``--repeats`` calls.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from t2i.nn.attention import attention, attention_kernel

CASES = {  # name: (B, H, N, M, d, mask kind)
    "unet cross 32x32": (4, 8, 1024, 82, 32, "padding"),
    "unet cross 16x16": (4, 8, 256, 82, 32, "padding"),
    "unet self 16x16": (4, 8, 256, 256, 32, None),
    "prior causal": (32, 8, 81, 81, 64, "causal"),
}


def timed(fn, repeats: int) -> float:
    fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"forward + backward, ms per call, median of {args.repeats}, {args.threads} thread(s)\n")
    print("| case | dtype | SDPA | math | SDPA / math |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, (b, h, n, m, d, kind) in CASES.items():
        mask = None
        if kind == "padding":
            mask = (torch.arange(m)[None] < torch.randint(20, m + 1, (b, 1), generator=g))[:, None, None, :]
        elif kind == "causal":
            mask = torch.ones(n, m, dtype=torch.bool).tril()
        for dtype in (torch.float32, torch.bfloat16):
            q = torch.randn(b, h, n, d, generator=g).to(dtype).requires_grad_()
            k, v = (torch.randn(b, h, m, d, generator=g).to(dtype).requires_grad_() for _ in range(2))
            grad = torch.randn(b, h, n, d, generator=g).to(dtype)
            ms = {}
            for kernel in ("sdpa", "math"):

                def step(kernel=kernel, q=q, k=k, v=v, mask=mask, grad=grad):
                    with attention_kernel(kernel):
                        attention(q, k, v, mask).backward(grad)

                ms[kernel] = timed(step, args.repeats)
            dt = str(dtype).removeprefix("torch.")
            print(f"| {name} | {dt} | {ms['sdpa']:.2f} | {ms['math']:.2f} | {ms['sdpa'] / ms['math']:.2f}x |")


if __name__ == "__main__":
    main()
