"""Sequential offload: keep a network on the CPU and move it to the accelerator only while it runs.

Both pipelines run their parts one after another (text encoder, then the denoiser, then the decoder; or CLIP,
prior and each cascade stage), so with offload on, accelerator memory holds the largest part instead of the sum.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def placed(module: nn.Module | None, device: torch.device | str | None) -> Iterator[None]:
    """Run the block with ``module`` on ``device`` and put it back where it was afterwards. A ``None`` module or
    device is a no-op, so callers pass ``device if offload else None``."""
    if module is None or device is None:
        yield
        return
    first = next(module.parameters(), None)
    home = first.device if first is not None else torch.device("cpu")
    module.to(device)
    try:
        yield
    finally:
        module.to(home)
