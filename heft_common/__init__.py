"""heft_common: the vocabulary, errors and data home shared by every layer of HEFT Studio.

Imports only the standard library, so ``storage`` (no torch), ``heft_core`` (no SQL, no
Gradio) and ``app`` can all depend on it without depending on each other.
"""
