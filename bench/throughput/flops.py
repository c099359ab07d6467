"""Model FLOPs of a training or evaluation step, for the utilisation columns."""
from __future__ import annotations

from typing import Any

from bench.throughput.build import BenchOptions, reft_settings
from bench.throughput.workload import Workload


def step_flops(
    config: Any, batch_shape: tuple[int, int], *, logit_positions: int, lowest_trainable_layer: int, train: bool = True,
    forward_tokens: int | None = None, backward_tokens: int | None = None,
) -> float:
    """Executed model FLOPs of one step (multiply-add = 2 FLOPs), on padded shapes.

    forward  = 2 * P_layers * B*T            (every linear layer of every decoder layer)
             + 4 * L * B * T^2 * d           (attention scores and weighted sum, full square)
             + 2 * d * V * logit_positions   (vocabulary head; 1 per row for heft_core, B*T for full logits)
    backward = input gradients only (the base weights are frozen; adapter weight gradients are
               negligible): 1x the forward of each linear layer, 2x the attention matmuls, 1x
               the head, and only for decoder layers above ``lowest_trainable_layer`` (nothing
               below the lowest LoRA/intervention needs a gradient). LoRA adapters in every
               layer: lowest_trainable_layer = -1 (all layers, counting the layer holding it).
    ``forward_tokens`` / ``backward_tokens``: when only the last tokens of each row run (ReFT with a
    reused prefix), linear FLOPs count those tokens and attention counts them as queries over
    the whole width.
    Embedding lookups, norms, activations and the adapters' own FLOPs are not counted.
    """
    batch, width = batch_shape
    layers = config.num_hidden_layers
    d = config.hidden_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    ff = config.intermediate_size
    per_layer = d * heads * head_dim + 2 * d * kv * head_dim + heads * head_dim * d + 3 * d * ff
    def linear(queries: int) -> float:
        return 2 * per_layer * batch * queries

    def attention(queries: int) -> float:
        return 4 * batch * queries * width * heads * head_dim

    head = 2 * d * config.vocab_size * logit_positions
    fwd_tokens = forward_tokens or width
    forward = layers * (linear(fwd_tokens) + attention(fwd_tokens)) + head
    if not train:
        return float(forward)
    if lowest_trainable_layer < 0:
        backward_layers = layers
    else:
        backward_layers = layers - 1 - lowest_trainable_layer
    bwd_tokens = backward_tokens or width
    backward = backward_layers * (linear(bwd_tokens) + 2 * attention(bwd_tokens)) + head
    return float(forward + backward)


def side_flops(kind: str, config: Any, workload: Workload, opts: BenchOptions) -> list[float]:
    """FLOPs per batch for a side kind, from the shapes that side really runs."""
    layers_all = config.num_hidden_layers
    reft = reft_settings(opts)
    reft_lowest = min(reft.resolved_layers(layers_all))
    first, last = reft.first_last
    suffix = last if not first else 0  # tokens that run with interventions when the prefix is reused
    out = []
    for chunk in workload.chunks:
        batch = len(chunk)
        width = max(len(e.input_ids) for e in chunk)
        if kind.startswith("lora-ours"):
            out.append(step_flops(config, (batch, width), logit_positions=batch, lowest_trainable_layer=-1))
        elif kind in ("lora-ref", "lora-ref-bf16"):
            out.append(step_flops(config, (batch, width + 1), logit_positions=batch * (width + 1), lowest_trainable_layer=-1))
        elif kind in ("reft-ours-full", "heft2-ours") or (kind == "reft-ours" and not suffix):
            out.append(step_flops(config, (batch, width), logit_positions=batch, lowest_trainable_layer=reft_lowest))
        elif kind == "reft-ours":  # prefix without autograd, then the last positions with it
            out.append(step_flops(config, (batch, width), logit_positions=batch, lowest_trainable_layer=reft_lowest, backward_tokens=suffix))
        elif kind == "reft-ours-cached":  # only the last positions run at all
            out.append(step_flops(config, (batch, width), logit_positions=batch, lowest_trainable_layer=reft_lowest, backward_tokens=suffix, forward_tokens=suffix))
        elif kind == "reft-ref":
            out.append(step_flops(config, (batch, width + 1), logit_positions=batch * (width + 1), lowest_trainable_layer=reft_lowest))
        else:
            raise ValueError(kind)
    return out
