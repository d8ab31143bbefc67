"""Grayscale stem adapters: how a 1-channel image meets a stem conv pretrained on 3 channels.

An ImageNet stem computes ``y = conv(n, w)`` on the normalised image ``n_c = (x_c - mu_c) / sigma_c``
with a weight ``w`` of shape (O, 3, k, k). For a gray image every colour channel is the same ``x``,
and the adapters below are four ways of feeding it:

* ``repeat``: expand ``x`` to 3 channels (a view), normalise per channel, run the stock conv.
* ``broadcast``: Keras' mechanism. ``(x - mean) / std`` with (1, 3, 1, 1) statistics broadcasts
  (B, 1, H, W) to (B, 3, H, W) by itself, then the stock conv runs. Bitwise equal to ``repeat``.
* ``sum``: timm's ``in_chans=1``. A 1-channel conv whose weight is ``sum_c w_c``
  (``timm.models.adapt_input_conv``), fed ``(x - mean(mu)) / mean(sigma)``. Equal to ``repeat`` only
  when the statistics are the same for every channel.
* ``fold``: ours. ``conv(n, w) = conv(x, sum_c w_c / sigma_c) - conv(1, sum_c w_c mu_c / sigma_c)``,
  where ``1`` is an image of ones padded exactly as ``x`` is, so even the zero-padded borders match.
  The 3-channel ``w`` stays the trainable parameter, so training ``fold`` is training ``repeat``.
* ``affine``: ``repeat`` with a learnable per-channel map ``a_c * x + b_c`` before the normalisation,
  starting at ``a_c = 1, b_c = 0`` (exactly ``repeat``). The map is affine, so it folds like ``fold``:
  ``conv(x, sum_c w_c a_c / sigma_c) - conv(1, sum_c w_c (mu_c - b_c) / sigma_c)``.

``fold_weights`` is that algebra, written once: ``FoldStem``, ``AffineStem`` and the export's
``FrozenFoldStem`` all get their kernels from it.

Each adapter is a module that replaces the model's first conv and owns that conv's parameters. A new
adapter needs only a subclass of ``StemAdapter`` and ``@register_adapter("name")``.
"""

import copy
import math
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from timm.layers import Conv2dSame
from timm.layers.conv2d_same import conv2d_same
from timm.models import adapt_input_conv
from torch import Tensor, nn

from .errors import InputError
from .intensity import parse_intensity, parse_intensity_args, parse_windows

__all__ = [
    "ADAPTERS",
    "AffineStem",
    "BorderTaps",
    "FoldStem",
    "FoldTerms",
    "FoldedWeights",
    "StemAdapter",
    "conv_forward",
    "conv_with_weight",
    "WindowStem",
    "WsoStem",
    "adapter_options",
    "create_adapter",
    "fold_weights",
    "get_adapter_class",
    "list_adapters",
    "register_adapter",
]

ADAPTERS: dict[str, type["StemAdapter"]] = {}


def register_adapter(name: str):
    """Class decorator that adds a ``StemAdapter`` subclass to ``ADAPTERS`` under ``name``.

    Example:
        >>> @register_adapter("mine")
        ... class MyStem(StemAdapter):
        ...     def normalize(self, x):
        ...         return (x - self.mean) / self.std
    """

    def wrap(cls: type["StemAdapter"]) -> type["StemAdapter"]:
        if name in ADAPTERS:
            raise InputError(f"adapter {name!r} is already registered (by {ADAPTERS[name].__qualname__})")
        cls.name = name
        ADAPTERS[name] = cls
        return cls

    return wrap


def list_adapters() -> list[str]:
    """Names of the registered adapters, in registration order."""
    return list(ADAPTERS)


def get_adapter_class(name: str) -> type["StemAdapter"]:
    """Look up an adapter class; an unknown name raises ``ValueError`` that lists the valid ones."""
    try:
        return ADAPTERS[name]
    except KeyError:
        raise InputError(f"unknown adapter {name!r}; choose one of: {', '.join(list_adapters())}") from None


def adapter_options(name: str, intensity: Sequence[str] | None, windows: Sequence[str] | None) -> tuple[str, dict]:
    """The intensity mapping and adapter ``name``'s options from the command line's words (``--intensity``,
    ``--windows``), checked before any data is read: windows are in physical units, so they need a range.

    Returns:
        The mapping's text and the adapter's options (``create_adapter``'s ``**options``).

    Raises:
        InputError: windows for an adapter that takes none, or a windowed adapter without a range and 3 windows.
    """
    mapping = parse_intensity_args(intensity) or parse_intensity("full")
    windowed = "windows" in get_adapter_class(name).option_names
    if windows and not windowed:
        raise InputError(f"--windows is for --adapter window or wso; this run uses {name!r}")
    if not windowed:
        return str(mapping), {}
    if mapping.kind != "range" or not windows:
        raise InputError(
            f"--adapter {name} needs windows in physical units and the range they are read in, e.g. for CT: "
            "--intensity range -1024 3071 --windows 40:80 80:200 600:2800"
            + (f" (the intensity mapping is {str(mapping)!r})" if mapping.kind != "range" else ""))
    parsed = parse_windows(windows)
    if len(parsed) != 3:  # before the data scan, which can take a while on a large DICOM folder
        raise InputError(f"--adapter {name} needs 3 windows, one per stem channel; got {len(parsed)}")
    return str(mapping), {"windows": parsed, "range": [mapping.low, mapping.high]}


