"""Train the shapes probe whose features the FD-probe / KID metric uses, and save it as fp16 safetensors.

    python -m t2i.eval.train_features            # writes t2i/eval/shapes_features.safetensors

Seeded and CPU-only: ground-truth train-stream scenes at 32 and 64 px (64 box-downsampled to 32), multi-label
targets (which colour x shape pairs and which letters appear) plus object counts per shape, per colour and in
all. Deterministic for a given
seed and thread count.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from t2i.data.captions import train_prompt
from t2i.data.dataset import ground_truth
from t2i.data.shapes import COLORS, SHAPES
from t2i.eval.features import WEIGHTS, ShapesProbe, to_probe_input

PAIRS = [(c, s) for c in COLORS for s in SHAPES]
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
