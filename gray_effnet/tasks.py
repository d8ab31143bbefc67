"""What is learnt from the labels: one class per image (``single``) or a yes/no/unknown per finding (``multi``).

* ``single``: class folders and packs. Targets are class indices (B,), -1 for an unlabelled image; softmax over
  the classes, cross-entropy, accuracy by argmax.
* ``multi``: medical label tables (issue 20), where an image can show several findings and some are not known.
  Targets are float (B, K): 1.0, 0.0, or NaN for "not known", which adds nothing to the loss or the metrics. A
  sigmoid per finding, binary cross-entropy over the known entries, accuracy per known entry at probability 0.5.

The training loop asks nothing of the task beyond the criterion it is given and ``count_correct``; evaluation
(``gray_effnet.engine.evaluate``) takes the task by name.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import InputError

__all__ = ["POS_WEIGHT_RANGE", "TASKS", "MaskedBCEWithLogitsLoss", "check_task", "count_correct", "make_criterion",
           "masked_bce", "pos_weight_from_prevalence"]

TASKS = ("single", "multi")
# pos_weight = (1 - p) / p is 99 at 1% prevalence and 0 or infinite for a finding seen never or always in training:
# clipped, so that one rare finding cannot swamp the gradient of the others.
POS_WEIGHT_RANGE = (0.01, 100.0)


def check_task(task: str) -> str:
    if task not in TASKS:
        raise InputError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    return task


def masked_bce(logits: Tensor, targets: Tensor, pos_weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The sum of the binary cross-entropies of the known entries, and how many there are.

    A NaN target is replaced before the loss is computed (NaN times 0 would still be NaN), and its term is then
    dropped by ``where``: it contributes neither loss nor gradient.

    Shape:
        - logits: (B, K)
        - targets: (B, K), float: 1.0, 0.0 or NaN (unknown)
        - pos_weight: (K,)
        - output: two scalars
    """
    known = ~torch.isnan(targets)
    losses = F.binary_cross_entropy_with_logits(logits, torch.where(known, targets, 0.0), pos_weight=pos_weight,
                                                reduction="none")
    return torch.where(known, losses, 0.0).sum(), known.sum()


class MaskedBCEWithLogitsLoss(nn.Module):
    """Binary cross-entropy with logits over the known entries only, their mean (0 when the batch has none).

    The mean is per known entry, not per image, so that images with many unknown findings weigh no less per label.

    Args:
        pos_weight: the weight of each finding's positive term (``pos_weight_from_prevalence``), or None for 1.

    Shape:
        - logits: (B, K)
        - targets: (B, K), float: 1.0, 0.0 or NaN (unknown)
        - output: a scalar
    """

    def __init__(self, pos_weight: Sequence[float] | Tensor | None = None) -> None:
        super().__init__()
        weight = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32)
        self.register_buffer("pos_weight", weight)  # moves with .to(device)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        total, count = masked_bce(logits, targets, self.pos_weight)
        return total / count.clamp(min=1)


def pos_weight_from_prevalence(prevalence: Sequence[float] | Tensor) -> Tensor:
    """Each finding's positive weight ``(1 - p) / p``, clipped to ``POS_WEIGHT_RANGE``; 1 where ``p`` is NaN.

    With it, the positives and the negatives of a finding weigh the same in the loss. A NaN prevalence (no
    training image has the finding labelled) gets the neutral 1.

    Shape:
        - prevalence: (K,), fractions in [0, 1] or NaN
        - output: (K,) float32
    """
    p = torch.as_tensor(prevalence, dtype=torch.float64)
    if p.ndim != 1 or ((p < 0) | (p > 1)).any():
        raise InputError(f"prevalence must be a list of fractions in [0, 1]; got {p.tolist()}")
    return ((1 - p) / p).nan_to_num(nan=1.0).clamp(*POS_WEIGHT_RANGE).float()  # p = 0 gives inf, then the top


def make_criterion(task: str, *, label_smoothing: float = 0.0, pos_weight: Tensor | None = None) -> nn.Module:
    """The training loss: cross-entropy (``single``) or the masked binary cross-entropy (``multi``).

    Label smoothing is for single-label classes; a positive weight per finding is for multi-label findings.
    """
    if check_task(task) == "single":
        if pos_weight is not None:
            raise InputError("a positive weight per finding (--pos-weight) is for multi-label data; this data has "
                             "one class per image")
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)  # looked up here: tests may patch it
    return MaskedBCEWithLogitsLoss(pos_weight)


def count_correct(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor | int]:
    """(right, counted) for accuracy: images by argmax, or known multi-label entries at probability 0.5.

    Float targets are multi-label (the task's contract); a logit of 0 is probability 0.5, called positive, as a
    threshold of 0.5 calls a score at or above it (``gray_effnet.metrics``).
    """
    if targets.is_floating_point():
        known = ~torch.isnan(targets)
        return ((logits >= 0) == (targets > 0.5))[known].sum(), known.sum()
    return (logits.argmax(-1) == targets).sum(), targets.numel()
