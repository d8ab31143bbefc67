"""``GrayEfficientNet``: a timm model that takes raw 1-channel pixels, with a swappable gray stem."""

import copy
import difflib
from collections.abc import Sequence
from typing import Any

import timm
import torch
from timm.models.efficientnet import EfficientNet
from torch import Tensor, nn

from . import metadata
from .adapters import ADAPTERS, FoldStem, StemAdapter, create_adapter, list_adapters
from .errors import InputError, WeightsError
from .intensity import parse_intensity
from .tasks import check_task
from .weights import (
    classifier_keys,
    first_conv_name,
    fit_state_dict,
    pretrained_weights_file,
    read_weights_file,
    timm_names,
)

__all__ = ["GrayEfficientNet", "min_input_size"]


def _check_model_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; timm.list_models('*efficientnet*') lists them"
        raise InputError(f"unknown timm model {name!r}{hint}")


def _total_stride(model: nn.Module) -> int:
    info = getattr(model, "feature_info", None)
    return int(info[-1]["reduction"]) if info else 32


def min_input_size(model_name: str) -> int:
    """The smallest H and W ``model_name`` accepts (its total stride), found without allocating weights."""
    _check_model_name(model_name)
    with torch.device("meta"):
        return _total_stride(timm.create_model(model_name, pretrained=False))


