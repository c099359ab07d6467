"""What a run cost: training tokens per stage and the estimated training FLOPs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from heft_core.config import RunConfig


def tokens_by_stage(steps: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Training tokens (real, unpadded) per stage, from per-step tokens/s and cumulative training seconds."""
    totals: dict[str, float] = {}
    previous = 0.0
    for step in sorted(steps, key=lambda s: s.get("step", 0)):
        elapsed = float(step.get("elapsed_seconds") or 0.0)
        totals[step["stage"]] = totals.get(step["stage"], 0.0) + float(step.get("tokens_per_second") or 0.0) * (
            elapsed - previous
        )
        previous = elapsed
    return {stage: int(round(value)) for stage, value in totals.items()}


FLOPS_FORMULA = (
    "Estimated training FLOPs (multiply-add = 2), per stage over the real (unpadded) training tokens T of that stage: "
    "forward 2·N·T, with N the decoder's linear weights (layers x sum of in x out of each linear module); "
    "backward through what needs gradients: activation gradients 2·N·T·(L - l0)/L for LoRA (l0 the first adapted "
    "layer; all L layers by default) and 2·N·T_b·(L - 1 - l0)/L for ReFT (l0 the first intervened layer, whose output "
    "is intervened; T_b = T, or the last-n tokens of each training row when the positions are 'ln' only and the prefix "
    "is reused without gradients); plus 6·P·T_b for the P trained adapter or intervention parameters (their forward, "
    "input and weight gradients). Not counted: embeddings, norms, attention scores, the answer head, evaluation, "
    "and the forward work that cached ReFT prefix states save in later epochs (so ReFT is an upper bound)."
)


def training_flops(
    config: RunConfig,
    num_layers: int,
    linear_params: int,
    tokens: Mapping[str, int],
    trainable: Mapping[str, int],
    train_examples: int | None = None,
) -> float:
    """Estimated training FLOPs of one run: see :data:`FLOPS_FORMULA`. 0 for a base run."""
    total = 0.0
    for stage, settings in config.stages():
        stage_tokens = int(tokens.get(stage, 0))
        params = int(trainable.get(stage, 0))
        backward_tokens = stage_tokens
        if stage == "lora":
            first = min(config.lora.layers) if config.lora.layers else 0
            depth = (num_layers - first) / num_layers
        else:
            first = min(config.reft.resolved_layers(num_layers))
            depth = (num_layers - 1 - first) / num_layers
            first_n, last_n = config.reft.first_last
            if first_n == 0 and train_examples:  # prefix reuse: only the last n tokens run with gradients
                backward_tokens = min(stage_tokens, last_n * train_examples * settings.epochs)
        total += (
            2 * linear_params * stage_tokens
            + 2 * linear_params * backward_tokens * depth
            + 6 * params * backward_tokens
        )
    return total


def decoder_shape(model_ref: str) -> tuple[int, int]:
    """(decoder layers, linear weights of the decoder) from the model's config (no weights loaded)."""
    from heft_core.models import model_info

    info = model_info(model_ref)
    return info.num_layers, info.num_layers * sum(fan_in * fan_out for _, fan_in, fan_out in info.linear_shapes)
