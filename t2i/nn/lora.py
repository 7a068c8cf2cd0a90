"""Low-rank adapters (LoRA, Hu et al. 2021) for ``nn.Linear`` layers.

``inject_lora(model, targets, rank)`` swaps each matching ``nn.Linear`` for a ``LoRALinear`` that *shares* the
original ``weight`` and ``bias`` parameters, so the model's own state-dict keys do not change (an official
checkpoint still loads into an injected model) and no weight is copied. Each layer can hold several named
adapters, each with its own rank, alpha and mixing weight:

    y = W x + b + sum_a  weight_a * (alpha_a / rank_a) * up_a(down_a(dropout_a(x)))

``up`` starts at zero, so injection leaves outputs unchanged. ``merge_lora`` folds the active adapters into
``W`` for inference at no extra cost. ``unmerge_lora`` restores the exact original ``W``: it keeps the
pre-merge weight rather than subtracting the delta, since ``(W + d) - d != W`` in floating point.

The portable form of an adapter is ``lora_state_dict``: ``{module}.lora_down.weight`` ``(r, in)``,
``{module}.lora_up.weight`` ``(out, r)`` and ``{module}.alpha`` (a scalar), keyed by the model's own module
names. ``t2i.io.lora`` converts that to the diffusers/peft and kohya layouts.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_NAME = re.compile(r"^[A-Za-z0-9_]+$")


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` carrying named low-rank adapters; ``weight``/``bias`` are the wrapped layer's own."""

    def __init__(self, base: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter objects: optimisers and checkpoints see no change
        self.bias = base.bias
        self.lora_down = nn.ModuleDict()
        self.lora_up = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_alpha: dict[str, float] = {}
        self.lora_mix: dict[str, float] = {}  # per-adapter weight when several are stacked
        self._unmerged_weight: Tensor | None = None

    def extra_repr(self) -> str:
        adapters = ", ".join(
            f"{n}(r={self.rank(n)}, alpha={self.lora_alpha[n]}, w={self.lora_mix[n]})" for n in self.adapters
        )
        return f"{super().extra_repr()}, adapters=[{adapters}], merged={self.merged}"

    @property
    def adapters(self) -> list[str]:
        return list(self.lora_down.keys())

    @property
    def merged(self) -> bool:
        return self._unmerged_weight is not None

    def rank(self, name: str) -> int:
        return self.lora_down[name].out_features

    def add_adapter(self, name: str, rank: int, alpha: float | None = None, dropout: float = 0.0, weight: float = 1.0):
        if not _NAME.match(name):
            raise ValueError(f"adapter name {name!r} must be letters, digits and underscores")
        if name in self.lora_down:
            raise ValueError(f"adapter {name!r} already exists on this layer; remove it first or pick another name")
        if rank < 1 or rank > min(self.in_features, self.out_features):
            raise ValueError(f"LoRA rank must lie in [1, {min(self.in_features, self.out_features)}], got {rank}")
        if self.merged:
            raise ValueError("unmerge_lora(model) before adding adapters to a merged model")
        kw = {"device": self.weight.device, "dtype": self.weight.dtype}
        down = nn.Linear(self.in_features, rank, bias=False, **kw)
        up = nn.Linear(rank, self.out_features, bias=False, **kw)
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))  # as nn.Linear; up = 0 keeps the output unchanged
        nn.init.zeros_(up.weight)
        self.lora_down[name], self.lora_up[name] = down, up
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_alpha[name] = float(rank if alpha is None else alpha)
        self.lora_mix[name] = float(weight)

    def remove_adapter(self, name: str) -> None:
        if self.merged:
            raise ValueError("unmerge_lora(model) before removing adapters from a merged model")
        for d in (self.lora_down, self.lora_up, self.lora_dropout):
            del d[name]
        del self.lora_alpha[name], self.lora_mix[name]

    def scale(self, name: str) -> float:
        return self.lora_mix[name] * self.lora_alpha[name] / self.rank(name)

    def delta_weight(self, name: str) -> Tensor:
        """The adapter's contribution to W, ``scale * up @ down``, in float32."""
        return self.scale(name) * (self.lora_up[name].weight.float() @ self.lora_down[name].weight.float())

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        for name in self.adapters:
            s = self.scale(name)
            if s != 0:
                h = self.lora_down[name](self.lora_dropout[name](x.to(self.lora_down[name].weight.dtype)))
                out = out + s * self.lora_up[name](h).to(out.dtype)
        return out

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged or not self.adapters:
            return
        self._unmerged_weight = self.weight.detach().clone()
        delta = sum(self.delta_weight(n) for n in self.adapters)
        self.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None


