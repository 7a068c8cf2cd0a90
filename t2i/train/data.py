"""Data sources by name, and the resumable, rank-sharded stream of micro-batches the training loop consumes.

The stream is a pure function of (seed, step): the ``j``-th sample of the global batch of optimiser step ``s`` is
draw ``d = s * B + j`` of an endless sequence of epochs, each a seeded permutation of the dataset. So

- resuming at step ``s`` needs no iterator state, only ``s`` (exact resume, whatever the number of workers);
- micro-batch ``m`` of rank ``r`` takes draws ``j`` in ``[m*B/k + r*B/(kW), ...)`` for k accumulation steps and
  W ranks, so 1 process x k micro-batches and W processes see the same global batch;
- every sample carries its draw index ``id``, from which tasks seed its noise and transforms seed their
  augmentation: the same sample gets the same noise on any rank count or batch split.

Streaming sources (tar shards) cannot be permuted globally; they are split by shard across ranks and resumed by
skipping the samples already consumed (see ``t2i.data.tars``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from t2i.data.transforms import sample_generator
from t2i.errors import unknown_choice

from .config import DataConfig

SOURCES = ("toy", "shapes", "folder", "tar", "embeddings")


def build_dataset(cfg: DataConfig, seed: int = 0) -> Dataset | IterableDataset:
    """The dataset named by ``cfg.source``."""
    if cfg.source == "toy":
        from t2i.data.toy import ToyBlobs

        if cfg.random_crop:
            raise ValueError(
                "toy images are rendered at data.image_size, there is nothing to crop; set random_crop=false"
            )
        return ToyBlobs(
            cfg.num_samples, cfg.image_size, cfg.channels, cfg.num_classes, seed=seed, random_flip=cfg.random_flip
        )
    if cfg.source == "shapes":
        from t2i.data.dataset import ShapesDataset
        from t2i.shapes.text import TEXT_LAYOUTS

        if cfg.random_flip or cfg.random_crop:
            # a flip turns "a circle left of a square" into a wrong caption; the renderer has no crop margin
            raise ValueError("data.source=shapes renders exact captioned scenes; set random_flip/random_crop=false")
        if cfg.channels != 3:
            raise ValueError(f"shapes images are RGB; set data.channels=3 (got {cfg.channels})")
        # the train split is an endless seeded stream; num_samples bounds the epoch so data order is a permutation
        focus = None
        if cfg.shapes_focus:
            focus = tuple(cfg.shapes_focus.split())
            if len(focus) != 2:
                raise ValueError(
                    f'data.shapes_focus must be "colour shape", e.g. "purple circle"; got {cfg.shapes_focus!r}'
                )
        weights = _shapes_weights(cfg.shapes_weights, focus)
        relations = None if cfg.shapes_relations is None else tuple(cfg.shapes_relations)
        if cfg.shapes_text_layout not in TEXT_LAYOUTS:
            raise unknown_choice("data.shapes_text_layout", cfg.shapes_text_layout, TEXT_LAYOUTS)
        return ShapesDataset("train", cfg.image_size, seed=seed, length=cfg.num_samples, weights=weights, focus=focus,
                             relations=relations, text_layout=cfg.shapes_text_layout)  # fmt: skip
    if cfg.source in ("folder", "tar", "embeddings") and not cfg.path:
        raise ValueError(f"data.source={cfg.source} needs data.path (a folder, shard list or embeddings file)")
    if cfg.source == "folder":
        from t2i.data.folders import ImageCaptionFolder

        return ImageCaptionFolder(cfg.path, size=cfg.image_size, channels=cfg.channels, **_aug(cfg))
    if cfg.source == "tar":
        from t2i.data.tars import TarShards

        return TarShards(cfg.path, size=cfg.image_size, channels=cfg.channels, seed=seed, **_aug(cfg))
    if cfg.source == "embeddings":
        from t2i.data.embeddings import EmbeddingDataset

        if cfg.random_flip or cfg.random_crop:
            raise ValueError("embedding datasets hold vectors; set data.random_flip and data.random_crop to false")
        return EmbeddingDataset(cfg.path)
    raise unknown_choice("data.source", cfg.source, SOURCES)


def _shapes_weights(weights: dict[str, float] | None, focus) -> dict[str, float] | None:
    """``data.shapes_weights`` completed to all seven categories (unnamed ones weigh 1), checked up front."""
    if not weights:
        return None
    from t2i.shapes.specs import ALL_CATEGORIES

    if focus is not None:
        raise ValueError("data.shapes_focus and data.shapes_weights exclude each other: a focus set has one pair")
    unknown = sorted(set(weights) - set(ALL_CATEGORIES))
    if unknown:
        raise ValueError(f"data.shapes_weights names unknown categories {unknown}; use {', '.join(ALL_CATEGORIES)}")
    full = {c: 1.0 for c in ALL_CATEGORIES}
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
            raise ValueError(f"data.shapes_weights.{name} must be a number >= 0, got {w!r}")
        full[name] = float(w)
    if sum(full.values()) <= 0:
        raise ValueError("data.shapes_weights gives every category weight 0; keep at least one positive")
    return full


def _aug(cfg: DataConfig) -> dict[str, bool]:
    return {"random_crop": cfg.random_crop, "random_flip": cfg.random_flip}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, turn ints into a LongTensor, keep strings as lists."""
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if isinstance(values[0], Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], (bool, int)):
            out[key] = torch.tensor(values, dtype=torch.long)
        elif isinstance(values[0], float):
            out[key] = torch.tensor(values, dtype=torch.float32)
        else:
            out[key] = values
    return out


