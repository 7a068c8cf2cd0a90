"""The shapes data set for training and evaluation: an on-the-fly torch Dataset and folder / tar-shard writers.

Folder format (read by ``t2i eval shapes --images DIR``; ``write_folder`` writes it, and ``write_prompts`` writes
the same file without images for a sampler to fill in):

    DIR/metadata.jsonl     one JSON object per image: {"file": "000000.png", "caption": ..., "spec": {...},
                           "seed": ..., "split": ..., "index": ...} and, for ground truth, "scene": {...}
    DIR/000000.png         RGB image, any square size >= 32 px
    DIR/000000.txt         the caption (ground-truth folders only; handy for generic image-text loaders)
    DIR/000000.json        the metadata line of that image (ground-truth folders only)

Several lines may name the same prompt with different files (several samples per prompt). Tar shards hold the
same ``000000.png / .txt / .json`` triples, webdataset style, written with the standard library's tarfile.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from t2i.data.captions import ALL_CATEGORIES, SPLITS, Prompt, focus_prompt, scene_for, split_prompts, train_prompt
from t2i.data.shapes import Scene, check_size, render

METADATA = "metadata.jsonl"


@dataclass(frozen=True)
class Sample:
    """A prompt, its ground-truth scene and the rendered uint8 (H, W, 3) image."""

    prompt: Prompt
    scene: Scene
    image: np.ndarray

    def record(self, file: str | None = None) -> dict:
        """The metadata line of this sample (what ``metadata.jsonl`` and the shards' ``.json`` hold)."""
        d = self.prompt.to_dict()
        d["category"] = self.prompt.spec.category
        d["scene"] = self.scene.to_dict()
        if file is not None:
            d = {"file": file, **d}
        return d


def ground_truth(prompt: Prompt, size: int = 32) -> Sample:
    """Lay out and render the ground-truth image of ``prompt`` (deterministic in its seed)."""
    scene = scene_for(prompt.spec, np.random.default_rng(prompt.seed), size=size)
    return Sample(prompt, scene, render(scene, size))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float (..., 3, H, W) in [-1, 1], the usual diffusion convention."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(127.5).sub_(1.0)
    return x.movedim(-1, -3)


class ShapesDataset(torch.utils.data.Dataset):
    """Shapes images rendered on the fly.

    Args:
        split: ``"train"`` (a seeded stream, ``length`` items, default 2**30: effectively infinite), ``"eval"``
            or ``"heldout"`` (the fixed prompt lists).
        size: canvas side in px (>= 32).
        seed: base seed of the train stream; item i depends only on (seed, i), so workers need no coordination.
        length: number of items of the train stream.
        weights: category weights of the train stream, e.g. ``{"position": 2, "text": 0}``.
        focus: a (colour, shape) pair: the train stream then only holds prompts naming it (``focus_prompt``), the
            data of a fine-tune on one combination.

    Items are dicts: ``image`` (3, H, W) float in [-1, 1], ``caption``, ``category``, ``index`` and ``meta`` (the
    JSON metadata line: spec, scene, seed).
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 32,
        *,
        seed: int = 0,
        length: int | None = None,
        weights: dict[str, float] | None = None,
        focus: tuple[str, str] | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        self.split, self.size, self.seed, self.weights = split, check_size(size), int(seed), weights
        self.focus = tuple(focus) if focus is not None else None
        if self.focus is not None and (split != "train" or weights is not None):
            raise ValueError("focus=(colour, shape) selects train prompts naming that pair; it needs split='train' "
                             "and no category weights")  # fmt: skip
        if split == "train":
            self.prompts = None
            self.length = 2**30 if length is None else int(length)
        else:
            if weights is not None:
                raise ValueError("category weights only apply to the train stream; filter the fixed splits instead")
            self.prompts = split_prompts(split)
            self.length = len(self.prompts) if length is None else min(int(length), len(self.prompts))

    def __len__(self) -> int:
        return self.length

    def prompt(self, index: int) -> Prompt:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.split} split of length {self.length}")
        if self.prompts is not None:
            return self.prompts[index]
        if self.focus is not None:
            return focus_prompt(self.seed, index, self.focus)
        return train_prompt(self.seed, index, weights=self.weights)

    def sample(self, index: int) -> Sample:
        return ground_truth(self.prompt(index), self.size)

    def __getitem__(self, index: int) -> dict:
        s = self.sample(index)
        return {
            "image": to_tensor(s.image),
            "caption": s.prompt.caption,
            "category": s.prompt.spec.category,
            "index": index,
            "meta": json.dumps(s.record(), sort_keys=True),
        }

    def __iter__(self) -> Iterator[dict]:
        for i in range(self.length):
            yield self[i]


def _samples(split: str, size: int, n: int | None, seed: int, start: int = 0) -> Iterator[tuple[int, Sample]]:
    ds = ShapesDataset(split, size, seed=seed)
    if split == "train" and n is None:
        raise ValueError("the train split is infinite; pass n (the number of samples to write)")
    stop = len(ds) if n is None else min(start + int(n), len(ds))
    for i in range(start, stop):
        yield i, ds.sample(i)


def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_folder(
    out_dir: str | Path, split: str = "eval", size: int = 32, *, n: int | None = None, seed: int = 0
) -> Path:
    """Write ground-truth samples as ``000000.png/.txt/.json`` plus ``metadata.jsonl`` (the folder format above).

    ``n`` defaults to the whole fixed split; it is required for ``train``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / METADATA, "w") as meta:
        for k, (_, s) in enumerate(_samples(split, size, n, seed)):
            key = f"{k:06d}"
            rec = s.record(f"{key}.png")
            (out / f"{key}.png").write_bytes(_png_bytes(s.image))
            (out / f"{key}.txt").write_text(s.prompt.caption + "\n")
            (out / f"{key}.json").write_text(json.dumps(rec, sort_keys=True) + "\n")
            meta.write(json.dumps(rec, sort_keys=True) + "\n")
    return out


