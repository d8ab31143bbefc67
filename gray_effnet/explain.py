"""The channel trace: why a 3-channel network accepts a 1-channel image, shown on a real forward pass.

``python -m gray_effnet explain --model efficientnet_b5 --adapter broadcast --img-size 128 128``
"""

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .adapters import WsoStem, get_adapter_class, list_adapters
from .errors import InputError
from .images import read_gray
from .model import GrayEfficientNet

__all__ = ["Stage", "equivalence", "explain", "format_report", "trace"]

_NOTES = {
    "bn1": "batch norm + activation: it sees the stem's channels, whatever the input had",
    "blocks": "the MBConv stages, unchanged",
    "conv_head": "1x1 conv to the head width",
    "bn2": "batch norm + activation",
    "global_pool": "global average pool",
    "classifier": "logits",
}


@dataclass
class Stage:
    """One row of the trace: a named point in the forward pass and the tensor's shape there."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    note: str


def _stage(name: str, t: Tensor, note: str) -> Stage:
    return Stage(name, tuple(t.shape), str(t.dtype).removeprefix("torch."), note)


@torch.no_grad()
def trace(model: GrayEfficientNet, x: Tensor) -> list[Stage]:
    """Run ``x`` through ``model`` and record each early stage's output shape, with a note on why.

    Args:
        model: the model to trace, in eval mode.
        x: one (1, 1, H, W) uint8 or float image.
    """
    stem = model.stem
    stages = [_stage("input", x, "raw gray pixels" + (", 1 byte each" if x.dtype == torch.uint8 else ""))]
    scaled = model.prepare_input(x)
    scale_note = "uint8 / 255 -> float in [0, 1], inside the model" if x.dtype == torch.uint8 else "float in [0, 1]"
    stages.append(_stage("scaling", scaled, scale_note))
    normalized = stem.normalize(scaled)
    note = stem.normalize_note
    if normalized.shape[1] != scaled.shape[1]:
        note = f"<-- channels {scaled.shape[1]} -> {normalized.shape[1]} HERE: {note}"
    stages.append(_stage("normalisation", normalized, note))
    projected = stem.project(normalized)
    weight_shape = tuple(stem.conv.weight.shape)
    stages.append(_stage("stem conv", projected, f"{stem.project_note}; trainable weight {weight_shape}"))

    # The rest of the network: one row per top-level child of the timm model, in execution order.
    rows: list[Stage] = []
    hooks = []
    for name, child in model.model.named_children():
        if child is stem:
            continue
        hooks.append(child.register_forward_hook(
            lambda _m, _i, out, name=name: rows.append(_stage(name, out, _NOTES.get(name, ""))))
        )
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return stages + rows


@torch.no_grad()
def equivalence(model: GrayEfficientNet, x: Tensor, adapters: list[str] | None = None) -> list[dict]:
    """For each adapter, max |adapter - repeat| at the stem output and the logits on the same input.

    ``top1_agree`` is the share of the images in ``x`` whose top-1 class is the same as under ``repeat``.

    Each adapter is set on a copy of ``model`` taken with the ``repeat`` stem, so every one starts from the
    same pretrained 3-channel weights. When the model's stem cannot become ``repeat`` (see ``AffineStem``),
    the one row returned has an ``error`` saying why.
    """
    try:
        base = copy.deepcopy(model).set_adapter("repeat").eval()
    except InputError as e:  # a trained affine map that no 3-channel stem can express: nothing to compare to
        return [{"adapter": model.adapter, "error": str(e)}]
    scaled = base.prepare_input(x)
    ref_stem, ref_logits = base.stem(scaled), base(x)
    scale = ref_logits.abs().max().item()
    out = []
    for name in adapters or list_adapters():
        m = copy.deepcopy(base).set_adapter(name)
        stem_diff = (m.stem(scaled) - ref_stem).abs().max().item()
        logits = m(x)
        logit_diff = (logits - ref_logits).abs().max().item()
        out.append({
            "adapter": name,
            "stem_max_abs": stem_diff,
            "logits_max_abs": logit_diff,
            "logits_rel": logit_diff / scale if scale else float("nan"),
            "logits_scale": scale,
            "top1_agree": (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item(),
        })
    return out


def format_report(model: GrayEfficientNet, stages: list[Stage], rows: list[dict], weights_note: str) -> str:
    """The explainer's text: the trace table, then the equivalence table."""
    lines = [
        f"Why a 3-channel {model.model_name} accepts a 1-channel image "
        f"(adapter: {model.adapter}; weights: {weights_note})",
        "",
        f"{'stage':<14} {'shape':<20} {'dtype':<8} note",
    ]
    for s in stages:
        lines.append(f"{s.name:<14} {str(s.shape):<20} {s.dtype:<8} {s.note}")
    norm = next(s for s in stages if s.name == "normalisation")
    if norm.shape[1] == 3:
        why = ["1 channel becomes 3 at the normalisation, because the statistics have 3 channels:",
               f"mean {model.mean}, std {model.std}. After that the network is the stock RGB one."]
    else:
        why = ["The stem's input keeps 1 channel: the 3-channel statistics",
               f"(mean {model.mean}, std {model.std}) went into the stem weights instead."]
    stem = model.stem
    if hasattr(stem, "window_table"):  # window, wso: each stem channel is an intensity window
        kind = " (learned)" if isinstance(stem, WsoStem) else " (fixed)"
        why = ["1 channel becomes 3 at the normalisation, because each channel is one intensity window of the",
               f"gray image, then normalised with mean {model.mean}, std {model.std}. After that the network is",
               "the stock RGB one.",
               "", f"Intensity windows{kind}, one per channel, in {stem.units()}:"]
        why += [f"  channel {i}: center {c:.6g}, width {w:.6g}" for i, (c, w) in enumerate(stem.window_table())]
    learned = model.stem.learned_note()
    lines += [
        "",
        *why,
        *([learned] if learned else []),
        "",
        "Equivalence on the same input: max |adapter - repeat|",
        f"{'adapter':<10} {'stem output':>12} {'logits':>12} {'logits / scale':>15} {'top-1 agrees':>13}",
    ]
    if rows and "error" in rows[0]:
        lines[-1] = f"not computed: {rows[0]['error']}"  # in place of the column header
        return "\n".join(lines)
    for r in rows:
        lines.append(
            f"{r['adapter']:<10} {r['stem_max_abs']:>12.3g} {r['logits_max_abs']:>12.3g} "
            f"{r['logits_rel']:>15.3g} {r['top1_agree']:>13.0%}"
        )
    if rows:
        lines.append(f"(logits scale = max |repeat logits| = {rows[0]['logits_scale']:.4g})")
        windowed = [r["adapter"] for r in rows if not get_adapter_class(r["adapter"]).foldable]
        if windowed:
            lines.append(f"({', '.join(windowed)}: intensity windows, different from repeat by design; "
                         "shown with their default windows, the whole input range)")
    return "\n".join(lines)


