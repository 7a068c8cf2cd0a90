"""Precomputed-embedding datasets: encode a dataset once, train on the vectors many times.

Training an unCLIP prior, or any model on frozen-encoder features (CLIP image/text embeddings, VAE latents),
spends most of its time in the frozen encoder unless the features are cached. ``cache_embeddings`` runs an encoder
over a dataset once and writes one safetensors file:

    embedding   float32 [N, ...]   the encoder output per sample
    label       int64   [N]        when the dataset has labels

with metadata ``encoder``, ``count`` and ``captions`` (a JSON list, so a text encoder can be run later).
``EmbeddingDataset`` reads it back as items ``{"embedding", "caption", "label"?}``.

Encoders are callables ``images (B, C, H, W) in [-1, 1] -> (B, ...)``, registered by name in ``ENCODERS``. The
only built-in one is ``pixels`` (4x4 average-pooled pixels, flattened): an honest, dependency-free stand-in until
the CLIP and VAE encoders of ``t2i.models`` exist; they will register here under their own names.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset

from t2i.errors import check_choice
from t2i.io import load_weights, read_metadata, save_weights


def pixel_encoder(images: Tensor, grid: int = 4) -> Tensor:
    """Average-pool to ``grid`` x ``grid`` and flatten: ``(B, C, H, W) -> (B, C * grid * grid)``."""
    return F.adaptive_avg_pool2d(images.float(), grid).flatten(1)


ENCODERS: dict[str, Callable[[Tensor], Tensor]] = {"pixels": pixel_encoder}


def _batches(dataset: Dataset | IterableDataset, batch_size: int, limit: int | None):
    items: list[dict[str, Any]] = []
    if isinstance(dataset, IterableDataset):
        source = iter(dataset)
        total = limit
        if total is None:
            raise ValueError("a streaming dataset (tar shards) is endless; pass limit (--limit N) to cache it")
    else:
        total = len(dataset) if limit is None else min(limit, len(dataset))
        source = (dataset[i] for i in range(total))
    for n, item in enumerate(source):
        if n >= total:
            break
        items.append(item)
        if len(items) == batch_size:
            yield items
            items = []
    if items:
        yield items


@torch.no_grad()
def cache_embeddings(
    dataset: Dataset | IterableDataset,
    output: str | Path,
    *,
    encoder: str | Callable[[Tensor], Tensor] = "pixels",
    batch_size: int = 64,
    limit: int | None = None,
    image_key: str = "image",
) -> int:
    """Encode every image of ``dataset`` (or the first ``limit``) and write the embedding file; returns the count."""
    if isinstance(encoder, str):
        check_choice("encoder", encoder, ENCODERS)
        name, fn = encoder, ENCODERS[encoder]
    else:
        name, fn = getattr(encoder, "__name__", type(encoder).__name__), encoder
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    embeddings, labels, captions = [], [], []
    for items in _batches(dataset, batch_size, limit):
        images = torch.stack([it[image_key] for it in items])
        embeddings.append(fn(images).float().cpu())
        captions.extend(str(it.get("caption", "")) for it in items)
        if all("label" in it for it in items):
            labels.extend(int(it["label"]) for it in items)
    if not embeddings:
        raise ValueError("the dataset is empty: nothing to encode")
    tensors = {"embedding": torch.cat(embeddings)}
    if len(labels) == len(captions):
        tensors["label"] = torch.tensor(labels, dtype=torch.long)
    meta = {"encoder": name, "count": str(len(captions)), "captions": json.dumps(captions)}
    save_weights(output, tensors, metadata=meta)
    return len(captions)


class EmbeddingDataset(Dataset):
    """Items ``{"embedding": Tensor, "caption": str}`` (plus ``label``) from a ``cache_embeddings`` file."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no embedding file at {path}; write one with `t2i cache-embeddings`")
        tensors = load_weights(path)
        if "embedding" not in tensors:
            raise ValueError(f"{path} has no 'embedding' tensor; it was not written by cache_embeddings")
        self.embeddings = tensors["embedding"]
        self.labels = tensors.get("label")
        meta = read_metadata(path)
        self.encoder = meta.get("encoder", "unknown")
        self.captions = json.loads(meta["captions"]) if "captions" in meta else [""] * len(self.embeddings)

    def __len__(self) -> int:
        return len(self.embeddings)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {"embedding": self.embeddings[index], "caption": self.captions[index]}
        if self.labels is not None:
            item["label"] = int(self.labels[index])
        return item
