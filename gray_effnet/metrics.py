"""Ranking metrics of scores against yes/no labels: ROC AUC, average precision, and a threshold by Youden's J.

Each column (a multi-label finding, or a single-label class against the rest) is scored over the entries whose
label is known (not NaN), with scikit-learn's ``roc_auc_score``, ``average_precision_score`` and ``roc_curve``.
A column whose known labels are all of one class has no ROC AUC: it is reported as undefined ("one class") and
left out of the macro means, never counted as 0.5.

scikit-learn is imported when a metric is first computed, not with this module: it takes most of a second, and a
single-label run of more than two classes never needs it.
"""

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["DEFAULT_THRESHOLD", "FindingMetrics", "finding_metrics", "youden_threshold"]

DEFAULT_THRESHOLD = 0.5  # where no threshold could be chosen: a finding with one class among its known labels


def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The threshold that maximises Youden's J = TPR - FPR; a score at or above it is called positive.

    Over every distinct score (``roc_curve`` without dropping points); ties go to the highest threshold.
    ``roc_curve``'s first point, above every score, calls nothing positive and is not a threshold one can use.

    Shape:
        - labels: (N,) of 0 and 1, both present
        - scores: (N,)
    """
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    best = 1 + int(np.argmax((tpr - fpr)[1:]))
    return float(np.clip(thresholds[best], 0.0, 1.0))


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
    from sklearn.metrics import average_precision_score, roc_auc_score

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
            auc[j] = roc_auc_score(y, s)
            ap[j] = average_precision_score(y, s)
            threshold[j] = youden_threshold(y, s)
    return FindingMetrics(auc=auc, ap=ap, threshold=threshold, prevalence=prevalence, labelled=labelled)
