"""Reuse of the frozen host's keys and values for prompt tokens that no intervention touches.

With ReFT interventions only at the last N prompt positions ("lN"), every earlier token is
computed exactly as by the frozen host: causal attention never lets it see an intervened
position, and the host's weights (base, or base + frozen stage-1 LoRA in HEFT) do not change.
So a step can run that prefix once without autograd, then run only the last N tokens, with
interventions and gradients, over the prefix's keys and values. The result equals the full
forward up to floating-point summation order (``tests/test_engine.py`` checks loss and
gradients). The prefix states of each prompt are the same in every epoch, so they are kept in
memory up to a byte budget and later epochs (and per-epoch evaluations) skip the prefix.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch

from heft_core.batching import Batch

logger = logging.getLogger(__name__)

LayerStates = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each (kv_heads, tokens, head_dim)

AUTO_SHARE = 0.25  # "auto": this share of the memory available where the states live
AUTO_FALLBACK_BYTES = 2 * 2**30  # when the available memory cannot be read


def available_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` (CUDA), or the host's MemAvailable; None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def resolve_budget(setting: int | str, device: torch.device) -> int:
    """Bytes for prefix states: ``setting`` MiB, or for "auto" a quarter of what is available now."""
    if setting != "auto":
        return int(setting) * 2**20
    available = available_bytes(device)
    return int(available * AUTO_SHARE) if available is not None else AUTO_FALLBACK_BYTES


class PrefixStateCache:
    """Per-prompt prefix keys/values of a frozen host, kept up to ``budget_bytes``.

    Prompts are keyed by their prefix token ids, so training and evaluation prompts share one
    store. Nothing is evicted: once a prompt does not fit in the budget, no more are stored and
    the rest are recomputed in every step, which is correct and only slower.
    """

    def __init__(self, budget_bytes: int = 0):
        self.budget_bytes = max(0, int(budget_bytes))
        self.used_bytes = 0
        self.hits = 0
        self.misses = 0
        self.full = self.budget_bytes == 0  # once a prompt does not fit, nothing more is stored
        self._store: dict[bytes, LayerStates] = {}

    def __len__(self) -> int:
        return len(self._store)

    def _remember(self, key: bytes, states: LayerStates) -> None:
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in states)
        if self.full or self.used_bytes + size > self.budget_bytes:
            self.full = True
            return
        self._store[key] = [(k.clone(), v.clone()) for k, v in states]
        self.used_bytes += size

    def host_cache(self, host: torch.nn.Module, batch: Batch, cut: int) -> Any:
        """A transformers ``DynamicCache`` with the host's states for columns ``[:cut]`` of ``batch``.

        Rows are left-padded, so row ``i``'s real prefix is columns ``[width - length_i, cut)``;
        the padded columns hold zeros and are masked by the batch's attention mask.
        """
        from transformers import DynamicCache  # heavy: deferred

        width = batch.input_ids.shape[1]
        starts = [width - n for n in batch.lengths]
        ids = batch.input_ids.cpu().numpy()  # one device sync, not one per row
        keys = [ids[row, starts[row]:cut].tobytes() for row in range(len(starts))]
        per_row: list[LayerStates | None] = [self._store.get(key) for key in keys]
        missing = [row for row, states in enumerate(per_row) if states is None]
        self.hits += len(per_row) - len(missing)
        self.misses += len(missing)
        if len(missing) == len(per_row) and self.full:
            return self._run_host(host, batch, missing, 0, cut)  # nothing to keep: no copies
        if missing:
            first = min(starts[row] for row in missing)
            cache = self._run_host(host, batch, missing, first, cut)
            for slot, row in enumerate(missing):
                begin = starts[row] - first
                states = [(layer.keys[slot, :, begin:], layer.values[slot, :, begin:]) for layer in cache.layers]
                per_row[row] = states
                self._remember(keys[row], states)
        layers = []
        for layer in range(len(per_row[0])):
            first_keys = per_row[0][layer][0]
            keys_all = first_keys.new_zeros((len(per_row), first_keys.shape[0], cut, first_keys.shape[-1]))
            values_all = torch.zeros_like(keys_all)
            for row, states in enumerate(per_row):
                keys_all[row, :, starts[row]:cut] = states[layer][0]
                values_all[row, :, starts[row]:cut] = states[layer][1]
            layers.append((keys_all, values_all))
        return DynamicCache(ddp_cache_data=layers)

    @staticmethod
    def _run_host(host: torch.nn.Module, batch: Batch, rows: list[int], first: int, cut: int) -> Any:
        index = torch.tensor(rows, device=batch.input_ids.device)
        with torch.no_grad():
            output = host(
                input_ids=batch.input_ids[index, first:cut], attention_mask=batch.attention_mask[index, first:cut],
                position_ids=batch.position_ids[index, first:cut], use_cache=True, logits_to_keep=1,
            )
        return output.cache
