"""Frozen lower layers computed once: the hidden states entering the first LoRA-adapted layer.

When LoRA adapts only layers k and above (``lora.layers``) and nothing below k is random in train
mode (LoRA dropout lives inside the LoRA modules, all at >= k; the attention dropout of the lower
layers is 0), layers 0..k-1 compute the same function of the prompt in every epoch. So the
hidden states entering layer k are computed once per prompt without autograd, kept up to a byte
budget (like ``heft_core.prefix_cache``), and later epochs and per-epoch evaluations run only layers
k.. , the final norm and the head on them. The result equals the full forward up to floating-point
summation order (``tests/test_frozen_cache.py`` checks losses, gradients and final weights).

Only the real (unpadded) tokens of a prompt are stored, keyed by its token ids, so a prompt gets the
same states in any batch; padded columns are filled with zeros, which the attention mask hides.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from heft_core.adapters import PlainAnswerModel
from heft_core.batching import Batch
from heft_core.prefix_cache import resolve_budget

logger = logging.getLogger(__name__)

__all__ = ["FrozenLayerCache", "FrozenPrefixAnswerModel", "frozen_layers", "lora_answer_model"]


class FrozenLayerCache:
    """Per-prompt hidden states entering layer k, kept up to ``budget_bytes`` (nothing is evicted:
    once a prompt does not fit, no more are stored and the rest are recomputed each time)."""

    def __init__(self, budget_bytes: int = 0):
        self.budget_bytes = max(0, int(budget_bytes))
        self.used_bytes = 0
        self.hits = 0
        self.misses = 0
        self.full = self.budget_bytes == 0
        self.layers = 0  # k: the lower layers these states skip
        self._store: dict[bytes, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._store)

    def get(self, key: bytes) -> torch.Tensor | None:
        return self._store.get(key)

    def remember(self, key: bytes, states: torch.Tensor) -> None:
        size = states.numel() * states.element_size()
        if self.full or self.used_bytes + size > self.budget_bytes:
            self.full = True
            return
        self._store[key] = states.detach().clone()
        self.used_bytes += size

    def summary(self, setting: int | str) -> str:
        return (
            f"frozen layers 0..{self.layers - 1}: {len(self)} prompts kept ({self.used_bytes / 2**20:.0f} of "
            f"{self.budget_bytes / 2**20:.0f} MiB budget, frozen_cache_mb={setting}), "
            f"{self.hits} reused, {self.misses} computed"
        )


def _train_mode_randomness(module: torch.nn.Module) -> bool:
    """True when ``module`` has dropout that is active in train mode (modules or attention dropout)."""
    for child in module.modules():
        if isinstance(child, torch.nn.modules.dropout._DropoutNd) and child.p > 0:
            return True
        if float(getattr(child, "attention_dropout", 0.0) or 0.0) > 0:
            return True
    return False


def frozen_layers(model: Any, lora_layers: list[int] | None) -> int:
    """k: how many lower decoder layers of the (peft-wrapped) ``model`` can be computed once, or 0.

    0 when LoRA adapts every layer, when the model is not laid out as a Llama-style decoder
    (``model.embed_tokens/layers/norm/rotary_emb`` and ``lm_head``), when any parameter below k
    trains, or when something below k is random in train mode.
    """
    if not lora_layers or min(lora_layers) == 0:
        return 0
    k = min(lora_layers)
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(causal, "model", None)
    if inner is None or not all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return 0
    if not hasattr(causal, "lm_head") or len(inner.layers) <= k:
        return 0
    layer_types = getattr(inner.config, "layer_types", None)
    if layer_types and len(set(layer_types)) > 1:  # per-layer masks (sliding windows): not handled here
        return 0
    lower = [inner.embed_tokens, *inner.layers[:k]]
    if any(p.requires_grad for part in lower for p in part.parameters()):
        return 0
    if any(_train_mode_randomness(part) for part in lower):
        return 0
    return k


class FrozenPrefixAnswerModel(PlainAnswerModel):
    """Answer logits of a LoRA model whose layers below ``k`` are frozen, from cached states entering k.

    The forward is transformers' Llama decoder loop written out (causal mask, rotary embeddings from
    the model's rotary module, layers, final norm, the head at the answer position), split at k.
    """

    def __init__(self, module: torch.nn.Module, k: int, cache: FrozenLayerCache):
        super().__init__(module)
        self.k = k
        self.cache = cache
        self.causal = module.get_base_model() if hasattr(module, "get_base_model") else module
        self.inner = self.causal.model

    def _mask_and_rotary(self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor):
        from transformers.masking_utils import create_causal_mask  # heavy: deferred

        mask = create_causal_mask(
            config=self.inner.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None,
            position_ids=position_ids,
        )
        return mask, self.inner.rotary_emb(hidden, position_ids=position_ids)

    def _run_layers(self, hidden: torch.Tensor, layers: Any, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor) -> torch.Tensor:
        mask, rotary = self._mask_and_rotary(hidden, attention_mask, position_ids)
        for layer in layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=position_ids,
                           use_cache=False)
        return hidden

    @torch.no_grad()
    def _lower(self, batch: Batch, rows: list[int], first: int) -> torch.Tensor:
        """Hidden states entering layer k for ``rows`` of ``batch``, columns ``[first:]``."""
        index = torch.tensor(rows, device=batch.input_ids.device)
        ids = batch.input_ids[index, first:]
        hidden = self.inner.embed_tokens(ids)
        return self._run_layers(
            hidden, self.inner.layers[: self.k], batch.attention_mask[index, first:], batch.position_ids[index, first:]
        )

    def entering_states(self, batch: Batch) -> torch.Tensor:
        """(B, T, hidden) states entering layer k: kept ones where the cache has them, else computed."""
        width = batch.input_ids.shape[1]
        starts = [width - n for n in batch.lengths]
        ids = batch.input_ids.cpu().numpy()  # one device sync, not one per row
        keys = [ids[row, starts[row]:].tobytes() for row in range(len(starts))]
        per_row: list[torch.Tensor | None] = [self.cache.get(key) for key in keys]
        missing = [row for row, states in enumerate(per_row) if states is None]
        self.cache.hits += len(per_row) - len(missing)
        self.cache.misses += len(missing)
        if len(missing) == len(per_row) and self.cache.full:
            return self._lower(batch, missing, 0)  # nothing to keep: no copies
        if missing:
            first = min(starts[row] for row in missing)
            computed = self._lower(batch, missing, first)
            for slot, row in enumerate(missing):
                states = computed[slot, starts[row] - first:]
                per_row[row] = states
                self.cache.remember(keys[row], states)
        sample = per_row[0]
        hidden = sample.new_zeros((len(per_row), width, sample.shape[-1]))
        for row, states in enumerate(per_row):
            hidden[row, starts[row]:] = states
        return hidden

    def answer_logits(self, batch: Batch) -> torch.Tensor:
        hidden = self.entering_states(batch)
        hidden = self._run_layers(hidden, self.inner.layers[self.k:], batch.attention_mask, batch.position_ids)
        hidden = self.inner.norm(hidden[:, -1:, :])  # RMSNorm is per position: the answer position only
        return self.causal.lm_head(hidden)[:, -1, :]


def lora_answer_model(
    lora_model: Any, config: Any, device: torch.device,
) -> tuple[PlainAnswerModel, FrozenLayerCache | None]:
    """The LoRA stage's answer model: with frozen lower layers (and the answer-token loss, which needs
    only the answer position's logits) the cached split forward, else the plain one."""
    k = frozen_layers(lora_model, config.lora.layers) if getattr(config, "lora_loss", "answer") == "answer" else 0
    if not k:
        return PlainAnswerModel(lora_model), None
    cache = FrozenLayerCache(resolve_budget(config.frozen_cache_mb, device))
    cache.layers = k
    return FrozenPrefixAnswerModel(lora_model, k, cache), cache
