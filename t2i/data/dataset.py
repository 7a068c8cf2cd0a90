"""The shapes world as a torch Dataset: prompts of a split rendered on the fly, as diffusion-ready tensors.

The world itself (scenes, captions, splits, the evaluator and the folder / tar-shard writers) is ``t2i.shapes``;
this module only turns it into training items.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from t2i.errors import unknown_choice
from t2i.shapes.captions import focus_prompt, split_prompts, train_prompt
from t2i.shapes.scenes import Sample, ground_truth
from t2i.shapes.specs import RELATIONS, SPLITS, Prompt
from t2i.shapes.text import TEXT_LAYOUTS
from t2i.shapes.world import check_size


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
        relations: the relations the train stream's position prompts may use, e.g. ``("left of", "above")`` for
            the first stage of a curriculum (default: all four).
        text_layout: where the train stream's words go: ``"random"`` (as in the fixed splits) or ``"centred"``
            (one layout per word, ``t2i.shapes.text.centred_text``).

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
        relations: Sequence[str] | None = None,
        text_layout: str = "random",
    ) -> None:
        if split not in SPLITS:
            raise unknown_choice("split", split, SPLITS)
        self.split, self.size, self.seed, self.weights = split, check_size(size), int(seed), weights
        self.focus = tuple(focus) if focus is not None else None
        if isinstance(relations, str):  # tuple("left of") would be its letters
            relations = [relations]
        self.relations = tuple(relations) if relations is not None else None
        if self.relations is not None:
            bad = sorted(set(self.relations) - set(RELATIONS))
            if bad or not self.relations:
                raise ValueError(
                    f"relations must be a non-empty list of {', '.join(RELATIONS)}; got {list(relations)}"
                )
            if split != "train" or focus is not None:
                raise ValueError("relations limit the train stream's position prompts; they need split='train' and "
                                 "no focus pair")  # fmt: skip
        if text_layout not in TEXT_LAYOUTS:
            raise unknown_choice("text_layout", text_layout, TEXT_LAYOUTS)
        if text_layout != "random" and split != "train":
            raise ValueError(f"text_layout={text_layout!r} changes the train stream's words; the {split} split's "
                             "ground truth stays as the benchmark draws it (text_layout='random')")  # fmt: skip
        self.text_layout = text_layout
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
        return train_prompt(self.seed, index, weights=self.weights, relations=self.relations)

    def sample(self, index: int) -> Sample:
        return ground_truth(self.prompt(index), self.size, text_layout=self.text_layout)

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
