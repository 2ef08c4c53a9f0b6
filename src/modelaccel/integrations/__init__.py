"""Integrations with other libraries, imported on first use so that `import modelaccel`
never imports them: `modelaccel.integrations.transformers` registers
attn_implementation="modelaccel" with Hugging Face Transformers."""

import importlib


def __getattr__(name):
    if name == "transformers":
        return importlib.import_module(f"{__name__}.transformers")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
