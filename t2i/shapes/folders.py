"""The benchmark's folder format, and writers of ground truth as folders or tar shards.

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
from pathlib import Path

import numpy as np

from t2i.errors import check_choice
from t2i.shapes.captions import split_prompts, train_prompt
from t2i.shapes.scenes import Sample, ground_truth
from t2i.shapes.specs import ALL_CATEGORIES, SPLITS
from t2i.shapes.world import check_size

METADATA = "metadata.jsonl"


def _samples(split: str, size: int, n: int | None, seed: int) -> Iterator[Sample]:
    """Ground truth of the first ``n`` prompts of ``split`` (all of a fixed split when ``n`` is None)."""
    check_choice("split", split, SPLITS)
    size = check_size(size)
    if split == "train":
        if n is None:
            raise ValueError("the train split is infinite; pass n (the number of samples to write)")
        prompts = (train_prompt(seed, i) for i in range(int(n)))
    else:
        fixed = split_prompts(split)
        prompts = iter(fixed if n is None else fixed[: int(n)])
    for p in prompts:
        yield ground_truth(p, size)


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
        for k, s in enumerate(_samples(split, size, n, seed)):
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
        for k, s in enumerate(_samples(split, size, n, seed)):
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
            f"{path} not found: an images folder needs a {METADATA} (see t2i.shapes.folders; "
            "write one with t2i.shapes.folders.write_prompts or `t2i eval shapes --write-prompts DIR`)"
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
