"""What the app does once, before it serves anyone.

transformers resolves its classes lazily (``from transformers import AutoConfig`` imports the
submodule on first use), and that is not thread-safe: a warm-up thread and a request importing
it at the same time fail with "cannot import name 'AutoConfig' from 'transformers'". So the
modules that handlers and the warm-up import on demand are imported here, in the start-up path,
before any thread or request can race for them. The Ask tab's and Compare's engines (pyreft,
scipy) come too: a first Ask must not race a first estimate either.
"""
from __future__ import annotations

import importlib
import logging
import time

logger = logging.getLogger(__name__)

ENGINE_MODULES = (
    "torch",
    "transformers",
    "peft",
    "transformers.models.llama.modeling_llama",  # the embedded model's architecture
    "heft_core.models",
    "heft_core.data",
    "heft_core.artifacts",
    "heft_core.inference",
    "heft_core.stats",
)
# transformers attributes that are only imported when first read.
LAZY_TRANSFORMERS_NAMES = ("AutoConfig", "AutoModelForCausalLM", "AutoTokenizer", "PreTrainedTokenizerFast")


def import_engine_modules() -> None:
    """Import the engine's heavy modules in this thread (call before starting threads or serving)."""
    started = time.monotonic()
    for name in ENGINE_MODULES:
        importlib.import_module(name)
    transformers = importlib.import_module("transformers")
    for name in LAZY_TRANSFORMERS_NAMES:
        getattr(transformers, name)
    logger.info("engine modules imported in %.1f s", time.monotonic() - started)
