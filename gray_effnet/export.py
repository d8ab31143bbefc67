"""Export a checkpoint to ONNX or TorchScript: raw 1-channel pixels in, logits out.

``python -m gray_effnet export --weights runs/tf_efficientnet_lite0-broadcast/best.safetensors --format onnx
--output best.onnx``

Whatever adapter the checkpoint was trained with, the exported stem is the ``fold`` stem: one input
channel, normalisation folded into the weights (``gray_effnet.adapters.FoldStem``), so a deployed model
takes (B, 1, H, W) float in [0, 1] and needs no preprocessing but the scaling to [0, 1]. ``FoldStem``
itself caches its offset map in a Python dict keyed by input size, which neither ``torch.jit.script`` nor
the ONNX tracer can follow, so the export uses ``FrozenFoldStem``: the same algebra (``fold_weights``) with
constant weights, the offset recomputed from a ones image of the input's size in the graph itself. The
learnable ``affine`` stem folds the same way, its per-channel map included.

An adapter that is not ``foldable`` (``window``, ``wso``: intensity windows are not linear in the pixels) is
exported as it is: its elementwise windows, the normalisation and the stock 3-channel conv, checked against
PyTorch in the same way.
"""

import contextlib
import copy
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .adapters import StemAdapter, conv_with_weight
from .checkpoint import load_model
from .errors import InputError, WeightsError
from .files import atomic_write, check_output_file, output_lock
from .model import GrayEfficientNet

__all__ = ["ATOL", "FORMATS", "RTOL", "ExportResult", "FrozenFoldStem", "export", "exportable"]

FORMATS = ("onnx", "torchscript")
# The exported model and the PyTorch model are two float32 computations, so they differ by rounding, which
# grows with the logits (a random Lite0 with logits near 50 differs by ~1e-4 from its own `fold` adapter).
# Tolerance: ATOL + RTOL * max|logit|; a wrong border or a lost normalisation is orders of magnitude above it.
ATOL = 1e-4
RTOL = 1e-5
ONNX_OPSET = 17  # the legacy exporter goes up to 20; 17 loads in any onnxruntime of the last years
INPUT_NAME = "image"
OUTPUT_NAME = "logits"


class FrozenFoldStem(nn.Module):
    """The export's stem: ``fold``'s algebra (``fold_weights``) with constant weights, in a graph that scripts.

    Unlike the trainable ``FoldStem``, which derives its folded kernels from the 3-channel weight in every
    forward and caches the offset map per input size in a Python dict (which neither ``torch.jit.script``
    nor the ONNX tracer can follow), this one holds the folded kernels as frozen weights and recomputes the
    offset from a ones image of the input's size in the graph itself, so batch, height and width stay dynamic.
    ``conv`` and ``offset_conv`` are copies of the stem conv (same class, so ``Conv2dSame`` keeps its
    input-size dependent TensorFlow padding).

    Args:
        conv: the stem conv, used as the template of both convs (its weight is not used).
        weight: (O, 1, k, k) kernel applied to the image with the conv's bias (``FoldedWeights.weight``).
        offset_weight: (O, 1, k, k) kernel applied to ones without bias (``FoldedWeights.offset_weight``).

    Shape:
        - Input: (B, 1, H, W) float in [0, 1].
        - Output: (B, O, H', W'), what the stem adapter gives on the same input.

    Example:
        >>> model = GrayEfficientNet("tf_efficientnet_lite0", adapter="sum")
        >>> stem = FrozenFoldStem.from_adapter(model.stem)
        >>> stem(torch.rand(2, 1, 64, 80)).shape
        torch.Size([2, 32, 32, 40])
    """

    def __init__(self, conv: nn.Conv2d, weight: Tensor, offset_weight: Tensor) -> None:
        super().__init__()
        self.conv = conv_with_weight(conv, weight).requires_grad_(False)
        self.offset_conv = conv_with_weight(conv, offset_weight).requires_grad_(False)
        self.offset_conv.bias = None

    @classmethod
    @torch.no_grad()
    def from_adapter(cls, stem: StemAdapter, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None) -> "FrozenFoldStem":
        """Fold any affine stem adapter (``StemAdapter.folded_weights``) in float64, so the fold adds no rounding.

        Args:
            stem: the adapter to fold; it is left as it is.
            mean: the per-channel means to fold in; default: the stem's own.
            std: the per-channel standard deviations; default: the stem's own.
        """
        stem64 = copy.deepcopy(stem).double()
        if mean is not None:
            stem64.mean.copy_(torch.as_tensor(mean, dtype=torch.float64).view_as(stem64.mean))
        if std is not None:
            stem64.std.copy_(torch.as_tensor(std, dtype=torch.float64).view_as(stem64.std))
        return cls(stem.conv, *stem64.folded_weights())

    def forward(self, x: Tensor) -> Tensor:
        # (B,1,H,W) -> (B,O,H',W'); the (1,O,H',W') offset broadcasts over the batch. ones_like(x[:1]) keeps H, W
        # symbolic in both the script and the ONNX graph, where a cached map would freeze them.
        return self.conv(x) - self.offset_conv(torch.ones_like(x[:1]))


