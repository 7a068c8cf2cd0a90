"""Does a CLIP read order and binding, or a bag of words? ``t2i eval clip``.

For each prompt of a shapes split that has counterfactual rewrites (``t2i.data.captions.counterfactual_captions``:
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
from torch import Tensor

from t2i.data.captions import counterfactual_captions, scene_for, split_prompts
from t2i.data.shapes import render


@dataclass
class ProbeRow:
    category: str
    prompts: int
    accuracy: float  # the true caption scores above every rewrite, given the ground-truth image
    chance: float  # what a CLIP blind to the rewrites gets: mean of 1 / (1 + rewrites)
    text_cosine: float  # mean cosine of the pooled text embeddings of a caption and its rewrites


def _image_batch(prompts, size: int) -> Tensor:
    images = []
    for p in prompts:
        scene = scene_for(p.spec, np.random.default_rng(p.seed), size=size)
        images.append(torch.from_numpy(render(scene, size)).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(images)


@torch.no_grad()
def counterfactual_probe(clip, split: str = "eval", per_category: int | None = None) -> list[ProbeRow]:
    """One ``ProbeRow`` per category of ``split`` whose captions have rewrites, plus an ``all`` row."""
    clip = clip.eval()
    size = int(clip.image_size)
    rows: list[ProbeRow] = []
    totals = {"n": 0, "acc": 0.0, "chance": 0.0, "cos": 0.0}
    by_cat: dict[str, list] = {}
    for p in split_prompts(split):
        if counterfactual_captions(p.caption):
            by_cat.setdefault(p.spec.category, []).append(p)
    for category, prompts in by_cat.items():
        prompts = prompts[:per_category] if per_category else prompts
        acc = chance = cos = 0.0
        for i in range(0, len(prompts), 64):
            chunk = prompts[i : i + 64]
            img = clip.embed_image(_image_batch(chunk, max(size, 32)))
            for j, p in enumerate(chunk):
                texts = [p.caption, *counterfactual_captions(p.caption)]
                txt, _, _ = clip.embed_text(texts)
                scores = img[j] @ txt.t()
                acc += float(scores[0] > scores[1:].max())
                chance += 1 / len(texts)
                cos += float((txt[0] @ txt[1:].t()).mean())
        n = len(prompts)
        rows.append(ProbeRow(category, n, acc / n, chance / n, cos / n))
        totals["n"] += n
        totals["acc"], totals["chance"], totals["cos"] = (
            totals["acc"] + acc,
            totals["chance"] + chance,
            totals["cos"] + cos,
        )
    if not rows:
        raise ValueError(f"no prompt of split {split!r} has a counterfactual rewrite")
    n = totals["n"]
    rows.append(ProbeRow("all", n, totals["acc"] / n, totals["chance"] / n, totals["cos"] / n))
    return rows


def probe_table(rows: list[ProbeRow]) -> str:
    lines = ["| category | prompts | true caption ranked first | chance | text cosine to rewrites |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    lines += [
        f"| {r.category} | {r.prompts} | {r.accuracy:.3f} | {r.chance:.3f} | {r.text_cosine:.3f} |" for r in rows
    ]
    return "\n".join(lines)
