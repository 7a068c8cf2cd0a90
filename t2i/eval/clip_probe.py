"""Does a CLIP read order and binding, or a bag of words? ``t2i eval clip``.

Text side: for each prompt of a shapes split that has counterfactual rewrites
(``t2i.shapes.captions.counterfactual_captions``: the relation reversed, the colours or shapes swapped, the count
changed), the probe renders the prompt's ground-truth scene and asks the CLIP which caption fits it. A bag-of-words
encoder scores about 1 / (1 + rewrites) (a coin flip for one rewrite); an encoder that reads which way a relation
points and which colour goes with which shape scores near 1. It also reports how far apart the text tower puts a
caption and its rewrites (mean cosine of the pooled text embeddings), which is what a text-conditioned denoiser has
to tell apart.

Image side: for each prompt whose scene has counterfactual scenes (``t2i.shapes.scenes.counterfactual_scenes``: the
scene mirrored across its relation's axis, the colours or shapes swapped, an object left out), it asks which image
fits the caption, and how close the image tower puts the true scene and the changed ones (mean cosine). unCLIP's
decoder draws from the image embedding alone, so a scene and its mirror image at cosine near 1 are one picture to it.

Both unCLIP (whose prior maps the text embedding to an image embedding) and the SD3-style models (which read the
CLIP's per-token states and pooled vector) inherit what this probe measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from t2i.data.dataset import to_tensor
from t2i.shapes.captions import counterfactual_captions, split_prompts
from t2i.shapes.scenes import counterfactual_scenes, ground_truth, render
from t2i.shapes.specs import Prompt


@dataclass
class ProbeRow:
    category: str
    prompts: int
    accuracy: float  # the true caption scores above every rewrite, given the ground-truth image (nan: no rewrites)
    chance: float  # what a CLIP blind to the rewrites gets: mean of 1 / (1 + rewrites)
    text_cosine: float  # mean cosine of the pooled text embeddings of a caption and its rewrites
    image_accuracy: float = float("nan")  # the true scene scores above every changed scene, given the caption
    image_chance: float = float("nan")  # mean of 1 / (1 + changed scenes)
    image_cosine: float = float("nan")  # mean cosine of the image embeddings of the true and the changed scenes


@torch.no_grad()
def counterfactual_probe(clip, split: str = "eval", per_category: int | None = None) -> list[ProbeRow]:
    """One ``ProbeRow`` per category of ``split`` whose prompts have caption rewrites or changed scenes, plus an
    ``all`` row; each side's columns average over the prompts that have that side's counterfactuals."""
    clip = clip.eval()
    size = max(int(clip.image_size), 32)
    by_cat: dict[str, list[tuple[Prompt, np.ndarray, list[str], list]]] = {}
    for p in split_prompts(split):
        kept = by_cat.get(p.spec.category, [])
        if per_category is not None and len(kept) >= per_category:
            continue
        gt = ground_truth(p, size)
        rewrites, scenes = counterfactual_captions(p.caption), counterfactual_scenes(p.spec, gt.scene)
        if rewrites or scenes:
            by_cat.setdefault(p.spec.category, []).append((p, gt.image, rewrites, scenes))
    if not by_cat:
        raise ValueError(f"no prompt of split {split!r} has a counterfactual caption or scene")
    rows, all_text, all_image, n = [], [], [], 0
    for category, items in by_cat.items():
        text_side, image_side = [], []  # (ranked first, chance, cosine) per prompt
        for i in range(0, len(items), 64):
            chunk = items[i : i + 64]
            images = clip.embed_image(to_tensor(np.stack([image for _, image, _, _ in chunk])))
            for img, (p, _, rewrites, scenes) in zip(images, chunk, strict=True):
                txt, _, _ = clip.embed_text([p.caption, *rewrites])
                if rewrites:
                    scores = img @ txt.t()
                    text_side.append(
                        (float(scores[0] > scores[1:].max()), 1 / len(txt), float((txt[0] @ txt[1:].t()).mean()))
                    )
                if scenes:
                    changed = clip.embed_image(to_tensor(np.stack([render(s, size) for s in scenes])))
                    scores = changed @ txt[0]
                    image_side.append(
                        (float(txt[0] @ img > scores.max()), 1 / (1 + len(scenes)), float((changed @ img).mean()))
                    )
        rows.append(_row(category, len(items), text_side, image_side))
        all_text += text_side
        all_image += image_side
        n += len(items)
    rows.append(_row("all", n, all_text, all_image))
    return rows


def _row(category: str, prompts: int, text_side: list, image_side: list) -> ProbeRow:
    t = np.mean(text_side, axis=0) if text_side else np.full(3, np.nan)
    m = np.mean(image_side, axis=0) if image_side else np.full(3, np.nan)
    return ProbeRow(category, prompts, *map(float, t), *map(float, m))


def probe_table(rows: list[ProbeRow]) -> str:
    def f(x: float) -> str:
        return "-" if np.isnan(x) else f"{x:.3f}"

    lines = ["| category | prompts | true caption ranked first | chance | text cosine to rewrites "
             "| true scene ranked first | chance | image cosine to changed scenes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    lines += [
        f"| {r.category} | {r.prompts} | {f(r.accuracy)} | {f(r.chance)} | {f(r.text_cosine)} "
        f"| {f(r.image_accuracy)} | {f(r.image_chance)} | {f(r.image_cosine)} |"
        for r in rows
    ]
    return "\n".join(lines)