def create_adapter(
    name: str, conv: nn.Conv2d, mean: Sequence[float], std: Sequence[float], **options: Any
) -> "StemAdapter":
    """Wrap a pretrained 3-channel stem conv in the adapter called ``name``.

    Args:
        name: a name from ``list_adapters()``.
        conv: the model's first conv, with 3 input channels. ``repeat``, ``broadcast`` and ``fold`` keep
            this very module (and so its ``Parameter`` objects); ``sum`` makes a 1-channel copy.
        mean: the 3 per-channel means the weights were trained with, on the [0, 1] scale.
        std: the 3 per-channel standard deviations.
        **options: the adapter's own options (``option_names``), JSON-plain: ``windows`` and ``range`` for
            ``window`` and ``wso``. Each adapter checks its own and raises ``InputError``.
    """
    cls = get_adapter_class(name)
    unknown = sorted(set(options) - set(cls.option_names))
    if unknown:
        takes = f"takes {', '.join(cls.option_names)}" if cls.option_names else "takes no options"
        raise InputError(f"adapter {name!r} {takes}; got {', '.join(unknown)}")
    return cls.from_rgb_conv(conv, mean, std, **options)


def conv_forward(conv: nn.Conv2d, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Run ``conv``'s own convolution, padding rule included, with another weight and bias.

    timm's ``tf_`` models use ``Conv2dSame``, whose TensorFlow 'same' padding depends on the input size;
    other models use ``nn.Conv2d`` with fixed padding. Both rules must be kept for ``fold`` to be exact.
    """
    if isinstance(conv, Conv2dSame):
        return conv2d_same(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    if type(conv) is nn.Conv2d:
        return conv._conv_forward(x, weight, bias)
    # Any other Conv2d subclass: let its own forward run with the substituted tensors.
    params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
    return torch.func.functional_call(conv, params, (x,))


def _check_stem(conv: nn.Module, in_chans: int) -> None:
    if not isinstance(conv, nn.Conv2d):
        raise InputError(f"the first layer must be an nn.Conv2d to adapt it; got {type(conv).__name__}")
    if conv.in_channels != in_chans or conv.groups != 1:
        raise InputError(
            f"expected a stem conv with {in_chans} input channel(s) and groups=1; "
            f"got in_channels={conv.in_channels}, groups={conv.groups}"
        )


def _stats(values: Sequence[float], what: str) -> Tensor:
    t = torch.as_tensor(values, dtype=torch.float32).flatten()
    if t.numel() != 3:
        raise InputError(f"{what} must have 3 values (one per RGB channel); got {tuple(t.tolist())}")
    return t.view(1, 3, 1, 1)


def conv_with_weight(conv: nn.Conv2d, weight: Tensor) -> nn.Conv2d:
    """A copy of ``conv`` (same class, stride, padding, device, dtype) that owns ``weight``."""
    new = copy.deepcopy(conv)
    new.weight = nn.Parameter(weight.to(conv.weight), requires_grad=conv.weight.requires_grad)
    new.in_channels = weight.shape[1]
    return new


class StemAdapter(nn.Module):
    """Base class: ``forward(x) = project(normalize(x))`` for ``x`` of shape (B, 1, H, W) in [0, 1].

    Subclasses set ``name`` (through ``register_adapter``), ``in_chans`` (the input channels of the conv
    they train) and the two notes that ``gray_effnet.explain`` prints, and override ``normalize`` and,
    where needed, ``project``, ``from_rgb_conv`` and ``rgb_conv``.

    Attributes:
        conv: the stem conv whose parameters this adapter trains.
        mean: (1, 3, 1, 1) per-channel means of the pretrained weights (not saved in the state dict).
        std: (1, 3, 1, 1) per-channel standard deviations.
    """

    name: ClassVar[str] = ""
    in_chans: ClassVar[int] = 3
    normalize_note: ClassVar[str] = ""
    project_note: ClassVar[str] = ""
    # An exact function of ``repeat``'s 3-channel stem on gray input, so ``fold`` (and the export) can replace it.
    foldable: ClassVar[bool] = True
    option_names: ClassVar[tuple[str, ...]] = ()  # keyword options of ``from_rgb_conv`` (``create_adapter``)

    def __init__(self, conv: nn.Conv2d, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        _check_stem(conv, self.in_chans)
        self.conv = conv
        device = conv.weight.device
        self.register_buffer("mean", _stats(mean, "mean").to(device), persistent=False)
        self.register_buffer("std", _stats(std, "std").to(device), persistent=False)

    @classmethod
    def from_rgb_conv(cls, conv: nn.Conv2d, mean: Sequence[float], std: Sequence[float], **options: Any
                      ) -> "StemAdapter":
        """Build the adapter from a 3-channel stem conv; the default keeps ``conv`` itself."""
        return cls(conv, mean, std, **options)

    def options(self) -> dict[str, Any]:
        """The JSON-plain options that rebuild this adapter (saved as ``adapter_kwargs`` in checkpoints)."""
        return {}

    def own_state_keys(self) -> set[str]:
        """State-dict keys of the adapter's own tensors, beyond its conv's (``affine``'s ``scale``, ``shift``)."""
        return {k for k in self.state_dict() if not k.startswith("conv.")}

    def rgb_conv(self) -> nn.Conv2d:
        """A 3-channel conv that gives the same output as this adapter on gray input (``set_adapter``)."""
        return self.conv

    def folded_weights(self) -> "FoldedWeights":
        """This stem as ``conv(x, weight) - conv(ones, offset_weight)`` on the gray image (``fold_weights``).

        Exact for every adapter whose map from the gray image to the stem's input is affine: the default
        folds ``rgb_conv()``. The export builds its 1-channel stem from this.
        """
        return fold_weights(self.rgb_conv().weight, self.mean, self.std)

    def learned_note(self) -> str:
        """What the adapter itself learned, beyond the conv weights, for ``explain``; empty when nothing."""
        return ""

    def normalize(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def project(self, x: Tensor) -> Tensor:
        return self.conv(x)

    def forward(self, x: Tensor) -> Tensor:
        """Shape: (B, 1, H, W) -> (B, O, H', W'), the stem conv's output."""
        return self.project(self.normalize(x))

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


@register_adapter("repeat")
class RepeatStem(StemAdapter):
    """Expand the gray channel to 3 (a view, no copy), normalise per channel, run the stock conv."""

    normalize_note = "expand (a view) to 3 channels, then (x - mean_c) / std_c per channel"
    project_note = "the stock 3-channel stem conv"

    def normalize(self, x: Tensor) -> Tensor:
        x = x.expand(-1, 3, -1, -1)  # (B,1,H,W) -> (B,3,H,W): stride 0 on channels, no copy yet
        return (x - self.mean).div_(self.std)  # the subtraction writes the (B,3,H,W) result; divide in place


@register_adapter("broadcast")
class BroadcastStem(StemAdapter):
    """The Keras mechanism, made explicit: 3-channel statistics broadcast over a 1-channel image."""

    normalize_note = "(x - mean) / std, and mean has shape (1, 3, 1, 1), so the 1-channel x broadcasts to 3"
    project_note = "the stock 3-channel stem conv"

    def normalize(self, x: Tensor) -> Tensor:
        # (B,1,H,W) - (1,3,1,1) -> (B,3,H,W). Each element is (x - mean_c) / std_c from the same operands
        # as in `repeat`, so the two are bitwise equal. Keras' in-model Normalization layer does this.
        return (x - self.mean).div_(self.std)


@register_adapter("sum")
class SumStem(StemAdapter):
    """timm's ``in_chans=1`` route: a 1-channel conv with the RGB weights summed, averaged statistics.

    The trainable weight is the (O, 1, k, k) sum, as in ``timm.create_model(..., in_chans=1)``.
    """

    in_chans = 1
    normalize_note = "(x - mean(mean)) / mean(std): timm's loader averages 3-channel stats for 1 channel"
    project_note = "a 1-channel stem conv whose weight is the RGB weights summed (timm adapt_input_conv)"

    def __init__(self, conv: nn.Conv2d, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__(conv, mean, std)
        self.register_buffer("mean1", self.mean.mean().view(1, 1, 1, 1), persistent=False)
        self.register_buffer("std1", self.std.mean().view(1, 1, 1, 1), persistent=False)

    @classmethod
    def from_rgb_conv(cls, conv: nn.Conv2d, mean: Sequence[float], std: Sequence[float]) -> "SumStem":
        _check_stem(conv, 3)
        return cls(conv_with_weight(conv, adapt_input_conv(1, conv.weight.detach())), mean, std)

    def rgb_conv(self) -> nn.Conv2d:
        return conv_with_weight(self.conv, gray_stem_weight_to_rgb(self.conv.weight.detach(), self.std))

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean1).div_(self.std1)


class FoldedWeights(NamedTuple):
    """A stem folded onto the gray image: ``stem(x) = conv(x, weight) - conv(ones, offset_weight)``.

    Both are (O, 1, k, k); ``ones`` is an image of ones padded exactly as ``x`` is.
    """

    weight: Tensor
    offset_weight: Tensor


class BorderTaps(NamedTuple):
    """Where the stem's kernel reaches into the padding, for one input size; independent of the weights.

    Each output position's window covers ``k * k`` taps. In the interior every tap reads the image; in the
    border bands (rows at the top and bottom, columns at the left and right) some read the padding. The bands
    are rectangles, so the output is corrected through slices, with no gather or scatter.
    """

    bands: tuple[tuple[slice, slice], ...]  # (rows, cols) of each band of the (H', W') output
    missing: Tensor  # (k * k, P): 1 where a tap reads the padding, for the P positions of the bands in order


class FoldTerms(NamedTuple):
    """What ``FoldStem.project`` applies: ``conv(x, weight) + bias``, plus ``correction`` on the border bands.

    With ``border`` None (under ``torch.compile``), ``correction`` is the whole (1, O, H', W') offset map,
    subtracted everywhere, and ``bias`` is the conv's own.
    """

    weight: Tensor  # (O, 1, k, k)
    bias: Tensor | None  # (O,): the conv's bias minus the offset of a window that sees no padding
    correction: Tensor  # (O, P): what that bias took away for taps that read the padding, added back
    border: BorderTaps | None


class _AddOnBands(torch.autograd.Function):
    """``out[:, :, band] += values`` for each band, in place, with the gradient of an addition.

    Autograd's own in-place slicing would copy the whole (B, O, H', W') gradient in the backward pass for each
    band (it cannot tell that the untouched positions pass through). Here the gradient of ``out`` is passed on
    as it is, and ``values`` gets the batch sum over its P positions: O(B * O * P) work.
    """

    @staticmethod
    def forward(ctx, out: Tensor, values: Tensor, bands: tuple[tuple[slice, slice], ...]) -> Tensor:
        ctx.bands, ctx.values_dtype = bands, values.dtype
        values = values.to(out.dtype)
        start = 0
        for rows, cols in bands:
            region = out[:, :, rows, cols]  # a view: (B, O, h, w)
            n = region.shape[-2] * region.shape[-1]
            region += values[:, start:start + n].view(1, -1, *region.shape[-2:])
            start += n
        ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        if not ctx.needs_input_grad[1]:
            return grad, None, None
        parts = [grad[:, :, rows, cols].sum(0).flatten(1) for rows, cols in ctx.bands]  # each (O, h * w)
        return grad, torch.cat(parts, 1).to(ctx.values_dtype), None


def fold_weights(
    weight: Tensor,
    mean: Tensor | Sequence[float],
    std: Tensor | Sequence[float],
    scale: Tensor | None = None,
    shift: Tensor | None = None,
) -> FoldedWeights:
    """Fold a per-channel affine map and the normalisation into 1-channel kernels: fold's algebra, written once.

    A 3-channel stem fed ``n_c = (scale_c * x + shift_c - mean_c) / std_c`` from one gray image ``x``
    computes ``conv(n, w) = conv(x, sum_c w_c scale_c / std_c) - conv(1, sum_c w_c (mean_c - shift_c) / std_c)``,
    by linearity, with ``1`` padded as ``x`` is. ``scale = 1, shift = 0`` is ``repeat`` (and ``fold``).
    Pure and differentiable: gradients reach ``weight``, ``scale`` and ``shift``.

    Args:
        weight: the (O, 3, k, k) stem weight; the result has its dtype.
        mean: the 3 per-channel means, on the [0, 1] scale.
        std: the 3 per-channel standard deviations.
        scale: 3 per-channel gains ``a_c``; None is 1.
        shift: 3 per-channel offsets ``b_c``; None is 0.

    Example:
        >>> w = torch.randn(32, 3, 3, 3)
        >>> folded = fold_weights(w, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        >>> folded.weight.shape, folded.offset_weight.shape
        (torch.Size([32, 1, 3, 3]), torch.Size([32, 1, 3, 3]))
    """

    def per_channel(t: Tensor | Sequence[float]) -> Tensor:  # (3,) or (1,3,1,1) -> (1,3,1,1), broadcasts on (O,3,k,k)
        return torch.as_tensor(t).to(weight).reshape(1, 3, 1, 1)

    mean, std = per_channel(mean), per_channel(std)
    gain = weight / std if scale is None else weight * (per_channel(scale) / std)
    offset = mean if shift is None else mean - per_channel(shift)
    return FoldedWeights(gain.sum(1, keepdim=True), (weight * (offset / std)).sum(1, keepdim=True))


@register_adapter("fold")
class FoldStem(StemAdapter):
    """An exact 1-channel equivalent of ``repeat``: normalisation folded into the stem weights.

    ``w' = sum_c w_c / std_c`` and ``b' = sum_c w_c mean_c / std_c`` (``fold_weights``) are derived from
    the 3-channel weight in every forward, so gradients reach the same parameters as under ``repeat``. The
    offset ``conv(ones, b')`` uses the stem's own padding: constant inside, different on the zero-padded
    borders. With no gradient to track it is cached per input size, device, dtype and weight version.
    Subclasses change what is folded by overriding ``folded_weights`` and ``fold_inputs``.
    """

    normalize_note = "none here: the normalisation is folded into the stem weights"
    project_note = "1-channel conv with sum_c w_c / std_c, minus conv(ones, sum_c w_c mean_c / std_c)"
    cache_size: ClassVar[int] = 8
    # Set by ``GrayEfficientNet.forward``: the stem's output goes straight into a BatchNorm that normalises with
    # the batch's own statistics (timm's EfficientNet ``bn1`` in training mode).
    feeds_batch_stats: bool = False

    def __init__(self, conv: nn.Conv2d, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__(conv, mean, std)
        self._offsets: dict[tuple, tuple[tuple, FoldTerms]] = {}
        self._taps: dict[tuple, BorderTaps] = {}

    def normalize(self, x: Tensor) -> Tensor:
        return x

    def folded_weights(self) -> FoldedWeights:
        """The (O, 1, k, k) weight applied to ``x`` and the (O, 1, k, k) kernel of the offset map."""
        return fold_weights(self.conv.weight, self.mean, self.std)

    def fold_inputs(self) -> tuple[Tensor, ...]:
        """The tensors ``folded_weights`` reads: the cache is valid while none of them changed."""
        return self.conv.weight, self.mean, self.std

    def offset(self, x: Tensor, offset_weight: Tensor) -> Tensor:
        """``conv(ones, offset_weight)`` for images of ``x``'s size; (1, O, H', W')."""
        ones = torch.ones((1, 1, *x.shape[-2:]), dtype=x.dtype, device=x.device)
        return conv_forward(self.conv, ones, offset_weight)

    def border_taps(self, size: tuple[int, int], device: torch.device | str = "cpu") -> BorderTaps | None:
        """The border bands of the output for this input size, and which taps read the padding there (cached).

        Found by running the stem's own convolution (its padding rule included) on an image of ones with one
        one-hot kernel per tap, so no padding arithmetic is repeated here. None when no tap reads padding.
        """
        key = (tuple(size), torch.device(device))
        if key not in self._taps:
            kh, kw = self.conv.weight.shape[-2:]
            one_hot = torch.eye(kh * kw).view(kh * kw, 1, kh, kw)
            missing = 1.0 - conv_forward(self.conv, torch.ones(1, 1, *size), one_hot)[0]  # (k*k, H', W')
            padded = missing.sum(0) > 0
            h, w = padded.shape
            rows, cols = (~padded).any(1).nonzero().flatten(), (~padded).any(0).nonzero().flatten()
            if not padded.any():
                taps = None
            elif not len(rows):  # no interior at all (an image hardly larger than the kernel): one band
                taps = (slice(0, h), slice(0, w)),
            else:
                top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
                taps = tuple(band for band, size_ in (
                    ((slice(0, top), slice(0, w)), top), ((slice(bottom, h), slice(0, w)), h - bottom),
                    ((slice(top, bottom), slice(0, left)), left), ((slice(top, bottom), slice(right, w)), w - right),
                ) if size_)
            if taps is not None:
                taps = BorderTaps(taps, torch.cat([missing[:, r, c].flatten(1) for r, c in taps], 1).to(device))
            if len(self._taps) >= self.cache_size:
                self._taps.pop(next(iter(self._taps)))
            self._taps[key] = taps
        return self._taps[key]

    def _terms(self, x: Tensor) -> FoldTerms:
        """The terms of ``project`` for images of ``x``'s size; see there."""
        weight, offset_weight = self.folded_weights()
        if self.conv.weight.is_contiguous(memory_format=torch.channels_last) and not self.conv.weight.is_contiguous():
            # The stem's memory format decides the conv's algorithm and its output's layout, which every later
            # layer then reads: a folded weight that fell back to NCHW would take the whole model with it.
            # clone, not contiguous(): with one input channel both layouts count as contiguous, and only the
            # strides that clone gives make the conv choose channels_last.
            weight = weight.clone(memory_format=torch.channels_last)
        if torch.compiler.is_compiling():  # one traced expression the compiler can fuse: subtract the whole map
            return FoldTerms(weight, self.conv.bias, self.offset(x, offset_weight), None)
        inner = offset_weight.sum((1, 2, 3))  # (O,): the offset where every tap reads the image
        if self.feeds_batch_stats:
            # A per-channel constant before a BatchNorm that uses batch statistics leaves its output unchanged,
            # so the constant's gradient is zero (exactly, in exact arithmetic). Detached, it spares the conv's
            # backward a reduction over the whole output gradient that would only sum rounding noise. The
            # running mean still sees it, so evaluation is exact.
            inner = inner.detach()
        bias = -inner if self.conv.bias is None else self.conv.bias - inner
        border = self.border_taps(tuple(x.shape[-2:]), x.device)
        if border is None:
            return FoldTerms(weight, bias, inner.new_zeros(len(inner), 0), None)
        # (O, k*k) @ (k*k, P) -> (O, P): the padded taps' share of ``inner``, which must not be subtracted there.
        correction = offset_weight.flatten(1) @ border.missing.to(offset_weight.dtype)
        return FoldTerms(weight, bias, correction, border)

    def _cached_terms(self, x: Tensor) -> FoldTerms:
        """``_terms``, from the cache when no gradient is tracked."""
        inputs = self.fold_inputs()
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in inputs)):
            return self._terms(x)  # training: they must stay in the graph; compiled: let the compiler fuse them
        autocast = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
        key = (tuple(x.shape[-2:]), x.device, x.dtype, autocast)
        # data_ptr and _version change whenever the weights or statistics are replaced or updated in place.
        state = tuple((t.data_ptr(), t._version) for t in inputs)
        hit = self._offsets.get(key)
        if hit is not None and hit[0] == state:
            return hit[1]
        terms = self._terms(x)
        if len(self._offsets) >= self.cache_size:
            self._offsets.pop(next(iter(self._offsets)))
        self._offsets[key] = (state, terms)
        return terms

    def project(self, x: Tensor) -> Tensor:
        """``conv(x, w') - offset``: the conv's bias carries the offset of a window that sees no padding.

        The conv adds the bias for free, so only the P border positions, where some taps read the padding,
        need a correction (``_AddAtBorder``), not a pass over the whole (B, O, H', W') output. In place is
        safe: the conv's backward does not need its output.
        """
        weight, bias, correction, border = self._cached_terms(x)
        out = conv_forward(self.conv, x, weight, bias)  # (B,1,H,W) -> (B,O,H',W')
        if border is not None:
            return _AddOnBands.apply(out, correction, border.bands)
        if correction.dim() == 4:
            return out - correction  # compiled: the whole (1,O,H',W') offset map, broadcast over the batch
        return out  # no window reaches into the padding (a 'valid' conv)

    def _apply(self, fn, recurse=True):
        self._offsets.clear()  # .to(), .half(), ... make new tensors; drop maps built for the old ones
        return super()._apply(fn, recurse)


@register_adapter("affine")
class AffineStem(FoldStem):
    """``repeat`` with a learnable per-channel map: ``n_c = (a_c * x + b_c - mean_c) / std_c``, then the stem.

    ``a`` (``scale``) and ``b`` (``shift``) are 3-vectors in the adapter's state dict, so checkpoints keep
    them; they start at 1 and 0, where the adapter is ``repeat``. The map is affine, so the stem runs
    folded like ``fold`` (``fold_weights`` with ``scale`` and ``shift``): exact, borders included, and
    gradients reach ``a``, ``b`` and the 3-channel weight alike. Being 1-D, ``a`` and ``b`` get no weight
    decay from timm's optimizer factory.

    Leaving ``affine`` for another adapter (``set_adapter``) puts the map into a 3-channel weight under
    the stock normalisation. That is exact whenever the channel means differ (two constraints per kernel
    tap, three channel weights); with equal means (Lite0: 0.5, 0.5, 0.5) it is exact only while
    ``b_c + (a_c - 1) mean_c`` leaves no offset, and otherwise raises ``InputError``.
    """

    normalize_note = "none here: a_c x + b_c and the normalisation are folded into the stem weights"
    project_note = "1-channel conv with sum_c w_c a_c / std_c, minus conv(ones, sum_c w_c (mean_c - b_c) / std_c)"
    # Largest offset, relative to the folded weight, that set_adapter lets go when it cannot be represented.
    rtol: ClassVar[float] = 1e-6

    def __init__(self, conv: nn.Conv2d, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__(conv, mean, std)
        like = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        self.scale = nn.Parameter(torch.ones(3, **like))
        self.shift = nn.Parameter(torch.zeros(3, **like))

    def folded_weights(self) -> FoldedWeights:
        return fold_weights(self.conv.weight, self.mean, self.std, self.scale, self.shift)

    def fold_inputs(self) -> tuple[Tensor, ...]:
        return *super().fold_inputs(), self.scale, self.shift

    def learned_note(self) -> str:
        pairs = ", ".join(f"{c} (a={a:.4f}, b={b:+.4f})"
                          for c, a, b in zip("RGB", self.scale.tolist(), self.shift.tolist()))
        return f"learned gray -> RGB map a_c x + b_c: {pairs}"

    @torch.no_grad()
    def rgb_conv(self) -> nn.Conv2d:
        """A 3-channel conv under the stock normalisation with this stem's function on gray input.

        With ``v_c = w'_c / std_c`` it must satisfy ``sum_c v_c = A`` and ``sum_c mean_c v_c = B``, where
        ``(A, B)`` are this stem's ``folded_weights``. ``v_c = w_c a_c / std_c`` meets the first; the smallest
        change that meets the second too moves along ``mean_c - mean(mean)``, which exists unless the means
        are equal. Computed in float64.

        Raises:
            InputError: the means are equal and the learned map leaves an offset a 3-channel stem cannot give.
        """
        if bool((self.scale == 1).all() and (self.shift == 0).all()):
            return self.conv  # still the identity map: hand over the very Parameter, as repeat and fold do
        w = self.conv.weight.double()
        mean, std = self.mean.double(), self.std.double()  # (1,3,1,1)
        target = fold_weights(w, mean, std, self.scale.double(), self.shift.double())
        v = w * self.scale.double().view(1, 3, 1, 1) / std  # (O,3,k,k): meets sum_c v_c = A already
        residual = target.offset_weight - (v * mean).sum(1, keepdim=True)  # (O,1,k,k)
        centred = mean - mean.mean()
        spread = centred.square().sum()
        scale = target.weight.abs().max().clamp_min(1e-12)
        if spread <= 1e-12:  # equal means: sum_c mean_c v_c = mean * A, so B must already be that
            if residual.abs().max() > self.rtol * scale:
                a, b = ([round(v, 4) for v in t.tolist()] for t in (self.scale, self.shift))
                raise InputError(
                    f"cannot leave the 'affine' stem without changing its function: the learned map a={a}, b={b} "
                    "shifts the image by a constant, and with equal channel means "
                    f"{tuple(self.mean.flatten().tolist())} no 3-channel weight under the stock normalisation gives "
                    "that offset (it differs on the zero-padded borders). Keep 'affine' (export folds it exactly), "
                    "or retrain with another adapter"
                )
            return conv_with_weight(self.conv, (v * std).to(self.conv.weight.dtype))
        v = v + residual * centred / spread  # sum_c centred_c = 0 keeps sum_c v_c
        return conv_with_weight(self.conv, (v * std).to(self.conv.weight.dtype))


# -- intensity windows: adapters that are not a function of `repeat` --------------------------------------
def _check_windows(windows: Any, value_range: Any, name: str) -> tuple[list[list[float]], list[float] | None]:
    """Validate the ``windows`` and ``range`` options; return them as plain lists of floats."""
    def numbers(v: Any, n: int, what: str) -> list[float]:
        try:
            out = [float(x) for x in v]
        except (TypeError, ValueError):
            out = []
        if len(out) != n or not all(math.isfinite(x) for x in out):
            raise InputError(f"adapter {name!r}: {what} must be {n} finite numbers; got {v!r}")
        return out

    rng = None
    if value_range is not None:
        rng = numbers(value_range, 2, "range (the physical values that 0 and 1 stand for)")
        if not rng[0] < rng[1]:
            raise InputError(f"adapter {name!r}: range must be [low, high] with low < high; got {value_range!r}")
    if windows is None:  # the whole input range in every channel
        lo, hi = rng or (0.0, 1.0)
        return [[(lo + hi) / 2, hi - lo]] * 3, rng
    if isinstance(windows, (str, bytes)) or not isinstance(windows, Sequence) or len(windows) != 3:
        raise InputError(f"adapter {name!r}: windows must be 3 [center, width] pairs, one per input channel of "
                         f"the stem; got {windows!r}")
    pairs = [numbers(w, 2, "each window ([center, width])") for w in windows]
    bad = [w for w in pairs if w[1] <= 0]
    if bad:
        raise InputError(f"adapter {name!r}: window widths must be positive; got {bad}")
    return pairs, rng


class _WindowedStem(StemAdapter):
    """Base of the window adapters: 3 intensity windows make 3 channels, then the stock normalisation and conv.

    Args:
        windows: 3 [center, width] pairs, in the units of ``range`` (physical units, e.g. HU); default:
            the whole input range in every channel.
        range: [low, high], the physical values that the input's 0 and 1 stand for (the ``range``
            intensity mapping of the data). None: the windows are on the input's [0, 1] scale.
    """

    foldable = False  # a window is not linear in x: no 1-channel conv equals it
    option_names = ("windows", "range")
    project_note = "the stock 3-channel stem conv"

    def __init__(self, conv: nn.Conv2d, mean: Sequence[float], std: Sequence[float],
                 windows: Sequence[Sequence[float]] | None = None, range: Sequence[float] | None = None) -> None:
        super().__init__(conv, mean, std)
        self._windows, self._range = _check_windows(windows, range, self.name)
        lo, span = (self._range[0], self._range[1] - self._range[0]) if self._range else (0.0, 1.0)
        # Physical units -> the [0, 1] scale the model sees.
        self._unit = [((c - lo) / span, w / span) for c, w in self._windows]

    def options(self) -> dict[str, Any]:
        out: dict[str, Any] = {"windows": [list(w) for w in self._windows]}
        if self._range is not None:
            out["range"] = list(self._range)
        return out

    def unit_windows(self) -> Tensor:
        """(3, 2): each channel's (center, width) on the input's [0, 1] scale."""
        return torch.tensor(self._unit, dtype=torch.float64)

    def window_table(self) -> list[tuple[float, float]]:
        """Each channel's (center, width) in the units of ``range`` (HU for CT); the learned ones for ``wso``."""
        lo, span = (self._range[0], self._range[1] - self._range[0]) if self._range else (0.0, 1.0)
        return [(lo + c * span, w * span) for c, w in self.unit_windows().tolist()]

    def units(self) -> str:
        """What the windows' numbers are in (a method, not a property: ``torch.jit.script`` compiles those)."""
        if self._range is None:
            return "the input's [0, 1] scale"
        return f"physical units, input 0..1 = {self._range[0]:g}..{self._range[1]:g}"

    def windowed(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def folded_weights(self) -> "FoldedWeights":
        raise InputError(f"adapter {self.name!r} maps the gray image through intensity windows, which no "
                         "1-channel conv equals: it cannot be folded (export keeps it as it is)")

    def normalize(self, x: Tensor) -> Tensor:
        return (self.windowed(x) - self.mean) / self.std  # (B,3,H,W): each window is a "colour" channel

    def extra_repr(self) -> str:
        return f"name={self.name!r}, windows={[tuple(round(v, 4) for v in w) for w in self.window_table()]}"


@register_adapter("window")
class WindowStem(_WindowedStem):
    """3 fixed intensity windows, one per channel, as radiologists read CT: ``clip((x - c + w/2) / w, 0, 1)``.

    The windows are options, not parameters: buffers rebuilt from ``options()``, so the state dict is the
    stock network's. The clip has no gradient outside the window, which is one reason they stay fixed here
    (``wso`` learns them).
    """

    normalize_note = "3 fixed windows -> 3 channels, clip((x - c + w/2) / w, 0, 1), then (x - mean_c) / std_c"

    def __init__(self, conv: nn.Conv2d, mean: Sequence[float], std: Sequence[float],
                 windows: Sequence[Sequence[float]] | None = None, range: Sequence[float] | None = None) -> None:
        super().__init__(conv, mean, std, windows=windows, range=range)
        unit = self.unit_windows().float().to(conv.weight.device)
        self.register_buffer("center", unit[:, 0].view(1, 3, 1, 1), persistent=False)
        self.register_buffer("width", unit[:, 1].view(1, 3, 1, 1), persistent=False)

    def windowed(self, x: Tensor) -> Tensor:
        # (B,1,H,W) -> (B,3,H,W): (1,3,1,1) windows broadcast over the gray channel
        return ((x - self.center) / self.width + 0.5).clamp(0.0, 1.0)


class WindowParameters(nn.Module):
    """The learnable windows of ``wso``: one center and log-width per channel, on the input's [0, 1] scale.

    A child module, so that their state-dict names (``<stem>.windows.center``) never collide with the stem
    conv's, and 1-D, so that timm's optimizer factory leaves them out of weight decay.
    """

    def __init__(self, unit_windows: Tensor) -> None:
        super().__init__()
        self.center = nn.Parameter(unit_windows[:, 0].clone())
        self.log_width = nn.Parameter(unit_windows[:, 1].log())


@register_adapter("wso")
class WsoStem(_WindowedStem):
    """Window setting optimisation (Lee et al. 2018, arXiv:1812.00572): learnable windows, an upper-bounded sigmoid.

    Each channel is ``U * sigmoid(k * (x - c) / w)``: the paper's 1x1 conv (weight ``k / w``, bias ``-k c / w``)
    and its sigmoid activation bounded by ``U``. As in the paper, ``k = 2 ln(U / eps - 1)``, so the window's
    edges ``c -+ w/2`` map to ``eps`` and ``U - eps``; the paper uses ``U = 255, eps = 1`` on 8-bit display
    values, and here the input scale is [0, 1], so ``U = 1, eps = 1/255`` (the same shape). ``c`` and ``w`` are
    initialised from the given windows and learned. They are parametrised as center and log-width on the
    [0, 1] scale, rather than the paper's weight and bias: Adam's steps are then in intensity units, and a
    width can never reach zero or turn negative.

    Far from its window the sigmoid is flat and the gradient to (c, w) vanishes (the hard clip of ``window``
    has none at all outside it); the sigmoid keeps a small gradient everywhere, and starting from the given
    windows keeps them on the data, but a window that drifts off every pixel will not come back.
    """

    normalize_note = "3 learned windows -> 3 channels, U * sigmoid(k (x - c) / w), then (x - mean_c) / std_c"

    def __init__(self, conv: nn.Conv2d, mean: Sequence[float], std: Sequence[float],
                 windows: Sequence[Sequence[float]] | None = None, range: Sequence[float] | None = None) -> None:
        super().__init__(conv, mean, std, windows=windows, range=range)
        # Instance attributes, not ClassVars: torch.jit.script sees only these in forward.
        self.upper = 1.0  # U
        self.eps = 1.0 / 255.0
        self.k = 2.0 * math.log(self.upper / self.eps - 1.0)
        # Initialised from the windows option, which ``options()`` keeps; the learned ones are in the state dict.
        self.windows = WindowParameters(super().unit_windows().to(conv.weight))

    def unit_windows(self) -> Tensor:
        w = self.windows
        return torch.stack([w.center.detach(), w.log_width.detach().exp()], 1).double().cpu()

    def windowed(self, x: Tensor) -> Tensor:
        w = self.windows
        center, width = w.center.view(1, 3, 1, 1), w.log_width.exp().view(1, 3, 1, 1)
        return self.upper * torch.sigmoid((x - center) * (self.k / width))  # (B,1,H,W) -> (B,3,H,W)


def gray_stem_weight_to_rgb(weight: Tensor, std: Sequence[float]) -> Tensor:
    """Spread a 1-channel stem weight (O, 1, k, k) over RGB so that it is exact on gray input.

    ``w_c = w * std_c / (3 * mean(std))``: then ``sum_c w_c (x - mu_c) / std_c = w (x - mean(mu)) / mean(std)``,
    which is what ``sum`` computes. ``set_adapter`` uses it to leave ``sum``, and weight loading uses it to
    put 1-channel (``in_chans=1``) timm weights into a 3-channel stem.
    """
    s = _stats(std, "std").to(weight)
    return weight * s / (3 * s.mean())

