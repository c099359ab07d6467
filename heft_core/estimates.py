"""Estimates before training: a model's shape and the trainable parameters of LoRA and LoReFT.

One place for the formulas the UI shows before launch and the engine relies on. Imports no
torch: ``model_shape`` reads the model's config through ``heft_core.models`` only when asked
(that module loads torch), and the paper's model has a known shape so it needs no hub access.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from heft_core.config import parse_positions

LLAMA2_7B = "meta-llama/Llama-2-7b-hf"
LLAMA2_7B_CHAT = "meta-llama/Llama-2-7b-chat-hf"  # the paper's base model (arXiv 2509.09801), same shape

# Shapes of models an estimate must not download: {"num_layers", "hidden_size", "linear": {module: (in, out)}}.
KNOWN_SHAPES: dict[str, dict[str, Any]] = {
    LLAMA2_7B: {
        "num_layers": 32, "hidden_size": 4096,
        "linear": {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
                   "gate_proj": (4096, 11008), "up_proj": (4096, 11008), "down_proj": (11008, 4096)},
    },
}
KNOWN_SHAPES[LLAMA2_7B_CHAT] = KNOWN_SHAPES[LLAMA2_7B]


def model_shape(model_ref: str) -> dict[str, Any]:
    """{"num_layers", "hidden_size", "linear": {module: (in, out)}} for a model, from its config only.

    Raises ModelLoadError with a readable message when the model cannot be read.
    """
    ref = (model_ref or "").strip()
    if ref in KNOWN_SHAPES:
        return KNOWN_SHAPES[ref]
    from heft_core.models import model_info  # imports torch: only when a shape must be read

    info = model_info(ref)  # cached per model reference
    linear = {name: (fan_in, fan_out) for name, fan_in, fan_out in info.linear_shapes}
    return {"num_layers": info.num_layers, "hidden_size": info.hidden_size, "linear": linear}


def lora_params(shape: Mapping[str, Any], rank: int, targets: Sequence[str],
                layers: Sequence[int] | None = None) -> int:
    """Trainable LoRA parameters: r * (in + out) per targeted linear layer."""
    linear = shape["linear"]
    modules = sorted(linear) if list(targets) == ["all-linear"] else [t for t in targets if t in linear]
    n_layers = len(layers) if layers else shape["num_layers"]
    return sum(rank * (linear[m][0] + linear[m][1]) for m in modules) * n_layers


def intervention_groups(first: int, last: int, share_weights: bool) -> int:
    """LoReFT intervention sets per layer: two when first and last positions get separate weights."""
    return 2 if (first and last and not share_weights) else 1


def reft_params(hidden_size: int, rank: int, n_layers: int, positions: str, share_weights: bool) -> int:
    """Trainable LoReFT parameters: R (d x r) + W, b (d x r + r) per intervention, per group of positions."""
    first, last = parse_positions(positions)
    return (2 * hidden_size * rank + rank) * n_layers * intervention_groups(first, last, share_weights)


def matmul_parameters(shape: Mapping[str, Any]) -> int:
    """Weights of the decoder layers' linear modules: what a token's matrix products cost scales with."""
    return shape["num_layers"] * sum(fan_in * fan_out for fan_in, fan_out in shape["linear"].values())
