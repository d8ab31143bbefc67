"""``GrayEfficientNet``: a timm model that takes raw 1-channel pixels, with a swappable gray stem."""

import difflib
from collections.abc import Sequence
from typing import Any

import timm
import torch
from timm.models import adapt_input_conv
from torch import Tensor, nn

from .adapters import StemAdapter, create_adapter, gray_stem_weight_to_rgb, list_adapters
from .errors import InputError, WeightsError

__all__ = ["GrayEfficientNet", "first_conv_name", "timm_names"]


def first_conv_name(model: nn.Module) -> str:
    """The stem conv's module path, as timm records it in ``pretrained_cfg["first_conv"]``."""
    name = getattr(model, "pretrained_cfg", {}).get("first_conv")
    if isinstance(name, (list, tuple)):
        if len(name) != 1:
            raise InputError(f"the model has {len(name)} input convs ({name}); only one can be adapted")
        name = name[0]
    if not name:
        raise InputError(f"{type(model).__name__} does not name its first conv in pretrained_cfg['first_conv']")
    return name


def timm_names(state_dict: dict[str, Tensor], stem_name: str) -> dict[str, Tensor]:
    """Rename the adapter's ``<stem>.conv.*`` entries of a timm model's state dict to timm's ``<stem>.*``."""
    inner = f"{stem_name}.conv."
    return {(f"{stem_name}.{k[len(inner):]}" if k.startswith(inner) else k): v for k, v in state_dict.items()}


