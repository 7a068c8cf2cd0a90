"""Webdataset-style tar shards, streamed with the standard library's ``tarfile`` (no webdataset dependency).

A shard is a tar whose members are grouped into samples by key: ``000123.png``, ``000123.txt``, ``000123.json``
and ``000123.cls`` form one sample (the key is the member path up to the first dot of its file name, as in
webdataset). Shards are read front to back in streaming mode (``r|*``), so they can live behind any URL:
local paths always, and ``s3://``, ``gs://``, ``https://`` and friends through fsspec when it is installed.

``data.path`` names the shards as a directory (all ``*.tar`` in it), a glob (``shards/*.tar``), a brace range
(``shards/train-{000000..000099}.tar``), or several of these separated by commas.

Streaming cannot be permuted globally, so each epoch shuffles the *shard order* (seeded by seed and epoch) and rank
r of W reads shards r, r+W, ...; resuming skips the samples this rank already consumed.
"""

from __future__ import annotations

import glob
import io
import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch.utils.data import IterableDataset

from t2i.data.transforms import ImageTransform, decode_image, sample_generator

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp")
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_shards(spec: str | list[str]) -> list[str]:
    """Shard paths or URLs from a directory, glob, brace range or comma-separated list of those."""
    parts = spec if isinstance(spec, list) else [s.strip() for s in str(spec).split(",") if s.strip()]
    out: list[str] = []
    for part in parts:
        m = _BRACE.search(part)
        if m:
            lo, hi = m.group(1), m.group(2)
            width = len(lo)
            for i in range(int(lo), int(hi) + 1):
                out.extend(expand_shards(part[: m.start()] + str(i).zfill(width) + part[m.end() :]))
        elif "://" in part:
            out.append(part)
        elif Path(part).is_dir():
            out.extend(sorted(str(p) for p in Path(part).glob("*.tar")))
        elif any(c in part for c in "*?["):
            out.extend(sorted(glob.glob(part)))
        else:
            out.append(part)
    if not out:
        raise ValueError(f"no tar shards match {spec!r}; give a folder of .tar files, a glob or a brace range")
    return out


def open_shard(url: str) -> BinaryIO:
    """A binary stream of a shard: a local file, or any fsspec URL when fsspec is installed."""
    if "://" in url and not url.startswith("file://"):
        try:
            import fsspec
        except ImportError:
            raise ValueError(f"reading {url} needs fsspec (pip install fsspec); local paths work without it") from None
        return fsspec.open(url, "rb").open()
    path = url[len("file://") :] if url.startswith("file://") else url
    if not Path(path).exists():
        raise FileNotFoundError(f"no tar shard at {path}")
    return open(path, "rb")


def _split_key(name: str) -> tuple[str, str]:
    """``dir/000123.seg.png`` -> (``dir/000123``, ``seg.png``)."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def iter_tar_samples(stream: BinaryIO) -> Iterator[dict[str, bytes]]:
    """Group a tar stream's members into ``{"__key__": key, ext: bytes, ...}`` samples, in file order."""
    current: dict[str, Any] | None = None
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = _split_key(member.name)
            if current is not None and key != current["__key__"]:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            f = tar.extractfile(member)
            current[ext] = f.read() if f is not None else b""
    if current is not None:
        yield current


def decode_sample(raw: dict[str, bytes], channels: int = 3) -> dict[str, Any]:
    """Raw members -> ``{"image", "caption", "label"?, "meta"?}``; a sample without an image is an error."""
    image_ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if image_ext is None:
        raise ValueError(f"tar sample {raw['__key__']!r} has no image member ({', '.join(IMAGE_EXTS)})")
    item: dict[str, Any] = {"image": decode_image(raw[image_ext], channels)}
    item["caption"] = raw["txt"].decode().strip() if "txt" in raw else ""
    if "cls" in raw:
        item["label"] = int(raw["cls"].decode().strip())
    if "json" in raw:
        item["meta"] = raw["json"].decode()
    return item


class TarShards(IterableDataset):
    """Endless stream of decoded, augmented samples from tar shards, shuffled by shard each epoch.

    Items: ``{"image": (C, size, size) in [-1, 1], "caption": str}`` plus ``label`` / ``meta`` when present.
    """

    def __init__(
        self,
        shards: str | list[str],
        *,
        size: int = 64,
        channels: int = 3,
        seed: int = 0,
        random_crop: bool = False,
        random_flip: bool = False,
        shuffle_shards: bool = True,
    ):
        self.shards = expand_shards(shards)
        self.channels, self.seed, self.shuffle_shards = channels, seed, shuffle_shards
        self.transform = ImageTransform(size, random_crop=random_crop, random_flip=random_flip)

    def shard_order(self, epoch: int) -> list[str]:
        if not self.shuffle_shards:
            return list(self.shards)
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        return [self.shards[i] for i in torch.randperm(len(self.shards), generator=g).tolist()]

    def iter_from(self, *, rank: int = 0, world: int = 1, skip: int = 0) -> Iterator[dict[str, Any]]:
        """This rank's endless sample stream, after skipping its first ``skip`` samples (resume)."""
        if len(self.shards) < world:
            raise ValueError(f"{len(self.shards)} shard(s) cannot be split over {world} processes; write more shards")
        position, epoch = 0, 0
        while True:
            produced = False
            for url in self.shard_order(epoch)[rank::world]:
                with open_shard(url) as stream:
                    for raw in iter_tar_samples(stream):
                        produced = True
                        if position >= skip:
                            item = decode_sample(raw, self.channels)
                            # augmentation seeded by this rank's stream position: replays exactly on resume
                            g = sample_generator(self.seed, position * world + rank)
                            item["image"] = self.transform(item["image"], g)
                            yield item
                        position += 1
            if not produced:
                raise ValueError(f"the tar shards {self.shards[:3]}... hold no samples")
            epoch += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.iter_from()


def write_shard(path: str | Path, samples: list[dict[str, bytes | str]]) -> Path:
    """Write ``[{"__key__": "000001", "png": bytes, "txt": "caption"}, ...]`` as one tar shard (tests, tools)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for ext, data in s.items():
                if ext == "__key__":
                    continue
                payload = (
                    data.encode()
                    if isinstance(data, str)
                    else (json.dumps(data).encode() if isinstance(data, dict) else data)
                )
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path
