"""A distribution metric that needs no downloaded weights: Fréchet distance and KID in a shipped probe's features.

FID (Heusel et al. 2017) needs Inception weights that no package ships offline, and pixel-space statistics
barely see blur or a dropped mode. So t2i trains its own small CNN on ground-truth shapes scenes (which shapes
in which colours, how many objects, which letters: ``t2i/eval/train_features.py``) and ships its weights,
fp16 safetensors, next to this file. The Fréchet distance ("FD-probe") and the kernel inception distance
(KID, Bińkowski et al. 2018, cubic polynomial kernel, unbiased) are computed in its 128-d penultimate layer,
standardised by the ground truth's per-dimension mean and spread.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS = Path(__file__).with_name("shapes_features.safetensors")
INPUT_SIZE = 32  # images are box-downsampled to 32 px, so 32 and 64 px runs share one feature space
FEATURE_DIM = 128


class ShapesProbe(nn.Module):
    """Three conv stages (32 -> 16 -> 8 px), 2x2 pooling that keeps coarse layout, then a 128-d feature layer."""

    def __init__(self, n_outputs: int, width: int = 32) -> None:
        super().__init__()
        w = width
        self.convs = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.feature = nn.Linear(4 * w * 4, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, n_outputs)
        # Per-dimension statistics of ground-truth features, set after training: embed() standardises with them,
        # so FD is in units of the ground truth's own spread and KID's cubic kernel sees O(1) inputs.
        self.register_buffer("feature_mean", torch.zeros(FEATURE_DIM))
        self.register_buffer("feature_std", torch.ones(FEATURE_DIM))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 32, 32) in [-1, 1] -> (B, 128)."""
        h = self.pool(self.convs(x)).flatten(1)  # (B, 4w * 4)
        return F.relu(self.feature(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised features (B, 128), the space FD-probe and KID are measured in."""
        return (self.features(x) - self.feature_mean) / self.feature_std


def to_probe_input(images: Sequence | np.ndarray | torch.Tensor) -> torch.Tensor:
    """Images (anything ``t2i.eval.shapes.as_uint8`` takes) -> (B, 3, 32, 32) float in [-1, 1]."""
    from t2i.eval.shapes import as_uint8_batch

    arr = np.stack(as_uint8_batch(images))  # (B, H, W, 3)
    x = torch.from_numpy(arr).float().div_(127.5).sub_(1.0).permute(0, 3, 1, 2)
    if x.shape[-1] != INPUT_SIZE:
        if x.shape[-1] % INPUT_SIZE:
            raise ValueError(f"image size must be a multiple of {INPUT_SIZE} px for the probe, got {x.shape[-1]}")
        x = F.avg_pool2d(x, x.shape[-1] // INPUT_SIZE)  # box-downsample, as the renderer anti-aliases
    return x


@lru_cache(maxsize=1)
def load_probe(path: str | None = None) -> ShapesProbe:
    """The shipped probe, from safetensors only (no pickle), in fp32 eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = str(path or WEIGHTS)
    if not Path(path).is_file():
        raise FileNotFoundError(f"probe weights {path} are missing; train them with python -m t2i.eval.train_features")
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["config"])
    state = {k: v.float() for k, v in load_file(path).items()}
    net = ShapesProbe(meta["n_outputs"], meta["width"])
    net.load_state_dict(state, strict=True)
    return net.eval()


@torch.no_grad()
def probe_features(images, *, batch_size: int = 256, net: ShapesProbe | None = None) -> np.ndarray:
    """(N, 128) float64 probe features of ``images``."""
    net = net or load_probe()
    x = to_probe_input(images)
    feats = [net.embed(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return torch.cat(feats).double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (N, D) and b (M, D), as in FID.

    tr(sqrt(S_a S_b)) is taken from the eigenvalues of sqrt(S_a) S_b sqrt(S_a), which is symmetric PSD, so no
    scipy sqrtm (and none of its complex round-off) is needed.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two (N, D) feature arrays of one width, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("need at least 2 samples per set to estimate a covariance")
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root_a @ sb @ root_a
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * tr_sqrt)


def kid(a: np.ndarray, b: np.ndarray) -> float:
    """Kernel inception distance: unbiased MMD^2 with the kernel (x.y / D + 1)^3 (Bińkowski et al. 2018)."""
    d = a.shape[1]
    kxx, kyy, kxy = (a @ a.T / d + 1) ** 3, (b @ b.T / d + 1) ** 3, (a @ b.T / d + 1) ** 3
    n, m = len(a), len(b)
    sxx = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(sxx + syy - 2 * kxy.mean())
