"""Image + caption folders: the simplest training data layout.

    DIR/any/sub/dirs/0001.png      an image (png, jpg, jpeg, webp, bmp)
    DIR/any/sub/dirs/0001.txt      its caption (optional)
    DIR/metadata.jsonl             optional: {"file": "any/sub/dirs/0001.png", "caption": "...", "label": 3} lines

Captions come from ``metadata.jsonl`` when it names the file, else from the ``.txt`` beside the image, else are
empty; an integer ``label`` in the metadata is passed through. The shapes writer (``t2i.data.dataset``) writes
exactly this layout. Images are decoded with Pillow and go through ``ImageTransform`` (resize, crop, flip).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from t2i.data.transforms import ImageTransform, pil_to_tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA = "metadata.jsonl"


def _read_metadata(root: Path) -> dict[str, dict[str, Any]]:
    path = root / METADATA
    if not path.exists():
        return {}
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n} is not valid JSON ({err.msg}); fix or remove that line") from None
        if "file" not in rec:
            raise ValueError(f"{path}:{n} has no 'file' field; every line must name its image file")
        out[str(rec["file"])] = rec
    return out


class ImageCaptionFolder(Dataset):
    """Every image under ``root`` (recursively, sorted by path) with its caption.

    Args:
        root: the folder.
        size: square output size after resize and crop.
        channels: 3 (RGB) or 1 (grey).
        random_crop, random_flip: augmentation, drawn from the generator ``get`` receives.

    Items: ``{"image": (C, size, size) in [-1, 1], "caption": str}`` plus ``"label"`` when the metadata has one.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        size: int = 64,
        channels: int = 3,
        random_crop: bool = False,
        random_flip: bool = False,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"no image folder at {self.root}")
        self.files = sorted(
            p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        if not self.files:
            raise ValueError(f"{self.root} holds no images ({', '.join(IMAGE_SUFFIXES)}); check data.path")
        self.meta = _read_metadata(self.root)
        self.channels = channels
        self.transform = ImageTransform(size, random_crop=random_crop, random_flip=random_flip)

    def __len__(self) -> int:
        return len(self.files)

    def caption(self, index: int) -> str:
        path = self.files[index]
        rec = self.meta.get(path.relative_to(self.root).as_posix())
        if rec is not None and "caption" in rec:
            return str(rec["caption"])
        txt = path.with_suffix(".txt")
        return txt.read_text().strip() if txt.exists() else ""

    def get(self, index: int, generator: torch.Generator | None = None) -> dict[str, Any]:
        """Item ``index`` with augmentation drawn from ``generator``."""
        path = self.files[index]
        with Image.open(path) as img:
            x = pil_to_tensor(img, self.channels)
        item: dict[str, Any] = {"image": self.transform(x, generator), "caption": self.caption(index)}
        rec = self.meta.get(path.relative_to(self.root).as_posix())
        if rec is not None and isinstance(rec.get("label"), int):
            item["label"] = rec["label"]
        return item

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.get(index)
