"""What a run leaves behind besides checkpoints: a JSON-lines metric log (and TensorBoard events when the
``tensorboard`` package is installed), PNG sample grids, a PNG loss curve and, when the run is scored while it
trains, a PNG learning curve (benchmark score per category against training CPU-minutes), drawn with Pillow.

Only rank 0 creates these; every function here is plain file output with no torch.distributed calls.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from torch import Tensor

from t2i.io.png import contact_sheet, to_pil


class MetricsLog:
    """Appends one JSON object per logged step to ``metrics.jsonl``; mirrors scalars to TensorBoard if available."""

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional; the JSON-lines log is always written
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """One record per step of a ``metrics.jsonl``: the records of a step merged (the loss line and the scores
    line), key by key; a resumed run appends, so a step can appear twice (the later value wins)."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step.setdefault(rec["step"], {}).update(rec)
    return [by_step[k] for k in sorted(by_step)]


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    """Write a PNG grid of ``(N, C, H, W)`` images in [-1, 1], ``nrow`` per row, 2 px apart; ``scale`` enlarges
    tiny images with nearest-neighbour."""
    pils = [to_pil(im, value_range=(-1.0, 1.0)) for im in images]
    img = contact_sheet(pils, cell=images.shape[-1], columns=nrow, pad=2)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _ema_smooth(values: list[float]) -> list[float]:
    beta = min(0.9, max(0.0, 1 - 8 / len(values)))  # light smoothing for short curves, so it does not lag
    out, m = [], None
    for v in values:
        m = v if m is None else beta * m + (1 - beta) * v
        out.append(m)
    return out


def plot_loss_curve(records: list[dict[str, Any]], path: str | Path, key: str = "loss") -> Path | None:
    """Draw ``key`` against step (raw and smoothed, log-scaled y when positive) as a PNG; None without data."""
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    if len(pts) < 2:
        return None
    W, H, L, R, T, B = 640, 400, 70, 20, 30, 50
    steps = [p[0] for p in pts]
    log_y = all(v > 0 for _, v in pts)
    ys = [math.log10(v) if log_y else v for _, v in pts]
    x0, x1 = min(steps), max(steps)
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5
    x1 = x1 if x1 > x0 else x0 + 1

    def to_px(s: float, y: float) -> tuple[float, float]:
        return L + (s - x0) / (x1 - x0) * (W - L - R), H - B - (y - y0) / (y1 - y0) * (H - T - B)

    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([L, T, W - R, H - B], outline="black")
    for i in range(5):  # y ticks
        y = y0 + (y1 - y0) * i / 4
        _, py = to_px(x0, y)
        d.line([L - 4, py, L, py], fill="black")
        d.text((4, py - 6), f"{10**y:.3g}" if log_y else f"{y:.3g}", fill="black")
    for i in range(5):  # x ticks
        s = x0 + (x1 - x0) * i / 4
        px, _ = to_px(s, y0)
        d.line([px, H - B, px, H - B + 4], fill="black")
        d.text((px - 10, H - B + 8), f"{s:.0f}", fill="black")
    d.line([to_px(s, y) for s, y in zip(steps, ys, strict=True)], fill=(170, 170, 230), width=1)
    d.line([to_px(s, y) for s, y in zip(steps, _ema_smooth(ys), strict=True)], fill=(20, 40, 200), width=2)
    d.text((L, 8), f"{key} vs step" + (" (log scale)" if log_y else ""), fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


# One colour per series of the learning curve: the GenEval categories, then the text track; "overall" is black.
CURVE_COLORS = {
    "single_object": (31, 119, 180), "two_objects": (255, 127, 14), "counting": (44, 160, 44),
    "colors": (214, 39, 40), "position": (148, 103, 189), "color_attribution": (140, 86, 75),
    "text": (227, 119, 194), "text_letters": (188, 189, 34), "overall": (0, 0, 0),
}  # fmt: skip


def plot_eval_curves(records: list[dict[str, Any]], path: str | Path, *, title: str = "") -> Path | None:
    """Benchmark scores (``eval/<category>`` keys, in [0, 1]) against training CPU-minutes (``cpu_seconds``), one
    line per category and a thick black ``overall``, as a PNG; None with no scored record."""
    pts = [r for r in records if "cpu_seconds" in r and any(k.startswith("eval/") for k in r)]
    if not pts:
        return None
    names = [k for k in CURVE_COLORS if any(f"eval/{k}" in r for r in pts)]
    W, H, L, R, T, B = 760, 420, 50, 170, 30, 45
    xs = [r["cpu_seconds"] / 60 for r in pts]
    x0, x1 = 0.0, max(max(xs), 1e-6)

    def to_px(x: float, y: float) -> tuple[float, float]:
        return L + (x - x0) / (x1 - x0) * (W - L - R), H - B - y * (H - T - B)

    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([L, T, W - R, H - B], outline="black")
    for i in range(6):  # y ticks at 0, 0.2, ..., 1 with light grid lines
        _, py = to_px(x0, i / 5)
        d.line([L, py, W - R, py], fill=(225, 225, 225))
        d.text((8, py - 6), f"{i / 5:.1f}", fill="black")
    for i in range(5):
        x = x0 + (x1 - x0) * i / 4
        px, _ = to_px(x, 0)
        d.line([px, H - B, px, H - B + 4], fill="black")
        d.text((px - 10, H - B + 8), f"{x:.3g}", fill="black")
    d.text((L + (W - L - R) // 2 - 60, H - 18), "training CPU-minutes", fill="black")
    for j, name in enumerate(names):
        series = [(r["cpu_seconds"] / 60, r[f"eval/{name}"]) for r in pts if f"eval/{name}" in r]
        color, width = CURVE_COLORS[name], 3 if name == "overall" else 1
        line = [to_px(x, y) for x, y in series]
        if len(line) > 1:
            d.line(line, fill=color, width=width)
        for px, py in line:
            d.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
        ly = T + 6 + 16 * j
        d.line([W - R + 10, ly + 6, W - R + 30, ly + 6], fill=color, width=width)
        d.text((W - R + 36, ly), f"{name} {series[-1][1]:.2f}", fill="black")
    d.text((L, 8), f"{title + ': ' if title else ''}shapes benchmark score vs training CPU-minutes", fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
