"""Multi-head attention with a choice of kernel: PyTorch's SDPA or the explicit math, picked per call.

Why not always SDPA: on CPU, under bf16 autocast, its flash kernel (forward and backward) is 1.7-3x slower than the
three explicit ops for the shapes of the unCLIP Unet and prior (a few hundred to a thousand queries, 32-64 wide
heads, short text contexts); measured in ``benchmarks/attention_kernels.py``. In fp32, and on GPUs, SDPA wins. So
``"auto"`` uses the explicit math for low-precision CPU tensors and SDPA everywhere else. Both compute the same
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


def pick_kernel(q: Tensor) -> str:
    """The kernel ``attention`` uses for ``q`` under the current setting."""
    if _kernel != "auto":
        return _kernel
    low_precision = q.dtype in (torch.bfloat16, torch.float16)
    return "math" if q.device.type == "cpu" and low_precision else "sdpa"


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, dropout_p: float = 0.0) -> Tensor:
    """Softmax attention; ``mask`` is boolean, True where a query may attend to a key."""
    if pick_kernel(q) == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (B, H, N, M), in the inputs' precision
    if mask is not None:
        # the dtype's lowest value, not -inf: a row with every key masked gives uniform weights instead of NaN
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = scores.float().softmax(-1).to(v.dtype)  # the normalisation in fp32, as SDPA's kernels do
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return probs @ v