def write_shards(
    out_dir: str | Path,
    split: str = "train",
    size: int = 32,
    *,
    n: int | None = None,
    seed: int = 0,
    shard_size: int = 1000,
) -> list[Path]:
    """Write ground-truth samples to webdataset-style tar shards ``shapes-{split}-000000.tar`` and return them."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[Path] = []
    tar = None
    try:
        for k, (_, s) in enumerate(_samples(split, size, n, seed)):
            if k % shard_size == 0:
                if tar is not None:
                    tar.close()
                shards.append(out / f"shapes-{split}-{len(shards):06d}.tar")
                tar = tarfile.open(shards[-1], "w")  # noqa: SIM115 (closed on rollover and in finally)
            key = f"{k:06d}"
            rec = json.dumps(s.record(f"{key}.png"), sort_keys=True).encode()
            for name, data in ((f"{key}.png", _png_bytes(s.image)), (f"{key}.txt", s.prompt.caption.encode())):
                _add(tar, name, data)
            _add(tar, f"{key}.json", rec)
    finally:
        if tar is not None:
            tar.close()
    return shards


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible shards: same samples, same bytes
    tar.addfile(info, io.BytesIO(data))


def write_prompts(out_dir: str | Path, split: str = "eval", *, per_prompt: int = 1) -> Path:
    """Write ``metadata.jsonl`` only: the files a sampler must create (``000000.png``, ...) for a split's prompts.

    With ``per_prompt`` > 1, prompt i gets files ``{i * per_prompt + k:06d}.png`` for k < per_prompt.
    """
    if per_prompt < 1:
        raise ValueError(f"per_prompt must be >= 1, got {per_prompt}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / METADATA, "w") as meta:
        for i, p in enumerate(split_prompts(split)):
            for k in range(per_prompt):
                rec = {"file": f"{i * per_prompt + k:06d}.png", "category": p.spec.category, **p.to_dict()}
                meta.write(json.dumps(rec, sort_keys=True) + "\n")
    return out / METADATA


def read_metadata(folder: str | Path) -> list[dict]:
    """The lines of ``folder/metadata.jsonl``, each checked to name an existing image and carry a spec."""
    folder = Path(folder)
    path = folder / METADATA
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: an images folder needs a {METADATA} (see t2i.data.dataset; "
            "write one with t2i.data.dataset.write_prompts or `t2i eval shapes --write-prompts DIR`)"
        )
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        if "file" not in rec or "spec" not in rec:
            raise ValueError(f"{path}:{n}: each line needs 'file' and 'spec' keys, got {sorted(rec)}")
        if rec["spec"].get("category") not in ALL_CATEGORIES:
            raise ValueError(f"{path}:{n}: unknown category {rec['spec'].get('category')!r}")
        if not (folder / rec["file"]).is_file():
            raise FileNotFoundError(f"{path}:{n}: image {rec['file']} is missing from {folder}")
        records.append(rec)
    if not records:
        raise ValueError(f"{path} lists no images")
    return records
