"""Building a side from scratch by kind: model, adapters, batches and autocast."""
from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch

from bench.throughput.sides import OursSide, PyreftSide, Side, TrainerSide
from bench.throughput.workload import Workload


@dataclass
class BenchOptions:
    """Everything a side builder needs; picklable (memory subprocesses rebuild from it)."""

    model: str = "embedded"
    device: str = "cpu"
    dtype: str = "float32"  # base weights
    seed: int = 42
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_lr: float = 2e-4
    reft_rank: int = 4
    reft_layers: str = "8,16,24"
    reft_positions: str = "l1"
    reft_lr: float = 2e-3
    bf16_autocast_ref: bool = False  # GPU: the reference recipes train under bf16 autocast too
    tiny_config: dict[str, Any] | None = None  # gpu_check: build a random model from this LlamaConfig

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def load_base(opts: BenchOptions, *, ours: bool) -> Any:
    """A frozen base model: heft_core's loader for our side, plain transformers for the references."""
    if opts.tiny_config is not None:  # a random Llama of the given shape, built in place (gpu_check)
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(opts.seed)
        with torch.device(opts.torch_device):
            model = AutoModelForCausalLM.from_config(LlamaConfig(**opts.tiny_config), dtype=opts.torch_dtype)
        model.eval().requires_grad_(False)
        model.config.use_cache = False
        return model
    if ours:
        from heft_core.models import load_model

        return load_model(opts.model, dtype=opts.torch_dtype, device=opts.torch_device)
    from transformers import AutoModelForCausalLM

    from heft_core.models import resolve_model_path

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(opts.model), dtype=opts.torch_dtype).to(opts.torch_device)
    model.config.use_cache = False  # as in ours: no KV cache while training
    return model


def model_shape(model: Any) -> tuple[int, int]:
    return model.config.num_hidden_layers, model.config.hidden_size


def bf16_autocast(device: torch.device) -> Callable[[], Any]:
    return functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)


def lora_settings(opts: BenchOptions) -> Any:
    from heft_core.config import LoraSettings

    return LoraSettings(rank=opts.lora_rank, alpha=opts.lora_alpha, dropout=0.0, target_modules=["all-linear"])


def reft_settings(opts: BenchOptions) -> Any:
    from heft_core.config import ReftSettings

    return ReftSettings(rank=opts.reft_rank, layers=opts.reft_layers, positions=opts.reft_positions, dropout=0.0, share_weights=True)


REFT_OURS_KINDS = ("reft-ours", "reft-ours-full", "reft-ours-cached", "heft2-ours")