class GrayEfficientNet(nn.Module):
    """An ImageNet EfficientNet (or other timm CNN) for 1-channel images, normalisation inside.

    The model takes raw pixels: uint8 in [0, 255] (converted inside, so a loader can send 1 byte per
    pixel) or float in [0, 1]. The first conv of the timm model is replaced by a stem adapter from
    ``gray_effnet.adapters``; everything after it is the stock timm network.

    Args:
        model_name: any timm model whose first layer is a Conv2d; EfficientNet families are tested.
        adapter: a name from ``list_adapters()``.
        num_classes: outputs of the classifier; anything but the pretrained 1000 resets it, as in timm.
        pretrained: load ImageNet weights (the bundled package for ``tf_efficientnet_lite0/1/2`` when
            installed, otherwise timm's hub).
        weights: a local ``.safetensors`` / ``.pth`` file: a 3-channel (or ``in_chans=1``) timm state
            dict, or a checkpoint saved by this project. Overrides ``pretrained``.
        mean: per-channel means on the [0, 1] scale; default: the model's ``pretrained_cfg``.
        std: per-channel standard deviations; default: the model's ``pretrained_cfg``.
        class_names: optional labels, saved with checkpoints: the classes, or the findings of a multi-label model.
        img_size: optional (H, W) the model is meant for, saved with checkpoints.
        intensity: the mapping of the data's pixel values to [0, 1] (``gray_effnet.intensity``), saved with
            checkpoints so that evaluation and prediction apply it again.
        adapter_kwargs: the adapter's options, e.g. ``{"windows": [[40, 80], [80, 200], [600, 2800]],
            "range": [-1024, 3071]}`` for ``window`` and ``wso``; a ``range`` must be the ``intensity``'s.
        head_init_std: a classifier that the weights do not provide (``num_classes`` differs) starts as
            N(0, head_init_std^2) with zero bias, so that the first logits are small. With timm's own init,
            pretrained Lite0 on the demo digits starts with logits of std 8.9 (cross-entropy 18.9).
            None keeps timm's init. Unused without weights.
        task: ``single`` (one class per image: softmax over the outputs) or ``multi`` (one yes/no per finding: a
            sigmoid per output), see ``gray_effnet.tasks``; saved with checkpoints.
        thresholds: a multi-label model's probability threshold per finding, at or above which ``predict`` calls
            it present (chosen on validation data by ``train.py``); saved with checkpoints.
        **timm_kwargs: passed to ``timm.create_model`` (``drop_rate``, ``drop_path_rate``, ...).

    Shape:
        - Input: (B, 1, H, W), uint8 or floating point, H and W at least the network's total stride.
        - Output: (B, num_classes).

    Example:
        >>> model = GrayEfficientNet("tf_efficientnet_lite0", adapter="broadcast", num_classes=9)
        >>> model(torch.zeros(2, 1, 84, 112, dtype=torch.uint8)).shape
        torch.Size([2, 9])
        >>> model.set_adapter("fold")  # same parameters, 1-channel stem
    """

    def __init__(
        self,
        model_name: str = "tf_efficientnet_lite0",
        adapter: str = "broadcast",
        num_classes: int = 1000,
        pretrained: bool = False,
        weights: str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        class_names: Sequence[str] | None = None,
        img_size: Sequence[int] | None = None,
        head_init_std: float | None = 0.01,
        intensity: str = "full",
        adapter_kwargs: dict[str, Any] | None = None,
        task: str = "single",
        thresholds: Sequence[float] | None = None,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        _check_model_name(model_name)
        if num_classes < 1:
            raise InputError(f"num_classes must be at least 1; got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise InputError(f"{len(class_names)} class names for num_classes={num_classes}")
        self.model_name = model_name
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None
        self.task = check_task(task)
        if task == "multi" and self.class_names and any("|" in c for c in self.class_names):
            raise InputError(f"finding names may not contain '|', which joins them in predictions.csv; got "
                             f"{[c for c in self.class_names if '|' in c]}")
        self.thresholds = thresholds
        self.img_size = tuple(int(s) for s in img_size) if img_size is not None else None
        self.timm_kwargs = dict(timm_kwargs)
        self.intensity = str(parse_intensity(intensity))  # canonical form, e.g. "range:-1024:3071"

        self.model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **timm_kwargs)
        self.stem_name = first_conv_name(self.model)
        cfg = self.model.pretrained_cfg
        self.mean = tuple(float(v) for v in (mean if mean is not None else cfg["mean"]))
        self.std = tuple(float(v) for v in (std if std is not None else cfg["std"]))
        # The total stride: a smaller image has no pixel left after the last stage.
        self.min_size = _total_stride(self.model)
        conv = self.model.get_submodule(self.stem_name)
        options = self._check_adapter_options(adapter_kwargs)
        source = weights if weights is not None else pretrained_weights_file(model_name, cfg) if pretrained else None
        state_dict = read_weights_file(source)[0] if source is not None else None
        # A file trained with a stem adapter of its own parameters (affine's map, wso's windows) loads into
        # that adapter first, then moves to the one asked for as set_adapter does: exact, or an error saying why.
        owner = self._stem_owner(conv, state_dict) if state_dict is not None else None
        if owner is not None and owner != adapter and not ADAPTERS[owner].foldable:
            raise WeightsError(f"{source} holds the learned intensity windows of a {owner!r} stem, which no "
                               f"{adapter!r} stem can carry; load it with adapter={owner!r} (--adapter {owner})")
        first = owner if owner is not None and owner != adapter else adapter
        self.model.set_submodule(self.stem_name, create_adapter(first, conv, self.mean, self.std,
                                                                **(options if first == adapter else {})))
        head_loaded = True
        if state_dict is not None:
            head_loaded = self.load_timm_state_dict(state_dict, source=str(source), pretrained=True)
        if first != adapter:
            self.set_adapter(adapter, adapter_kwargs)
        head = self.model.get_classifier()
        if not head_loaded and head_init_std is not None and isinstance(head, nn.Linear):
            nn.init.normal_(head.weight, std=head_init_std)
            nn.init.zeros_(head.bias)

    def _stem_owner(self, conv: nn.Module, state_dict: dict[str, Tensor]) -> str | None:
        """The registered adapter whose own parameters (beyond the conv's) ``state_dict`` holds, if any."""
        keys = set(timm_names({k.removeprefix("model."): v for k, v in state_dict.items()}, self.stem_name))
        for name in list_adapters():
            probe = create_adapter(name, copy.deepcopy(conv), self.mean, self.std)
            own = {f"{self.stem_name}.{k}" for k in probe.own_state_keys()}
            if own and own <= keys:
                return name
        return None

    def _check_adapter_options(self, adapter_kwargs: dict[str, Any] | None) -> dict[str, Any]:
        """Windows in physical units are only meaningful on data mapped with the same ``range``."""
        options = dict(adapter_kwargs or {})
        if options.get("range") is not None:
            mapping = parse_intensity(self.intensity)
            if mapping.kind != "range" or [mapping.low, mapping.high] != [float(v) for v in options["range"]]:
                raise InputError(
                    f"the adapter's windows are in physical units over range {list(options['range'])}, but the "
                    f"data's intensity mapping is {self.intensity!r}; map the data with the same "
                    "'range:LO:HI' (--intensity range LO HI)"
                )
        return options

    @property
    def thresholds(self) -> list[float] | None:
        """A multi-label model's threshold per finding (None: not chosen yet); set it to a list of K fractions."""
        return self._thresholds

    @thresholds.setter
    def thresholds(self, value: Sequence[float] | None) -> None:
        if value is not None:
            value = [float(v) for v in value]
            if self.task != "multi" or len(value) != self.num_classes or not all(0 <= v <= 1 for v in value):
                raise InputError(f"thresholds are for a multi-label model, one fraction in [0, 1] per finding "
                                 f"({self.num_classes}); got {value} for a {self.task}-label model")
        self._thresholds = value

    # -- the stem ------------------------------------------------------------------------------------
    @property
    def stem(self) -> StemAdapter:
        """The adapter module that replaced the stem conv."""
        return self.model.get_submodule(self.stem_name)

    @property
    def adapter(self) -> str:
        return self.stem.name

    def set_adapter(self, name: str, adapter_kwargs: dict[str, Any] | None = None) -> "GrayEfficientNet":
        """Swap the stem in place; the pretrained (or trained) weights stay.

        ``repeat``, ``broadcast`` and ``fold`` share the same 3-channel ``Parameter`` objects, so an
        optimizer built before the swap keeps working. Switching to or from ``sum`` makes new parameters
        (exactly equivalent when leaving ``sum``, timm's weight sum when entering it): rebuild the optimizer.
        ``adapter_kwargs`` are the new adapter's options (default: none, its defaults); ``wso`` makes new
        window parameters.
        Entering ``affine`` adds its map's parameters at the identity (exact); leaving a trained ``affine``
        folds its map into the 3-channel weight, exact where that is possible and an ``InputError`` saying
        why where it is not (``AffineStem.rgb_conv``).
        """
        old = self.stem
        options = self._check_adapter_options(adapter_kwargs)
        if name == old.name and options == old.options():
            return self
        new = create_adapter(name, old.rgb_conv(), self.mean, self.std, **options).to(old.mean.device)
        self.model.set_submodule(self.stem_name, new)
        return self

    # -- forward -------------------------------------------------------------------------------------
    def prepare_input(self, x: Tensor) -> Tensor:
        """Check a (B, 1, H, W) batch and scale it to float in [0, 1] in the stem's dtype."""
        if not isinstance(x, Tensor):
            raise InputError(f"expected a torch.Tensor of shape (B, 1, H, W); got {type(x).__name__}")
        if x.ndim != 4:
            hint = " (add the batch and channel dims: x[None, None])" if x.ndim == 2 else ""
            raise InputError(f"expected a 4-D (B, 1, H, W) gray batch; got a {x.ndim}-D tensor {tuple(x.shape)}{hint}")
        b, c, h, w = x.shape
        if c != 1:
            raise InputError(
                f"expected 1 channel, (B, 1, H, W); got {c} channels {tuple(x.shape)}. "
                "Convert colour images to gray first (gray_effnet.images.read_gray does)"
            )
        if b == 0:
            raise InputError(f"got an empty batch {tuple(x.shape)}; expected at least 1 image")
        if min(h, w) < self.min_size:
            raise InputError(
                f"image {h}x{w} is smaller than the network's total stride {self.min_size}; "
                f"expected H and W >= {self.min_size}"
            )
        dtype = self.stem.conv.weight.dtype
        if x.dtype == torch.uint8:
            return x.to(dtype).div_(255)
        if not x.is_floating_point():
            raise InputError(f"expected uint8 in [0, 255] or float in [0, 1]; got dtype {x.dtype}")
        return x.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        """Shape: (B, 1, H, W) -> (B, num_classes)."""
        stem = self.stem
        if isinstance(stem, FoldStem) and not torch.compiler.is_compiling():
            stem.feeds_batch_stats = self._stem_feeds_batch_stats()
        return self.model(self.prepare_input(x))

    def _stem_feeds_batch_stats(self) -> bool:
        """Whether the stem's output goes straight into a BatchNorm normalising with batch statistics now.

        True for timm's ``EfficientNet`` in training mode, whose ``forward_features`` runs ``bn1`` on the stem's
        output; False when that BatchNorm is frozen (``eval()`` while the rest trains) or for other models.
        """
        bn = getattr(self.model, "bn1", None) if isinstance(self.model, EfficientNet) else None
        return isinstance(bn, nn.modules.batchnorm._BatchNorm) and (bn.training or bn.running_mean is None)

    # -- timm-native state dicts ---------------------------------------------------------------------
    def timm_state_dict(self) -> dict[str, Tensor]:
        """The weights under timm's own names, loadable into ``timm.create_model(model_name, in_chans=...)``.

        ``in_chans`` is 1 for the ``sum`` adapter and 3 for the others. Parameters of the adapter itself
        (``affine``'s ``scale`` and ``shift``) keep their names, ``<stem>.scale``, which timm does not know:
        for a plain timm model, ``set_adapter("repeat")`` first, which folds the map into the weight.
        """
        return timm_names(self.model.state_dict(), self.stem_name)

    def load_timm_state_dict(self, state_dict: dict[str, Tensor], *, source: str = "the state dict",
                             pretrained: bool = False) -> bool:
        """Load weights under timm's names (or this model's own), converting the stem between 1 and 3 channels.

        Every key and shape is checked (``gray_effnet.weights.fit_state_dict``).

        Args:
            state_dict: a timm state dict (3-channel or ``in_chans=1``), ``timm_state_dict()``, ``state_dict()``
                or an efficientnet-pytorch one.
            source: names the weights in error messages.
            pretrained: the weights come from another task: a classifier of another shape is left out (the
                model keeps its fresh one) and the stem adapter's own parameters may be missing. Otherwise
                every tensor must be there.

        Returns:
            Whether the classifier was loaded.

        Raises:
            WeightsError: the weights do not fit, with examples of what is missing, unexpected or misshapen.
        """
        stem, conv_params = self.stem, set(self.stem.conv.state_dict())
        own = {f"{self.stem_name}.{k}" for k in stem.own_state_keys()}
        fitted, head_loaded = fit_state_dict(
            state_dict, self.timm_state_dict(), stem_key=f"{self.stem_name}.weight", std=self.std,
            head_keys=classifier_keys(self.model) if pretrained else (), optional_keys=own if pretrained else (),
            source=source, target_name=self.model_name,
        )
        prefix = f"{self.stem_name}."
        inner = {(f"{prefix}conv.{k[len(prefix):]}" if k.startswith(prefix) and k[len(prefix):] in conv_params
                  else k): v for k, v in fitted.items()}
        self.model.load_state_dict(inner, strict=False)  # fit_state_dict checked every key and shape
        return head_loaded

    def describe(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild this model (``gray_effnet.load_model``): the written fields of
        ``gray_effnet.metadata.CHECKPOINT_FIELDS``, ``format_version`` included."""
        return metadata.describe(self)

    def extra_repr(self) -> str:
        return f"model_name={self.model_name!r}, adapter={self.adapter!r}, num_classes={self.num_classes}"

