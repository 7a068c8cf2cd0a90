"""Multi-head attention with a choice of kernel: PyTorch's SDPA or the explicit math, picked per call.

Why not always SDPA: on CPU in bf16 its kernels lose to the three explicit ops in two cases, measured in
``benchmarks/attention_kernels.py`` on the shapes of the shipped models: with a boolean mask (text padding, the
prior's causal mask; 1.4-1.8x slower, forward only) and whenever a backward pass follows (its flash backward is
1.9-4x slower for the unCLIP Unet and prior). Unmasked bf16 inference is where SDPA wins most (2.4x on the
``sd3-shapes`` joint attention). In fp32, and on GPUs, SDPA wins or ties. So ``"auto"`` uses the explicit math for
low-precision CPU tensors that are masked or need gradients, and SDPA everywhere else. Both compute the same
function; ``tests/nn/test_attention.py`` checks them against each other and an fp64 reference, masks included.

    out = attention(q, k, v, mask)            # q (B, H, N, d), k/v (B, H, M, d), mask broadcastable to (B, H, N, M)
    with attention_kernel("sdpa"): ...        # force one kernel (benchmarks, equivalence tests)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from t2i.errors import check_choice

KERNELS = ("auto", "sdpa", "math")
_kernel = "auto"


@contextmanager
def attention_kernel(name: str) -> Iterator[None]:
    """Use ``name`` ("auto", "sdpa" or "math") for every ``attention`` call inside the block."""
    global _kernel
    check_choice("attention kernel", name, KERNELS)
    old, _kernel = _kernel, name
    try:
        yield
    finally:
        _kernel = old


def pick_kernel(q: Tensor, masked: bool = False) -> str:
    """The kernel ``attention`` uses for ``q`` (with a mask or not) under the current setting."""
    if _kernel != "auto":
        return _kernel
    if q.device.type != "cpu" or q.dtype not in (torch.bfloat16, torch.float16):
        return "sdpa"
    needs_grad = torch.is_grad_enabled() and q.requires_grad
    return "math" if masked or needs_grad else "sdpa"


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, dropout_p: float = 0.0) -> Tensor:
    """Softmax attention; ``mask`` is boolean, True where a query may attend to a key."""
    if pick_kernel(q, masked=mask is not None) == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    (n, d), m = q.shape[-2:], k.shape[-2]
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])  # leading dims broadcast, as in q @ k^T
    q3, k3 = q.expand(*batch, n, d).reshape(-1, n, d), k.expand(*batch, m, d).reshape(-1, m, d)
    # the 1/sqrt(d) scale rides on the matmul (baddbmm's alpha) instead of a pass over q or the scores
    scores = torch.baddbmm(q3.new_zeros(()).expand(q3.shape[0], n, m), q3, k3.transpose(1, 2), beta=0, alpha=d**-0.5)
    scores = scores.view(*batch, n, m)  # (B, H, N, M), in the inputs' precision
    if mask is not None:
        # the dtype's lowest value, not -inf: a row with every key masked gives uniform weights instead of NaN
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    if scores.requires_grad:
        # training: the softmax in the inputs' dtype (the kernels accumulate bf16/fp16 in fp32 internally, as
        # SDPA's do), whose forward + backward is faster on CPU than a round trip through an fp32 copy
        probs = scores.softmax(-1)
    else:  # inference: the fp32 softmax kernel with the upcast fused into it is the faster forward
        probs = torch.softmax(scores, -1, dtype=torch.float32).to(v.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return probs @ v
