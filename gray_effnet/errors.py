"""Exceptions that gray_effnet raises on purpose.

Every error a user can cause (a wrong input, a missing weights file, a messy folder) derives from
``GrayEffnetError``, so a command-line entry point can print its message without a traceback while real
bugs still show theirs. Each also derives from the builtin a caller would expect (``ValueError`` for bad
arguments and data, ``RuntimeError`` for weights that cannot be had).
"""


class GrayEffnetError(Exception):
    """Base class of the errors whose message is the whole story."""


class InputError(GrayEffnetError, ValueError):
    """A model name, adapter name, tensor or argument that cannot be used."""


class DataError(GrayEffnetError, ValueError):
    """An image folder that cannot be trained or evaluated on."""


class WeightsError(GrayEffnetError, RuntimeError):
    """Pretrained weights or a checkpoint that cannot be found, trusted or matched to the model."""


class NonFiniteLossError(GrayEffnetError, FloatingPointError):
    """Training produced a NaN or infinite loss."""