def explain(
    model_name: str,
    adapter: str,
    *,
    img_size: Sequence[int] = (128, 128),
    pretrained: bool = False,
    weights: str | os.PathLike | None = None,
    image: str | os.PathLike | None = None,
    seed: int = 0,
) -> str:
    """The whole report of ``python -m gray_effnet explain``: the trace and the equivalence table.

    Random weights and the random image both come from ``seed``, so the same arguments print the same report.
    """
    torch.manual_seed(seed)
    model = GrayEfficientNet(model_name, adapter=adapter, pretrained=pretrained, weights=weights).eval()
    if weights:
        weights_note = f"from {weights}"
    elif pretrained:
        weights_note = "pretrained ImageNet"
    else:
        weights_note = f"random init, seed {seed} (pass --pretrained for ImageNet weights); the shapes are the same"
    if image:
        img, source = read_gray(image), str(image)
    else:
        g = torch.Generator().manual_seed(seed)
        img = torch.randint(0, 256, (1, 32, 32), dtype=torch.uint8, generator=g)
        source = f"a random 32x32 image (seed {seed})"
    h, w = img_size
    x = F.interpolate(img[None].float(), size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8) if img.dtype == torch.uint8 else x
    report = format_report(model, trace(model, x), equivalence(model, x), weights_note)
    return f"{report}\ninput: {source}, resized to {h}x{w}"