def build_side(kind: str, opts: BenchOptions, workload: Workload, max_steps: int) -> Side:
    """Build one side from scratch. Kinds: lora-ours, lora-ours-bf16, lora-ours-compiled, lora-ref, lora-ref-bf16, reft-ref and ``REFT_OURS_KINDS``."""
    from heft_core.adapters import PlainAnswerModel, ReftAnswerModel, build_lora_model

    device = opts.torch_device
    gpu_autocast = bf16_autocast(device) if opts.bf16_autocast_ref else None
    # The bf16 sides keep fp32 base weights and train under bf16 autocast: heft_core's precision
    # "bf16" does that on CPUs (see heft_core.train.resolve_precision), and so does the Trainer's
    # bf16=True (mixed precision over the model as loaded).
    bf16_side = kind.endswith("-bf16")
    if kind in ("lora-ours", "lora-ours-bf16", "lora-ours-compiled"):
        base = load_base(opts, ours=True)
        torch.manual_seed(opts.seed)
        model = build_lora_model(base, lora_settings(opts), model_shape(base)[0])
        autocast = bf16_autocast(device) if bf16_side or opts.bf16_autocast_ref else None
        if kind == "lora-ours-compiled":  # a probe, not heft_core's path: see --compile-probe
            for layer in model.get_base_model().model.layers:
                layer.forward = torch.compile(layer.forward, dynamic=True)
        return OursSide(kind, PlainAnswerModel(model), workload.ours(device), yes_id=workload.yes_id, no_id=workload.no_id, lr=opts.lora_lr, autocast=autocast)
    if kind in ("lora-ref", "lora-ref-bf16"):
        from peft import LoraConfig, get_peft_model

        base = load_base(opts, ours=False)
        torch.manual_seed(opts.seed)
        config = LoraConfig(r=opts.lora_rank, lora_alpha=opts.lora_alpha, lora_dropout=0.0, target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(base, config)  # peft keeps LoRA weights in fp32 over a bf16 base
        # CPU batches, as a user's dataset gives them: the Trainer pins and moves them itself.
        return TrainerSide(kind, model, workload.reference(torch.device("cpu")), lr=opts.lora_lr, max_steps=max_steps, device=device, bf16=bf16_side or opts.bf16_autocast_ref, seed=opts.seed)
    if kind in REFT_OURS_KINDS:
        from heft_core.prefix_cache import PrefixStateCache

        base = load_base(opts, ours=True)
        layers, hidden = model_shape(base)
        host = base
        if kind == "heft2-ours":  # HEFT stage 2: ReFT on the frozen stage-1 LoRA model
            torch.manual_seed(opts.seed)
            host = build_lora_model(base, lora_settings(opts), layers)
            host.requires_grad_(False)
            host.eval()
        torch.manual_seed(opts.seed)
        cached = kind == "reft-ours-cached"
        answer_model = ReftAnswerModel(
            host, reft_settings(opts), layers, hidden,
            prefix_cache=PrefixStateCache(2**40 if cached else 0), reuse_prefix=kind != "reft-ours-full",
        )
        batches = workload.ours(device)
        if cached:  # a later epoch: the first one kept every prompt's prefix states
            with torch.no_grad(), (gpu_autocast or nullcontext)():
                for batch in batches:
                    answer_model.answer_logits(batch)
        return OursSide(kind, answer_model, batches, yes_id=workload.yes_id, no_id=workload.no_id, lr=opts.reft_lr, autocast=gpu_autocast)
    if kind == "reft-ref":
        import pyreft

        base = load_base(opts, ours=False)
        layers, hidden = model_shape(base)
        chosen = reft_settings(opts).resolved_layers(layers)
        torch.manual_seed(opts.seed)
        iv_dtype = torch.bfloat16 if opts.bf16_autocast_ref else base.dtype  # pyreft's default dtype is bf16
        representations = [{
            "layer": layer, "component": "block_output", "low_rank_dimension": opts.reft_rank,
            "intervention": pyreft.LoreftIntervention(embed_dim=hidden, low_rank_dimension=opts.reft_rank, dtype=iv_dtype),
        } for layer in chosen]
        reft_model = pyreft.get_reft_model(base, pyreft.ReftConfig(representations=representations))
        for iv in reft_model.interventions.values():
            iv.to(device)
        batches = workload.reference(device, positions=opts.reft_positions, num_interventions=len(chosen))
        return PyreftSide(kind, reft_model, batches, lr=opts.reft_lr, autocast=gpu_autocast)
    raise ValueError(f"unknown side kind {kind!r}")


def _interventions(side: Side) -> list[torch.nn.Module] | None:
    model = getattr(side, "model", None)
    if isinstance(side, PyreftSide):
        return list(model.interventions.values())
    if model is not None and hasattr(model, "interventions"):  # ReftAnswerModel
        return list(model.interventions)
    return None


def copy_initial_weights(source: Side, target: Side) -> None:
    """Give ``target`` exactly the adapter weights of ``source`` (same init, for a fair loss check).

    ReFT: intervention states (orthogonal parametrisation included) are copied one by one, cast
    to the target's dtype. LoRA: every ``lora_`` tensor of the peft model.
    """
    with torch.no_grad():
        ours, theirs = _interventions(source), _interventions(target)
        if ours is not None and theirs is not None:
            if len(ours) != len(theirs):
                raise RuntimeError(f"{len(ours)} vs {len(theirs)} interventions")
            for a, b in zip(ours, theirs):
                dtype = next(b.parameters()).dtype
                state = {k: v.to(dtype) for k, v in torch.nn.Module.state_dict(a).items()}
                torch.nn.Module.load_state_dict(b, state)
            return
        lora = {k: v for k, v in source.model.module.state_dict().items() if "lora_" in k}
        destination = target.trainer.model if isinstance(target, TrainerSide) else target.model.module
        missing = set(lora) - set(destination.state_dict())
        if not lora or missing:
            raise RuntimeError(f"LoRA weights do not line up between {source.name} and {target.name}: {sorted(missing)[:3]}")
        destination.load_state_dict(lora, strict=False)