# -- model-level helpers ----------------------------------------------------------------------------------------


def _matches(name: str, patterns: Sequence[str]) -> bool:
    # a pattern without wildcards matches a whole dotted suffix: "attn.qkv" matches "joint_blocks.0.x_block.attn.qkv"
    for p in patterns:
        if any(c in p for c in "*?["):
            if fnmatch.fnmatchcase(name, p):
                return True
        elif name == p or name.endswith("." + p):
            return True
    return False


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def inject_lora(
    model: nn.Module,
    targets: Sequence[str],
    rank: int,
    *,
    alpha: float | None = None,
    dropout: float = 0.0,
    name: str = "default",
    weight: float = 1.0,
) -> list[str]:
    """Add adapter ``name`` to every ``nn.Linear`` whose module name matches ``targets``; returns their names.

    A target is a dotted suffix (``"attn.qkv"``) or an fnmatch pattern (``"joint_blocks.*.x_block.mlp.fc1"``).
    """
    if isinstance(targets, str):
        targets = [targets]
    hits = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n and _matches(n, targets)]
    if not hits:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"no nn.Linear layer matches {list(targets)}; linear layers look like {linear[:6]} ({len(linear)} in all)"
        )
    for module_name, _ in hits:
        _as_lora_layer(model, module_name).add_adapter(name, rank, alpha, dropout, weight)
    return [n for n, _ in hits]


def _as_lora_layer(model: nn.Module, module_name: str) -> LoRALinear:
    """The ``LoRALinear`` at ``module_name``, swapping it in (sharing weights) if the layer is a plain Linear."""
    module = model.get_submodule(module_name)
    if not isinstance(module, LoRALinear):
        module = LoRALinear(module)
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
    return module


def mark_only_lora_trainable(model: nn.Module, names: Iterable[str] | None = None) -> list[nn.Parameter]:
    """Freeze every parameter except the adapters (all, or those in ``names``); returns the trainable ones."""
    keep = None if names is None else set(names)
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = []
    for _, layer in lora_layers(model):
        for n in layer.adapters:
            if keep is None or n in keep:
                for p in (*layer.lora_down[n].parameters(), *layer.lora_up[n].parameters()):
                    p.requires_grad_(True)
                    trainable.append(p)
    return trainable


def set_adapter_weight(model: nn.Module, name: str, weight: float) -> None:
    """Change the mixing weight of adapter ``name`` everywhere (0 switches it off without removing it)."""
    found = False
    for _, layer in lora_layers(model):
        if name in layer.lora_mix:
            if layer.merged:
                raise ValueError("unmerge_lora(model) before changing adapter weights")
            layer.lora_mix[name] = float(weight)
            found = True
    if not found:
        raise ValueError(f"no adapter named {name!r} in this model")


def merge_lora(model: nn.Module) -> int:
    """Fold every active adapter into its base weight; returns the number of layers merged."""
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer.merge()
    return len(layers)


