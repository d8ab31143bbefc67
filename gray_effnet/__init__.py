"""gray_effnet: ImageNet EfficientNets for grayscale images, with explicit, swappable gray stems.

The names below are imported on first use (PEP 562), so that ``python -m gray_effnet --help`` and
``from gray_effnet.errors import ...`` answer without importing torch and timm first: the one place, with
``__main__``, where this package imports late, for the command line to start fast.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "ADAPTERS": "adapters",
    "StemAdapter": "adapters",
    "create_adapter": "adapters",
    "list_adapters": "adapters",
    "register_adapter": "adapters",
    "DataError": "errors",
    "GrayEffnetError": "errors",
    "InputError": "errors",
    "NonFiniteLossError": "errors",
    "WeightsError": "errors",
    "GrayEfficientNet": "model",
    "load_model": "checkpoint",
    "save_weights": "checkpoint",
}

__all__ = [
    "ADAPTERS",
    "DataError",
    "GrayEfficientNet",
    "GrayEffnetError",
    "InputError",
    "NonFiniteLossError",
    "StemAdapter",
    "WeightsError",
    "create_adapter",
    "list_adapters",
    "load_model",
    "register_adapter",
    "save_weights",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # the next lookup is a plain attribute
        return value
    raise AttributeError(f"module 'gray_effnet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