def exportable(model: GrayEfficientNet) -> nn.Module:
    """A frozen copy of ``model``'s timm network with its stem replaced by a ``FrozenFoldStem`` (if ``foldable``).

    ``model`` itself is left as it is. The copy skips ``prepare_input`` (its checks are Python, not graph):
    it takes float input in [0, 1] only.

    Shape:
        - Input: (B, 1, H, W) float in [0, 1], H and W at least ``model.min_size``.
        - Output: (B, num_classes).

    Example:
        >>> net = exportable(load_model("runs/tf_efficientnet_lite0-broadcast/best.safetensors"))
        >>> scripted = torch.jit.script(net)
    """
    net = copy.deepcopy(model.model)
    if model.stem.foldable:
        net.set_submodule(model.stem_name, FrozenFoldStem.from_adapter(model.stem))
    return net.eval().requires_grad_(False)


@dataclass(frozen=True)
class ExportResult:
    """What ``export`` wrote and how closely it matches the PyTorch model; ``str()`` is a readable summary."""

    path: Path
    format: str
    model_name: str
    adapter: str
    num_classes: int
    check_shapes: tuple[tuple[int, ...], ...]
    max_abs_diff: float | None = None
    tolerance: float | None = None
    check_note: str = ""
    folded: bool = True

    def __str__(self) -> str:
        runtime = "onnxruntime" if self.format == "onnx" else "torch.jit.load"
        fmt = f"ONNX opset {ONNX_OPSET}" if self.format == "onnx" else "TorchScript"
        shapes = " and ".join(str(s) for s in self.check_shapes)
        if self.max_abs_diff is None:
            check = f"skipped: {self.check_note}"
        else:
            check = (f"max |{runtime} - PyTorch| = {self.max_abs_diff:.1e} on random inputs {shapes} "
                     f"(tolerance {self.tolerance:.1e})")
        stem = (f"its {self.adapter!r} stem folded to 1 input channel" if self.folded else
                f"its {self.adapter!r} stem as trained (intensity windows, 3-channel conv)")
        return "\n".join([
            f"wrote {self.path} ({fmt})",
            f"  model:  {self.model_name}, {stem}, normalisation inside",
            f"  input:  {INPUT_NAME!r} float32 (batch, 1, height, width) in [0, 1]; batch, height, width dynamic",
            f"  output: {OUTPUT_NAME!r} float32 (batch, {self.num_classes})",
            f"  check:  {check}",
        ])


def _check_inputs(model: GrayEfficientNet, img_size: Sequence[int]) -> list[Tensor]:
    """Two seeded random batches: the export size, and another batch size and odd size (dynamic axes)."""
    if len(img_size) != 2:
        raise InputError(f"img_size must be (H, W); got {tuple(img_size)}")
    h, w = (int(s) for s in img_size)
    g = torch.Generator().manual_seed(0)
    xs = [torch.rand(2, 1, h, w, generator=g), torch.rand(1, 1, h + 7, w + 5, generator=g)]
    for x in xs:
        model.prepare_input(x)  # the size checks, with the model's own messages
    return xs


@contextlib.contextmanager
def _no_jit_deprecation() -> Iterator[None]:
    """Hide the notices that torch.jit (script, save, load) and the ONNX exporter built on it are deprecated.

    Their replacements need onnxscript (ONNX) or give up TorchScript's Python-free loading; until that
    changes, the notice is noise to someone exporting a model.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(torch\.jit\.\w+. is deprecated|legacy TorchScript-based)")
        # ... and the legacy exporter's own internals, which call a helper deprecated inside torch.onnx.
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        yield


def _run_exported(fmt: str, path: Path, xs: list[Tensor]) -> list[Tensor] | str:
    """The exported file's outputs on ``xs``, or why they cannot be had (a missing optional runtime)."""
    if fmt == "torchscript":
        # The simple executor runs the saved graph as it is. The default profiling executor would re-specialise
        # the whole graph at each new input shape, which takes seconds per shape on CPU and checks nothing more.
        with _no_jit_deprecation(), torch.no_grad(), torch.jit.optimized_execution(False):
            loaded = torch.jit.load(str(path), map_location="cpu")
            return [loaded(x) for x in xs]
    try:
        import onnxruntime as ort
    except ImportError:
        return ("onnxruntime is not installed (from a checkout: pip install -e '.[onnx]'; "
                "otherwise: pip install onnx onnxruntime)")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]) for x in xs]


