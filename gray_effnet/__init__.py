"""gray_effnet: ImageNet EfficientNets for grayscale images, with explicit, swappable gray stems."""

from .adapters import ADAPTERS, StemAdapter, create_adapter, list_adapters, register_adapter
from .checkpoint import load_model, save_weights
from .errors import DataError, GrayEffnetError, InputError, NonFiniteLossError, WeightsError
from .model import GrayEfficientNet

__version__ = "0.1.0"

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
