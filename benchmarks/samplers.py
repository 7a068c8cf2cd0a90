"""Sampler quality against NFE with the exact denoiser, on Gaussian-mixture targets.

With the closed-form denoiser E[x0 | x_t] the only error left is the sampler's own: discretisation (and, for
stochastic samplers, how fast the injected noise mixes). For each target, path, sampler and budget of network
evaluations (NFE) this prints the distance between 2000 samples and 2000 exact draws from the target:

- MMD^2 x 1000: the unbiased squared maximum mean discrepancy, Gaussian kernel with the median-distance
  bandwidth of the target (fixed once per target); unbiased, so the noise floor scatters around 0;
- W2 (2-D target only): the exact 2-Wasserstein distance between the two empirical sets (optimal assignment).

The "exact samples" row is the floor: two independent exact sample sets. Run: ``python benchmarks/samplers.py``
(about a minute on 2 cores); ``--quick`` for a smaller run.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from t2i.diffusion import SAMPLERS, RectifiedFlow, VPPath, sample
from t2i.diffusion.analytic import GaussianMixture

NFES = (1, 2, 4, 8, 16, 32, 64, 100)


def eight_gaussians() -> GaussianMixture:
    angles = torch.arange(8) * (2 * math.pi / 8)
    means = 2.0 * torch.stack([angles.cos(), angles.sin()], 1)
    return GaussianMixture(means, torch.full((8,), 0.15))


def random_mixture(dim: int = 64, k: int = 16, seed: int = 0) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, dim, generator=g) * (2.0 / math.sqrt(dim))  # |mean| about 2, like the 2-D target
    stds = 0.1 + 0.3 * torch.rand(k, dim, generator=g)
    weights = 0.5 + torch.rand(k, generator=g)
    return GaussianMixture(means, stds, weights)


class MMD:
    """Unbiased MMD with a Gaussian kernel whose bandwidth is fixed from the target's median pair distance."""

    def __init__(self, reference: torch.Tensor):
        self.ref = reference.double()
        d = torch.cdist(self.ref[:1000], self.ref[:1000])
        self.gamma = 1.0 / (2 * d[d > 0].median() ** 2)
        self.k_rr = self._mean_offdiag(self.ref, self.ref)

    def _mean_offdiag(self, a, b):
        k = torch.exp(-self.gamma * torch.cdist(a, b) ** 2)
        n = k.shape[0]
        return (k.sum() - k.diagonal().sum()) / (n * (n - 1))

    def __call__(self, x: torch.Tensor) -> float:
        x = x.double()
        k_xy = torch.exp(-self.gamma * torch.cdist(x, self.ref) ** 2).mean()
        return 1000 * float(self._mean_offdiag(x, x) + self.k_rr - 2 * k_xy)


def w2_exact(x: torch.Tensor, y: torch.Tensor) -> float:
    from scipy.optimize import linear_sum_assignment

    cost = (torch.cdist(x.double(), y.double()) ** 2).numpy()
    rows, cols = linear_sum_assignment(cost)
    return math.sqrt(cost[rows, cols].mean())


def steps_for(name: str, nfe: int) -> int:
    return max(1, (nfe + 1) // 2) if name == "heun" else nfe


def draw(target: GaussianMixture, path, name: str, nfe: int, n: int) -> tuple[torch.Tensor, int]:
    """``n`` samples from ``name`` at budget ``nfe``, and the number of denoiser calls it really made."""
    den, calls = target.denoiser(path), [0]

    def counted(x, t):
        calls[0] += 1
        return den(x, t)

    x = torch.randn(n, target.dim, generator=torch.Generator().manual_seed(3))
    out = sample(name, counted, x, path.timesteps(steps_for(name, nfe)), path, noise=torch.Generator().manual_seed(4))
    return out, calls[0]


def run(target: GaussianMixture, label: str, n: int, nfes, with_w2: bool) -> list[str]:
    ref = target.sample(n, torch.Generator().manual_seed(1)).float()
    floor = target.sample(n, torch.Generator().manual_seed(2)).float()
    mmd = MMD(ref)
    metrics = {"MMD^2 x 1000": mmd, **({"W2": lambda x: w2_exact(x, ref)} if with_w2 else {})}
    paths = {"VP linear (T=1000, trailing)": VPPath("linear", 1000), "rectified flow (shift 3)": RectifiedFlow(3.0)}
    lines = []
    for path_name, path in paths.items():
        table = {m: {} for m in metrics}
        for name in SAMPLERS:
            for nfe in nfes:
                out, used = draw(target, path, name, nfe, n)
                mark = "" if used == nfe else f" ({used})"
                for m, fn in metrics.items():
                    table[m][name, nfe] = f"{fn(out):.4f}{mark}"
        for m, fn in metrics.items():
            lines.append(f"\n### {label}, {path_name}, {m} (lower is better)\n")
            lines.append("| sampler | " + " | ".join(f"NFE {k}" for k in nfes) + " |")
            lines.append("|---|" + "---:|" * len(nfes))
            lines.append("| exact samples | " + " | ".join(f"{fn(floor):.4f}" for _ in nfes) + " |")
            for name in SAMPLERS:
                lines.append(f"| {name} | " + " | ".join(table[m][name, k] for k in nfes) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples and NFE budgets")
    args = parser.parse_args()
    n = 500 if args.quick else 2000
    nfes = (1, 4, 16, 64) if args.quick else NFES
    torch.set_num_threads(2)
    start = time.perf_counter()
    lines = ["## Sampler quality vs NFE, exact denoiser", ""]
    lines.append(f"{n} samples per cell; a number in parentheses is the NFE actually used when it differs.")
    lines += run(eight_gaussians(), "2-D, 8 Gaussians (std 0.15) on a circle", n, nfes, with_w2=True)
    lines += run(random_mixture(), "64-D, 16-component diagonal mixture", n, nfes, with_w2=False)
    lines.append(f"\n(measured in {time.perf_counter() - start:.0f} s, torch {torch.__version__})")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
