"""btfast: fast, exact inference for Hugging Face BridgeTower models.

    fast = btfast.optimize(model)          # any of the four BridgeTower heads
    out = fast(**processor(images, texts, return_tensors="pt", padding=True))

Names are imported on first use, so `import btfast.preprocess` in a decode worker does not pay for
torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "BtfastError": "btfast.errors",
    "InputError": "btfast.errors",
    "UnsupportedModelError": "btfast.errors",
    "OptimizedBridgeTower": "btfast.optimize",
    "optimize": "btfast.optimize",
    "Buckets": "btfast.runtime",
    "FusionOutput": "btfast.states",
    "ImageStates": "btfast.states",
    "TextStates": "btfast.states",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'btfast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
