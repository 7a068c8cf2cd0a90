"""Does a CLIP read order and binding, or a bag of words? ``t2i eval clip``.

For each prompt of a shapes split that has counterfactual rewrites (``t2i.shapes.captions.counterfactual_captions``:
the relation reversed, the colours or shapes swapped, the count changed), the probe renders the prompt's
ground-truth scene and asks the CLIP which caption fits it. A bag-of-words encoder scores about 1 / (1 + rewrites)
(a coin flip for one rewrite); an encoder that reads which way a relation points and which colour goes with which
shape scores near 1. It also reports how far apart the text tower puts a caption and its rewrites (mean cosine of
the pooled text embeddings), which is what a text-conditioned denoiser has to tell apart.

Both unCLIP (whose prior maps the text embedding to an image embedding) and the SD3-style models (which read the
CLIP's per-token states and pooled vector) inherit what this probe measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from t2i.data.dataset import to_tensor
from t2i.shapes.captions import counterfactual_captions, split_prompts
from t2i.shapes.scenes import ground_truth
from t2i.shapes.specs import Prompt


@dataclass
class ProbeRow:
    category: str
    prompts: int
    accuracy: float  # the true caption scores above every rewrite, given the ground-truth image
    chance: float  # what a CLIP blind to the rewrites gets: mean of 1 / (1 + rewrites)
    text_cosine: float  # mean cosine of the pooled text embeddings of a caption and its rewrites


@torch.no_grad()
def counterfactual_probe(clip, split: str = "eval", per_category: int | None = None) -> list[ProbeRow]:
    """One ``ProbeRow`` per category of ``split`` whose captions have rewrites, plus an ``all`` row."""
    clip = clip.eval()
    size = max(int(clip.image_size), 32)
    by_cat: dict[str, list[tuple[Prompt, list[str]]]] = {}
    for p in split_prompts(split):
        rewrites = counterfactual_captions(p.caption)
        kept = by_cat.setdefault(p.spec.category, []) if rewrites else None
        if kept is not None and (per_category is None or len(kept) < per_category):
            kept.append((p, rewrites))
    if not by_cat:
        raise ValueError(f"no prompt of split {split!r} has a counterfactual rewrite")
    rows, sums = [], np.zeros(3)
    for category, items in by_cat.items():
        per_prompt = []  # (ranked first, chance, cosine to the rewrites)
        for i in range(0, len(items), 64):
            chunk = items[i : i + 64]
            images = to_tensor(np.stack([ground_truth(p, size).image for p, _ in chunk]))
            for img, (p, rewrites) in zip(clip.embed_image(images), chunk, strict=True):
                txt, _, _ = clip.embed_text([p.caption, *rewrites])
                scores = img @ txt.t()
                per_prompt.append(
                    (float(scores[0] > scores[1:].max()), 1 / len(txt), float((txt[0] @ txt[1:].t()).mean()))
                )
        total = np.sum(per_prompt, axis=0)
        rows.append(ProbeRow(category, len(items), *(total / len(items))))
        sums += total
    n = sum(r.prompts for r in rows)
    rows.append(ProbeRow("all", n, *(sums / n)))
    return rows


def probe_table(rows: list[ProbeRow]) -> str:
    lines = ["| category | prompts | true caption ranked first | chance | text cosine to rewrites |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    lines += [
        f"| {r.category} | {r.prompts} | {r.accuracy:.3f} | {r.chance:.3f} | {r.text_cosine:.3f} |" for r in rows
    ]
    return "\n".join(lines)