def unmerge_lora(model: nn.Module) -> None:
    """Restore the exact pre-merge base weights."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def remove_lora(model: nn.Module, name: str | None = None) -> None:
    """Remove adapter ``name`` (or all); layers left without adapters become plain ``nn.Linear`` again."""
    for module_name, layer in list(lora_layers(model)):
        layer.unmerge()
        for n in [name] if name is not None else layer.adapters:
            if n in layer.lora_down:
                layer.remove_adapter(n)
        if not layer.adapters:
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
            plain.weight, plain.bias = layer.weight, layer.bias
            parent_name, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)


def lora_state_dict(model: nn.Module, name: str = "default") -> dict[str, Tensor]:
    """Adapter ``name`` alone: ``{module}.lora_down.weight``, ``{module}.lora_up.weight``, ``{module}.alpha``."""
    out: dict[str, Tensor] = {}
    for module_name, layer in lora_layers(model):
        if name in layer.lora_down:
            out[f"{module_name}.lora_down.weight"] = layer.lora_down[name].weight.detach()
            out[f"{module_name}.lora_up.weight"] = layer.lora_up[name].weight.detach()
            out[f"{module_name}.alpha"] = torch.tensor(layer.lora_alpha[name])
    if not out:
        raise ValueError(f"no adapter named {name!r} in this model")
    return out


def load_lora_state_dict(
    model: nn.Module, state: dict[str, Tensor], *, name: str = "default", weight: float = 1.0
) -> list[str]:
    """Add adapter ``name`` from a ``lora_state_dict``-style mapping; ranks come from the tensors.

    Every module the file names must exist as an ``nn.Linear`` of matching shape; all problems are reported in
    one error.
    """
    modules = sorted({k.rsplit(".", 2)[0] for k in state if k.endswith(".lora_down.weight")})
    if not modules:
        raise ValueError("no '<module>.lora_down.weight' keys found: is this a t2i LoRA state dict?")
    named = dict(model.named_modules())
    problems = []
    for m in modules:
        down, up = state[f"{m}.lora_down.weight"], state.get(f"{m}.lora_up.weight")
        layer = named.get(m)
        if not isinstance(layer, nn.Linear):
            problems.append(f"{m}: no nn.Linear of that name in the model")
        elif up is None:
            problems.append(f"{m}: lora_up.weight missing")
        elif down.shape[1] != layer.in_features or up.shape[0] != layer.out_features or up.shape[1] != down.shape[0]:
            problems.append(
                f"{m}: adapter ({tuple(up.shape)} @ {tuple(down.shape)}) does not fit a "
                f"{layer.out_features}x{layer.in_features} layer"
            )
    if problems:
        raise ValueError("this LoRA does not fit the model:\n  " + "\n  ".join(problems))
    for m in modules:
        down, up = state[f"{m}.lora_down.weight"], state[f"{m}.lora_up.weight"]
        alpha = state.get(f"{m}.alpha")
        layer = _as_lora_layer(model, m)
        layer.add_adapter(name, down.shape[0], None if alpha is None else float(alpha), weight=weight)
        with torch.no_grad():
            layer.lora_down[name].weight.copy_(down)
            layer.lora_up[name].weight.copy_(up)
    return modules


def set_lora_state_dict(model: nn.Module, state: dict[str, Tensor], *, name: str = "default") -> None:
    """Copy a ``lora_state_dict`` into the model's existing adapter ``name``; names and shapes must match exactly."""
    from t2i.io import check_state_dict

    expected = lora_state_dict(model, name)
    check_state_dict(expected, state, what=f"LoRA adapter {name!r}")
    with torch.no_grad():
        for module_name, layer in lora_layers(model):
            if name in layer.lora_down:
                layer.lora_down[name].weight.copy_(state[f"{module_name}.lora_down.weight"])
                layer.lora_up[name].weight.copy_(state[f"{module_name}.lora_up.weight"])
                alpha = float(state[f"{module_name}.alpha"])
                if alpha != layer.lora_alpha[name]:
                    raise ValueError(
                        f"{module_name}: file alpha {alpha} differs from the adapter's {layer.lora_alpha[name]}"
                    )
