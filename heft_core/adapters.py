"""Model wrappers that each do one thing: give answer-position logits for a batch (and, for scoring by
generation, greedy continuations of it; for the LoRA stage's sequence loss, the causal-LM loss).

- ``PlainAnswerModel``: a base model or a peft (LoRA) model.
- ``ReftAnswerModel``: pyreft LoReFT interventions on the residual stream of chosen layers,
  over any host module (the base model, a peft model with a frozen adapter, or a model with
  LoRA merged in). pyreft provides the wrapper and the intervention modules; positions,
  train/eval switching, dtype and the saved format are ours (see shared notes on pyreft).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch

from heft_common.errors import RunLoadError
from heft_core.batching import Batch, SequenceBatch, intervention_positions
from heft_core.config import LoraSettings, ReftSettings
from heft_core.estimates import intervention_groups
from heft_core.models import decoder_layers_path
from heft_core.prefix_cache import PrefixStateCache

logger = logging.getLogger(__name__)


def build_lora_model(model: Any, settings: LoraSettings, num_layers: int, adapter_name: str = "default") -> Any:
    """Wrap ``model`` with a trainable peft LoRA adapter."""
    from peft import LoraConfig, get_peft_model  # heavy: deferred

    target: str | list[str] = list(settings.target_modules)
    if target == ["all-linear"]:
        # peft refuses layers_to_transform with the "all-linear" shorthand, so name the modules.
        target = _linear_module_names(model) if settings.layers else "all-linear"
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target,
        layers_to_transform=settings.layers or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config, adapter_name=adapter_name)


def _linear_module_names(model: Any) -> list[str]:
    """Short names of the model's linear layers other than the vocabulary head."""
    names = {
        name.rsplit(".", 1)[-1] for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
    }
    return sorted(names)


class AnswerModel:
    """Answer-position logits for a batch, and the parameters that train."""

    module: torch.nn.Module

    def answer_logits(self, batch: Batch) -> torch.Tensor:  # (B, vocab)
        raise NotImplementedError

    def generate(self, batch: Batch, **generation: Any) -> torch.Tensor:
        """Greedy continuations of the (left-padded) prompts: the new token ids only, (B, <= max_new_tokens)."""
        raise NotImplementedError

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def eval(self) -> None:
        self.train(False)


def _model_inputs(batch: Batch) -> dict[str, torch.Tensor | int | bool]:
    # logits_to_keep=1: the vocabulary projection runs for the answer position only.
    return {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "position_ids": batch.position_ids,
        "logits_to_keep": 1,
        "use_cache": False,
    }


class PlainAnswerModel(AnswerModel):
    def __init__(self, module: torch.nn.Module):
        self.module = module

    def answer_logits(self, batch: Batch) -> torch.Tensor:
        return self.module(**_model_inputs(batch)).logits[:, -1, :]

    def sequence_loss(self, batch: SequenceBatch) -> torch.Tensor:
        """transformers' own causal-LM loss (shifted, mean over the labelled tokens of the batch)."""
        return self.module(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels, use_cache=False
        ).loss

    def generate(self, batch: Batch, **generation: Any) -> torch.Tensor:
        # generate() derives each row's positions from the attention mask, so left padding is harmless.
        output = self.module.generate(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, **_greedy(generation)
        )
        return output[:, batch.input_ids.shape[1]:]


def _greedy(generation: dict[str, Any]) -> dict[str, Any]:
    return {"do_sample": False, "num_beams": 1, "use_cache": True, **generation}


