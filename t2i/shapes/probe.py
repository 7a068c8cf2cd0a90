"""A distribution metric that needs no downloaded weights: Fréchet distance and KID in a shipped probe's features.

FID (Heusel et al. 2017) needs Inception weights that no package ships offline, and pixel-space statistics
barely see blur or a dropped mode. So t2i trains its own small CNN on ground-truth shapes scenes (which shapes
in which colours, how many objects, which letters) and ships its weights, fp16 safetensors, next to this file.
The Fréchet distance ("FD-probe") and the kernel inception distance (KID, Bińkowski et al. 2018, cubic polynomial
kernel, unbiased) are computed in its 128-d penultimate layer, standardised by the ground truth's per-dimension
mean and spread.

Training is seeded and CPU-only (``python -m t2i.shapes.probe`` rewrites the weights): ground-truth train-stream
scenes at 32 and 64 px (64 box-downsampled to 32), multi-label targets (which colour x shape pairs and which
letters appear) plus object counts per shape, per colour and in all. Deterministic for a given seed and thread
count.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from t2i.shapes.captions import train_prompt
from t2i.shapes.scenes import ground_truth
from t2i.shapes.text import LETTERS
from t2i.shapes.world import COLORS, SHAPES, as_uint8_batch

WEIGHTS = Path(__file__).with_name("probe.safetensors")
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
    """Images (anything ``t2i.shapes.world.as_uint8`` takes) -> (B, 3, 32, 32) float in [-1, 1]."""
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
        raise FileNotFoundError(f"probe weights {path} are missing; train them with python -m t2i.shapes.probe")
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


################################################################################################################
# Training
################################################################################################################

PAIRS = [(c, s) for c in COLORS for s in SHAPES]
N_MULTI = len(PAIRS) + len(LETTERS)  # multi-hot: which colour x shape pairs and which letters appear
# Counting heads, 5 classes each (0..4): objects of each shape, of each colour, and in all.
COUNT_HEADS = len(SHAPES) + len(COLORS) + 1
N_OUTPUTS = N_MULTI + 5 * COUNT_HEADS


def targets(scene) -> tuple[np.ndarray, np.ndarray]:
    """Multi-hot (pairs + letters) and the count targets (per shape, per colour, total) of a scene."""
    y = np.zeros(N_MULTI, np.float32)
    counts = np.zeros(COUNT_HEADS, np.int64)
    for o in scene.objects:
        y[PAIRS.index((o.color, o.shape))] = 1
        counts[SHAPES.index(o.shape)] += 1
        counts[len(SHAPES) + list(COLORS).index(o.color)] += 1
    counts[-1] = len(scene.objects)
    if scene.text is not None:
        for ch in scene.text.word:
            y[len(PAIRS) + LETTERS.index(ch)] = 1
    return y, counts


def loss_fn(out: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    # Positive labels are rare (about 2 of 71), so they are up-weighted; the counting heads carry most of the
    # signal about shapes and colours (cross-entropy over 0..4 for each head).
    multi = F.binary_cross_entropy_with_logits(out[:, :N_MULTI], y, pos_weight=torch.full((N_MULTI,), 10.0))
    counts = F.cross_entropy(out[:, N_MULTI:].reshape(-1, COUNT_HEADS, 5).transpose(1, 2), c)
    return multi + counts


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # x, multi-hot, counts
    """n ground-truth images (half at 32 px, half at 64 px) as probe inputs, multi-hot targets and counts."""
    xs, ys, cs = [], [], []
    for size in (32, 64):
        imgs = []
        for i in range(n // 2):
            s = ground_truth(train_prompt(seed + size, i), size)
            y, c = targets(s.scene)
            imgs.append(s.image)
            ys.append(y)
            cs.append(c)
        xs.append(to_probe_input(np.stack(imgs)))
    return torch.cat(xs), torch.from_numpy(np.stack(ys)), torch.from_numpy(np.stack(cs))


def train(steps: int = 2000, batch_size: int = 128, n_train: int = 20000, seed: int = 0, width: int = 16):
    torch.manual_seed(seed)
    t0 = time.time()
    x, y, c = make_data(n_train, seed)
    xv, yv, cv = make_data(2000, seed + 1000)
    print(f"rendered {len(x)} + {len(xv)} images in {time.time() - t0:.0f}s")
    net = ShapesProbe(N_OUTPUTS, width)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(x), (batch_size,), generator=g)
        out = net(x[idx])
        loss = loss_fn(out, y[idx], c[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:.0f}s")
    net.eval()
    with torch.no_grad():
        out = torch.cat([net(xv[i : i + 500]) for i in range(0, len(xv), 500)])
    exact = ((out[:, :N_MULTI] > 0) == (yv > 0.5)).all(1).float().mean().item()
    count_acc = (out[:, N_MULTI:].reshape(-1, COUNT_HEADS, 5).argmax(-1) == cv).all(1).float().mean().item()
    print(f"validation: exact multi-label match {exact:.3f}, all counts right {count_acc:.3f}")
    with torch.no_grad():
        f = torch.cat([net.features(xv[i : i + 500]) for i in range(0, len(xv), 500)])
    net.feature_mean.copy_(f.mean(0))
    # Dead ReLU units have zero spread; the floor keeps them at zero instead of dividing by zero.
    net.feature_std.copy_(f.std(0).clamp_min(1e-2 * f.std(0).mean()))
    meta = {
        "n_outputs": N_OUTPUTS,
        "width": width,
        "steps": steps,
        "batch_size": batch_size,
        "n_train": n_train,
        "seed": seed,
        "val_exact_multilabel": round(exact, 4),
        "val_count_accuracy": round(count_acc, 4),
    }
    return net, meta


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train the shapes probe of FD-probe and KID; save it as fp16 safetensors.")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(WEIGHTS))
    args = p.parse_args(argv)
    from safetensors.torch import save_file

    net, meta = train(steps=args.steps, n_train=args.n_train, seed=args.seed)
    state = {k: v.detach().half().contiguous() for k, v in net.state_dict().items()}
    save_file(state, args.out, metadata={"config": json.dumps(meta), "format": "pt"})
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