def _write(net: nn.Module, fmt: str, path: Path, example: Tensor) -> None:
    with _no_jit_deprecation():
        if fmt == "torchscript":
            # script, not trace: Conv2dSame's padding is Python arithmetic on the input size, which script
            # compiles as code, so every H, W gets its own padding. trace records one run; that it stays
            # dynamic for tf_ models rests on timm computing traced sizes as tensors in pad_same.
            torch.jit.save(torch.jit.script(net), str(path))
            return
        # dynamo=False: the default torch.export-based exporter needs onnxscript. The legacy exporter traces,
        # and timm's pad_same computes on traced sizes as tensors, so H and W stay dynamic. It ignores
        # `external_data`; models under 2 GB are written inline anyway.
        torch.onnx.export(
            net, (example,), str(path), dynamo=False, opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, OUTPUT_NAME: {0: "batch"}},
        )


def export(
    weights: str | os.PathLike,
    format: str,
    output: str | os.PathLike,
    img_size: Sequence[int] | None = None,
    check: bool = True,
) -> ExportResult:
    """Export a checkpoint of this project with a folded 1-channel stem and normalisation inside.

    The file is written atomically, and only after it has been loaded back and compared with the PyTorch
    model (as trained, whatever its adapter) on random inputs of two sizes: a failed check leaves the old
    file, if any, in place. ``output`` is checked before any work, and its folder is held with ``output_lock``
    while exporting, so an export into a folder where another run (``train.py``, an export) is writing is refused.

    Args:
        weights: a checkpoint written by ``save_weights`` (``best.safetensors``).
        format: ``"onnx"`` or ``"torchscript"``.
        output: the file to write.
        img_size: (H, W) of the example input; default: the checkpoint's ``img_size``, else 224x224.
        check: compare the exported file with the PyTorch model (ONNX: skipped with a note when
            onnxruntime is not installed).

    Returns:
        An ``ExportResult``: the path, the input and output spec, and the largest difference found.

    Raises:
        WeightsError: the checkpoint cannot be read, or the export differs from the model by more than
            ``ATOL + RTOL * max|logit|``.
        InputError: an unknown format, an image size below the network's total stride, ONNX without onnx, an
            ``output`` that is a folder, or an output folder in use by another run (``output_lock``).

    Shape:
        - Exported input: (B, 1, H, W) float32 in [0, 1], B, H and W dynamic.
        - Exported output: (B, num_classes) logits.

    Example:
        >>> print(export("runs/tf_efficientnet_lite0-broadcast/best.safetensors", "onnx", "runs/demo/best.onnx"))
        >>> import onnxruntime as ort
        >>> x = (gray[None, None] / 255).astype("float32")  # a (H, W) uint8 numpy image -> (1, 1, H, W)
        >>> logits = ort.InferenceSession("runs/demo/best.onnx").run(None, {"image": x})[0]
    """
    if format not in FORMATS:
        raise InputError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}")
    if format == "onnx":
        try:
            import onnx  # noqa: F401  the legacy exporter needs it to write the file
        except ImportError:
            raise InputError("ONNX export needs the onnx package (from a checkout: pip install -e '.[onnx]'; "
                             "otherwise: pip install onnx onnxruntime)") from None
    path = Path(output)
    check_output_file(path)  # before any work
    with output_lock(path.parent, "export"):  # one run per output folder
        model = load_model(weights).eval()
        size = img_size if img_size is not None else (model.img_size or (224, 224))
        xs = _check_inputs(model, size)
        net = exportable(model)
        diff = tol = None
        note = "not requested"
        with atomic_write(path) as tmp:  # renamed onto `path` only if the block finishes, so after the check
            _write(net, format, tmp, xs[0])
            outs = _run_exported(format, tmp, xs) if check else note
            if isinstance(outs, str):
                note = outs
            else:
                with torch.no_grad():
                    refs = [model(x) for x in xs]
                diff = max((o.float() - r).abs().max().item() for o, r in zip(outs, refs))
                tol = ATOL + RTOL * max(r.abs().max().item() for r in refs)
                if not diff <= tol:  # `not <=` so that a NaN fails too
                    raise WeightsError(
                        f"the exported {format} model differs from the PyTorch model of {weights} by {diff:.3g} "
                        f"(tolerance {tol:.1e}), so {path} was not written. This is a bug of the export; please "
                        "report it with the model name and adapter (--no-check writes the file anyway)"
                    )
    return ExportResult(
        path=path, format=format, model_name=model.model_name, adapter=model.adapter, num_classes=model.num_classes,
        check_shapes=tuple(tuple(x.shape) for x in xs), max_abs_diff=diff, tolerance=tol, check_note=note,
        folded=model.stem.foldable,
    )
