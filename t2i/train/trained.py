"""Loading what ``t2i train`` made, with the inputs a run config does not hold.

``t2i.models.files.load_trained`` rebuilds a network from the config stored with its weights. A from-scratch CLIP
also needs its tokenizer, which is not a config field: it is the shapes caption vocabulary, rebuilt here from the
caption grammar (the same every time, so a run's weights always load). Training tasks, ``t2i export`` and
``t2i eval clip`` load trained networks through ``load_trained`` below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from t2i.models import files


def clip_tokenizer(params: dict[str, Any] | None):
    """The tokenizer of a ``clip`` model trained here: the shapes caption vocabulary at the config's context
    length."""
    from t2i.models import model_config
    from t2i.shapes.captions import shapes_tokenizer

    return shapes_tokenizer(context_length=model_config("clip", params).context_length)


def model_inputs(name: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """What network ``name`` takes besides its config when built from ``params``."""
    return {"tokenizer": clip_tokenizer(params)} if name == "clip" else {}


def load_trained(path: str | Path, name: str) -> nn.Module:
    """``t2i.models.files.load_trained`` with the tokenizer a from-scratch CLIP run needs."""
    return files.load_trained(path, name, inputs_for=lambda params: model_inputs(name, params))