class ReftAnswerModel(AnswerModel):
    """LoReFT interventions attached to ``host`` through pyreft's ``ReftModel``."""

    def __init__(
        self, host: torch.nn.Module, settings: ReftSettings, num_layers: int, hidden_size: int,
        state: dict[str, torch.Tensor] | None = None, prefix_cache: PrefixStateCache | None = None,
        reuse_prefix: bool = True,
    ):
        import pyreft  # heavy: deferred

        self.settings = settings
        # Off only to measure what reusing the prefix gains (bench/throughput.py); results are equal.
        self.reuse_prefix = reuse_prefix
        self.prefix_cache = prefix_cache if prefix_cache is not None else PrefixStateCache()
        self.layers = settings.resolved_layers(num_layers)
        self.first, self.last = settings.first_last
        groups = intervention_groups(self.first, self.last, settings.share_weights)
        layers_path = decoder_layers_path(host, num_layers)
        device = next(host.parameters()).device
        representations = []
        for _group in range(groups):
            for layer in self.layers:
                intervention = pyreft.LoreftIntervention(
                    embed_dim=hidden_size,
                    low_rank_dimension=settings.rank,
                    dropout=settings.dropout,
                    dtype=torch.float32,  # pyreft defaults to bfloat16; we keep fp32 params and use autocast on GPUs
                )
                representations.append({
                    "layer": layer,
                    "component": f"{layers_path}[{layer}].output",
                    "low_rank_dimension": settings.rank,
                    "intervention": intervention,
                })
        self.module = pyreft.get_reft_model(
            host, pyreft.ReftConfig(representations=representations), set_device=False, disable_model_grads=True
        )
        self.interventions: list[torch.nn.Module] = list(self.module.interventions.values())
        for intervention in self.interventions:
            intervention.to(device)
        if state is not None:
            self.load_intervention_state(state)
        self.train(False)

    def answer_logits(self, batch: Batch) -> torch.Tensor:
        groups = intervention_positions(batch, self.first, self.last, self.settings.share_weights)
        cut = self._prefix_end(batch, groups)
        # Tokens before ``cut`` are untouched by any intervention: take their keys and values
        # from the frozen host (see heft_core.prefix_cache) and run only the rest.
        cache = self.prefix_cache.host_cache(self.module.model, batch, cut) if cut else None
        return self._logits(batch, groups, cache, cut)

    def generate(self, batch: Batch, **generation: Any) -> torch.Tensor:
        """pyvene's generate with the interventions on the prompt's positions only (the paper's scoring);
        the generated tokens see them through the cached keys and values. No prefix reuse here."""
        groups = intervention_positions(batch, self.first, self.last, self.settings.share_weights)
        per_group = len(self.layers)
        locations = [groups[i // per_group] for i in range(len(self.interventions))]
        _, output = self.module.generate(
            {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask},
            unit_locations={"sources->base": (None, locations)}, intervene_on_prompt=True, **_greedy(generation),
        )
        return output[:, batch.input_ids.shape[1]:]

    def prefix_end(self, batch: Batch) -> int:
        """First column any intervention touches in ``batch``; 0 when there is no prefix to reuse."""
        groups = intervention_positions(batch, self.first, self.last, self.settings.share_weights)
        return self._prefix_end(batch, groups)

    def logits_after_prefix(self, batch: Batch, cache: Any, cut: int) -> torch.Tensor:
        """Answer logits when ``cache`` already holds the host's keys and values of columns ``[:cut]``
        (``cut`` from :meth:`prefix_end`), e.g. from a prompt pass another variant made on the same host."""
        groups = intervention_positions(batch, self.first, self.last, self.settings.share_weights)
        return self._logits(batch, groups, cache, cut)

    def _logits(self, batch: Batch, groups: list[list[list[int]]], cache: Any, cut: int) -> torch.Tensor:
        inputs = _model_inputs(batch)
        if cut:
            inputs = {
                "input_ids": batch.input_ids[:, cut:], "attention_mask": batch.attention_mask,
                "position_ids": batch.position_ids[:, cut:], "cache": cache, "logits_to_keep": 1,
            }
            groups = [[[position - cut for position in row] for row in group] for group in groups]
        per_group = len(self.layers)
        locations = [groups[i // per_group] for i in range(len(self.interventions))]
        _, output = self.module(inputs, unit_locations={"sources->base": (None, locations)})
        return output.logits[:, -1, :]

    def _prefix_end(self, batch: Batch, groups: list[list[list[int]]]) -> int:
        """First column that any intervention touches, or 0 when no row has a prefix to reuse."""
        if not self.reuse_prefix:
            return 0
        cut = min(position for group in groups for row in group for position in row)
        longest_padding = batch.input_ids.shape[1] - min(batch.lengths)
        return cut if cut > longest_padding else 0

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for iv in self.interventions for p in iv.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> None:
        # pyvene's train()/eval() switch only the host; the host stays frozen in eval mode
        # and only the interventions' dropout follows ``mode``.
        self.module.model.eval()
        for intervention in self.interventions:
            intervention.train(mode)

    def intervention_state(self) -> dict[str, torch.Tensor]:
        """Full state (parametrisation included) so a reload is bit-exact and trainable."""
        state = {}
        for index, intervention in enumerate(self.interventions):
            for key, value in torch.nn.Module.state_dict(intervention).items():
                state[f"{index}.{key}"] = value.detach().cpu().contiguous()
        return state

    def load_intervention_state(self, state: dict[str, torch.Tensor]) -> None:
        for index, intervention in enumerate(self.interventions):
            prefix = f"{index}."
            own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if not own:
                raise RunLoadError(
                    f"saved ReFT state has no intervention {index}; it was saved with other layers or positions"
                )
            torch.nn.Module.load_state_dict(intervention, own, strict=True)


def count_parameters(parameters: Iterable[torch.nn.Parameter]) -> int:
    return sum(p.numel() for p in parameters)