def _check_model_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; timm.list_models('*efficientnet*') lists them"
        raise InputError(f"unknown timm model {name!r}{hint}")


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
        class_names: optional labels, saved with checkpoints.
        img_size: optional (H, W) the model is meant for, saved with checkpoints.
        head_init_std: a classifier that the weights do not provide (``num_classes`` differs) starts as
            N(0, head_init_std^2) with zero bias, so that the first logits are small. With timm's own init,
            pretrained Lite0 on the demo digits starts with logits of std 8.9 (cross-entropy 18.9).
            None keeps timm's init. Unused without weights.
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
        adapter: str = "fold",
        num_classes: int = 1000,
        pretrained: bool = False,
        weights: str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        class_names: Sequence[str] | None = None,
        img_size: Sequence[int] | None = None,
        head_init_std: float | None = 0.01,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        from .weights import load_pretrained, load_weights_file  # weights.py builds models: import late

        _check_model_name(model_name)
        if num_classes < 1:
            raise InputError(f"num_classes must be at least 1; got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise InputError(f"{len(class_names)} class names for num_classes={num_classes}")
        self.model_name = model_name
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None
        self.img_size = tuple(int(s) for s in img_size) if img_size is not None else None
        self.timm_kwargs = dict(timm_kwargs)

        self.model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **timm_kwargs)
        self.stem_name = first_conv_name(self.model)
        cfg = self.model.pretrained_cfg
        self.mean = tuple(float(v) for v in (mean if mean is not None else cfg["mean"]))
        self.std = tuple(float(v) for v in (std if std is not None else cfg["std"]))
        # The total stride: a smaller image has no pixel left after the last stage.
        info = getattr(self.model, "feature_info", None)
        self.min_size = int(info[-1]["reduction"]) if info else 32

        head_loaded = True
        adapter_state: dict[str, Tensor] = {}  # the file's stem adapter parameters (affine's map), if any
        if weights is not None:
            head_loaded = load_weights_file(self.model, weights, std=self.std, adapter_state=adapter_state)
        elif pretrained:
            head_loaded = load_pretrained(self.model, model_name, num_classes=num_classes, std=self.std)
        head = self.model.get_classifier()
        if not head_loaded and head_init_std is not None and isinstance(head, nn.Linear):
            nn.init.normal_(head.weight, std=head_init_std)
            nn.init.zeros_(head.bias)
        conv = self.model.get_submodule(self.stem_name)
        if adapter_state:
            stem = self._stem_from_file(adapter, conv, adapter_state, str(weights))
        else:
            stem = create_adapter(adapter, conv, self.mean, self.std)
        self.model.set_submodule(self.stem_name, stem)

    def _stem_from_file(self, adapter: str, conv: nn.Conv2d, state: dict[str, Tensor], source: str) -> StemAdapter:
        """The adapter whose own parameters a weights file holds, loaded, then moved to ``adapter`` as
        ``set_adapter`` would (exact, or an ``InputError`` that says why not)."""
        for name in list_adapters():
            owner = create_adapter(name, conv, self.mean, self.std)
            if {k for k in owner.state_dict() if not k.startswith("conv.")} == set(state):
                owner.load_state_dict(state, strict=False)
                return owner if name == adapter else create_adapter(adapter, owner.rgb_conv(), self.mean, self.std)
        raise WeightsError(f"{source} has stem parameters {sorted(state)} that no registered adapter owns")

    # -- the stem ------------------------------------------------------------------------------------
    @property
    def stem(self) -> StemAdapter:
        """The adapter module that replaced the stem conv."""
        return self.model.get_submodule(self.stem_name)

    @property
    def adapter(self) -> str:
        return self.stem.name

    def set_adapter(self, name: str) -> "GrayEfficientNet":
        """Swap the stem in place; the pretrained (or trained) weights stay.

        ``repeat``, ``broadcast`` and ``fold`` share the same 3-channel ``Parameter`` objects, so an
        optimizer built before the swap keeps working. Switching to or from ``sum`` makes new parameters
        (exactly equivalent when leaving ``sum``, timm's weight sum when entering it): rebuild the optimizer.
        Entering ``affine`` adds its map's parameters at the identity (exact); leaving a trained ``affine``
        folds its map into the 3-channel weight, exact where that is possible and an ``InputError`` saying
        why where it is not (``AffineStem.rgb_conv``).
        """
        old = self.stem
        if name == old.name:
            return self
        new = create_adapter(name, old.rgb_conv(), self.mean, self.std).to(old.mean.device)
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
                "Convert colour images to gray first (gray_effnet.data.read_gray does)"
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
        return self.model(self.prepare_input(x))

    # -- timm-native state dicts ---------------------------------------------------------------------
    def timm_state_dict(self) -> dict[str, Tensor]:
        """The weights under timm's own names, loadable into ``timm.create_model(model_name, in_chans=...)``.

        ``in_chans`` is 1 for the ``sum`` adapter and 3 for the others. Parameters of the adapter itself
        (``affine``'s ``scale`` and ``shift``) keep their names, ``<stem>.scale``, which timm does not know:
        for a plain timm model, ``set_adapter("repeat")`` first, which folds the map into the weight.
        """
        return timm_names(self.model.state_dict(), self.stem_name)

    def load_timm_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True):
        """Load a timm-native state dict, converting the stem between 1 and 3 channels where needed."""
        state_dict = dict(state_dict)
        stem_key = f"{self.stem_name}.weight"
        stem = self.stem
        if stem_key in state_dict:
            w = state_dict[stem_key]
            if w.shape[1] == 1 and stem.in_chans == 3:
                state_dict[stem_key] = gray_stem_weight_to_rgb(w, self.std)
            elif w.shape[1] == 3 and stem.in_chans == 1:
                state_dict[stem_key] = adapt_input_conv(1, w)
        own = {k for k in stem.state_dict() if not k.startswith("conv.")}  # the adapter's own: affine's scale
        mapped = {}
        for key, value in state_dict.items():
            if (key.startswith(f"{self.stem_name}.") and key.count(".") == self.stem_name.count(".") + 1
                    and key[len(self.stem_name) + 1:] not in own):
                key = f"{self.stem_name}.conv.{key[len(self.stem_name) + 1:]}"
            mapped[key] = value
        return self.model.load_state_dict(mapped, strict=strict)

    def describe(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild this model (``gray_effnet.load_model``)."""
        return {
            "model_name": self.model_name,
            "adapter": self.adapter,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "img_size": list(self.img_size) if self.img_size else None,
            "mean": list(self.mean),
            "std": list(self.std),
            "timm_kwargs": self.timm_kwargs,
        }

    def extra_repr(self) -> str:
        return f"model_name={self.model_name!r}, adapter={self.adapter!r}, num_classes={self.num_classes}"

