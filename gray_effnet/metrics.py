"""Ranking metrics of scores against yes/no labels: ROC AUC, average precision, and a threshold by Youden's J.

Each column (a multi-label finding, or a single-label class against the rest) is scored over the entries whose
label is known (not NaN). A column whose known labels are all of one class has no ROC AUC: it is reported as
undefined ("one class") and left out of the macro means, never counted as 0.5.

The curves are computed here with numpy, as scikit-learn's ``roc_curve``, ``roc_auc_score`` and
``average_precision_score`` compute them (the tests check them against scikit-learn): importing scikit-learn takes
a second or more, and each training run validates every epoch.
"""

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["DEFAULT_THRESHOLD", "FindingMetrics", "average_precision", "finding_metrics", "roc_auc", "roc_curve",
           "youden_threshold"]

DEFAULT_THRESHOLD = 0.5  # where no threshold could be chosen: a finding with one class among its known labels


def _counts(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True and false positives called at each distinct score, highest first, when it is the threshold."""
    labels, scores = np.asarray(labels, dtype=bool).ravel(), np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels and scores must both be (N,); got {labels.shape} and {scores.shape}")
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]  # the last entry of each run of equal scores
    tps = np.cumsum(labels)[last]
    return tps, last + 1 - tps, scores[last]


def _curve(tps: np.ndarray, fps: np.ndarray, thresholds: np.ndarray, drop_intermediate: bool
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``roc_curve`` from ``_counts``."""
    if drop_intermediate and tps.size > 2:
        keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        tps, fps, thresholds = tps[keep], fps[keep], thresholds[keep]
    if tps[-1] == 0 or fps[-1] == 0:
        raise ValueError("an ROC curve needs both positive and negative labels")
    tps, fps, thresholds = np.r_[0, tps], np.r_[0, fps], np.r_[np.inf, thresholds]
    return fps / fps[-1], tps / tps[-1], thresholds


def _area(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """The trapezoid area under an ROC curve's points."""
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2)


def _youden(fpr: np.ndarray, tpr: np.ndarray, thresholds: np.ndarray) -> float:
    """``youden_threshold`` from a curve without dropped points."""
    best = 1 + int(np.argmax((tpr - fpr)[1:]))
    return float(np.clip(thresholds[best], 0.0, 1.0))


def _average_precision(tps: np.ndarray, fps: np.ndarray) -> float:
    """``average_precision`` from ``_counts``."""
    if tps[-1] == 0:
        raise ValueError("average precision needs a positive label")
    recall_added = np.diff(np.r_[0, tps]) / tps[-1]
    return float(np.sum(recall_added * tps / (tps + fps)))


def roc_curve(labels: np.ndarray, scores: np.ndarray, drop_intermediate: bool = True
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False and true positive rates when each distinct score is the threshold (a score at or above it is called
    positive), as scikit-learn's ``roc_curve``: the first point, threshold ``inf``, calls nothing positive.

    Args:
        labels: 1 (or True) for positive; both classes must be present.
        drop_intermediate: leave out the points on a straight segment between their neighbours.

    Shape:
        - labels, scores: (N,)

    Returns:
        ``fpr``, ``tpr`` and ``thresholds``, each (M,), the thresholds decreasing.
    """
    return _curve(*_counts(labels, scores), drop_intermediate)


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """The area under the ROC curve: the chance that a positive outscores a negative, a tie counting half.

    Shape:
        - labels, scores: (N,), both classes present
    """
    return _area(*roc_curve(labels, scores, drop_intermediate=False)[:2])


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision, as scikit-learn's: the precision at each threshold weighted by the recall it adds.

    Shape:
        - labels, scores: (N,), at least one positive
    """
    tps, fps, _ = _counts(labels, scores)
    return _average_precision(tps, fps)


def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The threshold that maximises Youden's J = TPR - FPR; a score at or above it is called positive.

    Over every distinct score (``roc_curve`` without dropping points); ties go to the highest threshold.
    ``roc_curve``'s first point, above every score, calls nothing positive and is not a threshold one can use.

    Shape:
        - labels: (N,) of 0 and 1, both present
        - scores: (N,)
    """
    return _youden(*roc_curve(labels, scores, drop_intermediate=False))


def _mean_of_defined(values: np.ndarray) -> float:
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else math.nan


@dataclass(frozen=True)
class FindingMetrics:
    """Per-column metrics; each attribute is a (K,) array.

    Attributes:
        auc: ROC AUC, NaN where undefined (``why_undefined``).
        ap: average precision, NaN where the AUC is undefined.
        threshold: Youden's threshold (``youden_threshold``), ``DEFAULT_THRESHOLD`` where the AUC is undefined.
        prevalence: the fraction of positives among the known labels, NaN where none is known.
        labelled: how many labels are known.
    """

    auc: np.ndarray
    ap: np.ndarray
    threshold: np.ndarray
    prevalence: np.ndarray
    labelled: np.ndarray

    @property
    def macro_auc(self) -> float:
        """The mean ROC AUC of the columns where it is defined (NaN if none is)."""
        return _mean_of_defined(self.auc)

    @property
    def macro_ap(self) -> float:
        """The mean average precision of the columns where it is defined (NaN if none is)."""
        return _mean_of_defined(self.ap)

    def why_undefined(self, k: int) -> str | None:
        """Why column ``k`` has no ROC AUC: "no labels" or "one class"; None when it has one."""
        if self.labelled[k] == 0:
            return "no labels"
        return "one class" if math.isnan(self.auc[k]) else None


def finding_metrics(targets: np.ndarray, scores: np.ndarray) -> FindingMetrics:
    """ROC AUC, average precision, Youden's threshold, prevalence and count of each column's known labels.

    Args:
        targets: labels, 1 (positive), 0 or NaN (unknown: left out).
        scores: probabilities (or any scores ranking the positives first).

    Shape:
        - targets: (N, K)
        - scores: (N, K)
    """
    targets, scores = np.asarray(targets, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if targets.ndim != 2 or targets.shape != scores.shape:
        raise ValueError(f"targets and scores must both be (N, K); got {targets.shape} and {scores.shape}")
    k = targets.shape[1]
    auc, ap, prevalence = np.full(k, math.nan), np.full(k, math.nan), np.full(k, math.nan)
    threshold, labelled = np.full(k, DEFAULT_THRESHOLD), np.zeros(k, dtype=np.int64)
    for j in range(k):
        known = ~np.isnan(targets[:, j])
        y, s = targets[known, j] > 0.5, scores[known, j]
        labelled[j] = y.size
        if y.size:
            prevalence[j] = y.mean()
        if y.any() and not y.all():
            tps, fps, scores_at = _counts(y, s)  # one sort of the column for all three
            fpr, tpr, thresholds = _curve(tps, fps, scores_at, drop_intermediate=False)
            auc[j], ap[j], threshold[j] = _area(fpr, tpr), _average_precision(tps, fps), _youden(fpr, tpr, thresholds)
    return FindingMetrics(auc=auc, ap=ap, threshold=threshold, prevalence=prevalence, labelled=labelled)
