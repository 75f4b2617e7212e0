"""btfast: fast, exact inference for Hugging Face BridgeTower models.

fast = btfast.optimize(model)          # any of the four BridgeTower heads
out = fast(**processor(images, texts, return_tensors="pt", padding=True))
"""

from btfast.errors import BtfastError, InputError, UnsupportedModelError
from btfast.optimize import OptimizedBridgeTower, optimize
from btfast.runtime import Buckets
from btfast.states import FusionOutput, ImageStates, TextStates

__version__ = "0.1.0"

__all__ = [
    "BtfastError",
    "Buckets",
    "FusionOutput",
    "ImageStates",
    "InputError",
    "OptimizedBridgeTower",
    "TextStates",
    "UnsupportedModelError",
    "optimize",
]