class _Draws(Dataset):
    """Maps ``(index, draw)`` to the dataset item plus its ``id``; seeds per-sample augmentation from the draw."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, draw = key
        if hasattr(self.dataset, "get"):
            item = self.dataset.get(index, sample_generator(self.seed, draw))
        else:
            item = self.dataset[index]
        return {**item, "id": draw}


class StepSampler(Sampler):
    """Yields, for each optimiser step from ``start_step`` on, this rank's k micro-batches of ``(index, draw)``."""

    def __init__(
        self, n: int, *, global_batch: int, grad_accum: int, rank: int, world: int, seed: int, start_step: int = 0
    ):
        if global_batch % (grad_accum * world):
            raise ValueError(
                f"data.batch_size ({global_batch}) must be divisible by optim.grad_accum x world size "
                f"({grad_accum} x {world}) so every process gets equal micro-batches"
            )
        self.n, self.B, self.k, self.rank, self.world = n, global_batch, grad_accum, rank, world
        self.seed, self.start_step = seed, start_step
        self._perm_epoch, self._perm = -1, None

    def index_of(self, draw: int) -> int:
        epoch, pos = divmod(draw, self.n)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return int(self._perm[pos])

    def micro_draws(self, step: int, micro: int) -> range:
        bm = self.B // self.k
        br = bm // self.world
        start = step * self.B + micro * bm + self.rank * br
        return range(start, start + br)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            for m in range(self.k):
                yield [(self.index_of(d), d) for d in self.micro_draws(step, m)]
            step += 1

    def __len__(self) -> int:  # endless; DataLoader only needs this for its progress heuristics
        return 2**62


class MicroBatches:
    """Iterator over this rank's micro-batches, starting at optimiser step ``start_step``."""

    def __init__(
        self,
        dataset: Dataset | IterableDataset,
        *,
        global_batch: int,
        grad_accum: int,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        start_step: int = 0,
        num_workers: int = 0,
    ):
        self.dataset = dataset
        self.per_rank = global_batch // grad_accum // world
        if isinstance(dataset, IterableDataset):
            if num_workers:
                raise ValueError(
                    "streaming (tar) sources are read in the training process so resume stays exact; "
                    "set data.num_workers=0"
                )
            if global_batch % (grad_accum * world):
                raise ValueError(
                    f"data.batch_size ({global_batch}) must be divisible by optim.grad_accum x world size "
                    f"({grad_accum} x {world})"
                )
            self._iter = self._stream(dataset, global_batch, grad_accum, rank, world, start_step)
            return
        sampler = StepSampler(
            len(dataset),
            global_batch=global_batch,
            grad_accum=grad_accum,
            rank=rank,
            world=world,
            seed=seed,
            start_step=start_step,
        )
        loader = DataLoader(
            _Draws(dataset, seed),
            batch_sampler=sampler,
            num_workers=num_workers,
            collate_fn=collate,
            persistent_workers=num_workers > 0,
            # its own generator: the loader draws a base seed per epoch, which must not consume the global stream
            # that dropout draws from (a resumed run would otherwise be one draw out of step)
            generator=torch.Generator().manual_seed(seed),
        )
        self._iter = iter(loader)

    def _stream(self, dataset, global_batch: int, k: int, rank: int, world: int, start_step: int):
        bm, br = global_batch // k, global_batch // k // world
        samples = dataset.iter_from(rank=rank, world=world, skip=start_step * k * br)
        step = start_step
        while True:
            for m in range(k):
                first = step * global_batch + m * bm + rank * br
                items = [{**next(samples), "id": first + i} for i in range(br)]
                yield collate(items)
            step += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self._iter)
