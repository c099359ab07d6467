"""heft_core: LoRA, ReFT and HEFT (LoRA then ReFT) fine-tuning on BoolQ-style yes/no data.

Imports no Gradio and no SQL. Heavy modules (torch, transformers) load only when the
submodules that need them are imported, so ``heft_core.config`` stays cheap to import.
"""
__version__ = "0.1.0"
