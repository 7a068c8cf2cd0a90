"""SDPA against the explicit-math attention kernel (``t2i.nn.attention``), fp32 and bf16: training (forward +
backward) and inference (forward without gradients).

    python benchmarks/attention_kernels.py [--threads 1]

Training shapes: the unCLIP Unet's cross-attention at its two attention levels of the DALLE2 comparison config (32x32
and 16x16 feature maps, 8 heads x 32, 82 context tokens with key padding), its 16x16 self-attention, and the prior's
causal self-attention (batch 32, 8 heads x 64, 81 tokens), ``sd3-shapes``' joint and image-only attention at its
training batch (64 images) and the joint attention of the diffusers comparison's MMDiT. Inference shapes: the shipped
models at their default sampling batch (64 prompts, classifier-free guidance doubling it): ``sd3-shapes``' joint
attention (64 latent + 56 text tokens) and its MMDiT-X image-only attention, the ``unclip-shapes`` decoder's cross-
and self-attention, and its prior (two candidates per prompt, causal). Median of ``--repeats`` calls.
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
    "sd3-shapes joint": (64, 4, 120, 120, 32, None),  # its training batch: 64 latent + 56 text tokens
    "sd3-shapes image-only": (64, 4, 64, 64, 32, None),
    "mmdit-bench joint": (4, 4, 333, 333, 64, None),  # benchmarks/vs_diffusers.py's config
}
INFERENCE_CASES = {
    "sd3-shapes joint": (128, 4, 120, 120, 32, None),
    "sd3-shapes image-only": (128, 4, 64, 64, 32, None),
    "unclip decoder cross 16x16": (128, 4, 256, 28, 32, "padding"),
    "unclip decoder self 8x8": (128, 4, 64, 64, 32, None),
    "unclip prior causal": (256, 4, 29, 29, 32, "causal"),
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
    for train, cases in ((True, CASES), (False, INFERENCE_CASES)):
        what = "training: forward + backward" if train else "inference: forward, no gradients"
        print(f"\n{what}; ms per call, median of {args.repeats}, {args.threads} thread(s)\n")
        table(cases, train, args.repeats, g)


def table(cases: dict, train: bool, repeats: int, g: torch.Generator) -> None:
    print("| case | dtype | SDPA | math | SDPA / math |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, (b, h, n, m, d, kind) in cases.items():
        mask = None
        if kind == "padding":
            mask = (torch.arange(m)[None] < torch.randint(20, m + 1, (b, 1), generator=g))[:, None, None, :]
        elif kind == "causal":
            mask = torch.ones(n, m, dtype=torch.bool).tril()
        for dtype in (torch.float32, torch.bfloat16):
            q = torch.randn(b, h, n, d, generator=g).to(dtype).requires_grad_(train)
            k, v = (torch.randn(b, h, m, d, generator=g).to(dtype).requires_grad_(train) for _ in range(2))
            grad = torch.randn(b, h, n, d, generator=g).to(dtype)
            ms = {}
            for kernel in ("sdpa", "math"):

                def step(kernel=kernel, q=q, k=k, v=v, mask=mask, grad=grad):
                    with attention_kernel(kernel), torch.set_grad_enabled(train):
                        out = attention(q, k, v, mask)
                        if train:
                            out.backward(grad)

                ms[kernel] = timed(step, repeats)
            dt = str(dtype).removeprefix("torch.")
            print(f"| {name} | {dt} | {ms['sdpa']:.2f} | {ms['math']:.2f} | {ms['sdpa'] / ms['math']:.2f}x |")


if __name__ == "__main__":
    main()
