"""Weight-only int8 quantization of the large linear layers, through torchao.

SD3.5 Large's MMDiT is 8.1 billion parameters, 16 GB in bf16; its T5-XXL encoder 4.8 billion more. Storing the
weights of their linear layers as int8 with one scale per output row halves that, which is what lets the full
model run on a 24 GB CPU machine. Activations stay in the compute dtype; each matmul dequantizes on the fly. The
quantization itself is torchao's (``Int8WeightOnlyConfig``), not hand-written: install it with
``pip install torchao`` (the ``quant`` extra).

Only ``nn.Linear`` layers with at least ``min_features`` inputs are quantized: small projections (the timestep
and pooled-text MLPs of a tiny model, LoRA adapters) gain nothing and lose precision. Quantized modules still move
between devices, so ``offload`` composes with it.
"""

from __future__ import annotations

from torch import nn

QUANTIZE_MODES = ("int8",)


def quantize_weights(module: nn.Module, mode: str = "int8", *, min_features: int = 64) -> nn.Module:
    """Quantize ``module``'s large linear layers in place (see the module docstring); returns ``module``."""
    from t2i.errors import check_choice

    check_choice("quantization", mode, QUANTIZE_MODES)
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as err:
        raise ImportError(
            f"quantize={mode!r} needs torchao ({err.name} is missing): pip install torchao, or the quant extra"
        ) from None

    def large_linear(m: nn.Module, _fqn: str) -> bool:
        return isinstance(m, nn.Linear) and m.in_features >= min_features

    quantize_(module, Int8WeightOnlyConfig(), filter_fn=large_linear)
    return module


def quantized_linears(module: nn.Module) -> int:
    """How many linear layers of ``module`` hold quantized weights."""
    return sum(isinstance(m, nn.Linear) and type(m.weight).__name__ != "Parameter" for m in module.modules())
