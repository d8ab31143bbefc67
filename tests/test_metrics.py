"""Ranking metrics (gray_effnet.metrics) and the multi-label objective (gray_effnet.tasks), against numbers
computed here: pairs counted by hand, the loss written out from its formula, and scikit-learn where it is not
the code under test's own call."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.metrics import roc_curve as sklearn_roc_curve

from gray_effnet.errors import InputError
from gray_effnet.metrics import (
    DEFAULT_THRESHOLD,
    average_precision,
    finding_metrics,
    roc_auc,
    roc_curve,
    youden_threshold,
)
from gray_effnet.tasks import (
    POS_WEIGHT_RANGE,
    MaskedBCEWithLogitsLoss,
    count_correct,
    make_criterion,
    pos_weight_from_prevalence,
)

NAN = math.nan
# 3 positives, 4 negatives, one tie between a positive and a negative (0.7).
LABELS = np.array([1, 0, 1, 0, 1, 0, 0])
SCORES = np.array([0.9, 0.8, 0.7, 0.7, 0.4, 0.3, 0.1])


def pair_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """The probability that a positive outscores a negative, ties counting half: every pair counted."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


class TestRocAuc:
    def test_hand_counted_pairs(self):
        # 0.9 beats all 4 negatives; 0.7 beats 0.3 and 0.1 and ties 0.7; 0.4 beats 0.3 and 0.1: 8.5 of 12 pairs.
        m = finding_metrics(LABELS[:, None], SCORES[:, None])
        assert m.auc[0] == pytest.approx(8.5 / 12)
        assert pair_auc(LABELS, SCORES) == pytest.approx(8.5 / 12)

    def test_unknown_labels_are_left_out(self):
        """Columns with NaN labels: each scored over its own known entries, as if the others were not there."""
        rng = np.random.default_rng(0)
        targets = (rng.random((40, 3)) < 0.4).astype(float)
        targets[rng.random((40, 3)) < 0.3] = NAN
        scores = np.clip(0.3 * targets + rng.random((40, 3)), 0, 1)
        scores = np.where(np.isnan(scores), rng.random((40, 3)), scores)  # an unknown entry has a score too
        m = finding_metrics(targets, scores)
        for k in range(3):
            known = ~np.isnan(targets[:, k])
            y, s = targets[known, k], scores[known, k]
            assert m.auc[k] == pytest.approx(pair_auc(y, s))
            assert m.auc[k] == pytest.approx(roc_auc_score(y, s))
            assert m.ap[k] == pytest.approx(average_precision_score(y, s))
            assert m.labelled[k] == known.sum() and m.prevalence[k] == pytest.approx(y.mean())
        assert m.macro_auc == pytest.approx(m.auc.mean()) and m.macro_ap == pytest.approx(m.ap.mean())


class TestAveragePrecision:
    def test_hand_computed(self):
        # Down the ranking: 0.9 gives recall 1/3 at precision 1; the tie at 0.7 gives recall 2/3 at precision 2/4;
        # 0.4 gives recall 1 at precision 3/5. AP = 1/3 * 1 + 1/3 * 1/2 + 1/3 * 3/5 = 0.7.
        assert finding_metrics(LABELS[:, None], SCORES[:, None]).ap[0] == pytest.approx(0.7)


class TestUndefined:
    def test_one_class_is_undefined_and_left_out_of_the_means(self):
        targets = np.array([[1, 1, NAN], [0, 1, NAN], [1, 1, NAN], [0, NAN, NAN]])
        scores = np.array([[0.9, 0.2, 0.5], [0.1, 0.8, 0.5], [0.6, 0.4, 0.5], [0.7, 0.3, 0.5]])
        m = finding_metrics(targets, scores)
        assert m.auc[0] == pytest.approx(pair_auc(targets[:, 0], scores[:, 0]))  # 0.9, 0.6 vs 0.1, 0.7: 3 of 4
        assert math.isnan(m.auc[1]) and math.isnan(m.ap[1]) and math.isnan(m.auc[2])
        assert [m.why_undefined(k) for k in range(3)] == [None, "one class", "no labels"]
        assert m.macro_auc == pytest.approx(0.75) and m.macro_ap == pytest.approx(m.ap[0])
        assert m.threshold[1] == m.threshold[2] == DEFAULT_THRESHOLD
        assert m.prevalence[1] == 1.0 and math.isnan(m.prevalence[2]) and m.labelled.tolist() == [4, 3, 0]

    def test_nothing_defined_gives_nan_means(self):
        m = finding_metrics(np.array([[1.0], [1.0]]), np.array([[0.2], [0.3]]))
        assert math.isnan(m.macro_auc) and math.isnan(m.macro_ap)
        m = finding_metrics(np.empty((0, 2)), np.empty((0, 2)))
        assert math.isnan(m.macro_auc) and m.labelled.tolist() == [0, 0]

    def test_shapes_checked(self):
        with pytest.raises(ValueError, match=r"both be \(N, K\); got \(3,\) and \(3,\)"):
            finding_metrics(np.zeros(3), np.zeros(3))


class TestYouden:
    def test_hand_case(self):
        # score >= t: (TPR, FPR) at 0.9 (1/3, 0), 0.8 (1/3, 1/4), 0.7 (2/3, 2/4), 0.4 (1, 2/4), 0.3 (1, 3/4),
        # 0.1 (1, 1); J = TPR - FPR is largest, 1/2, at 0.4.
        assert youden_threshold(LABELS, SCORES) == 0.4
        assert finding_metrics(LABELS[:, None], SCORES[:, None]).threshold[0] == 0.4

    def test_ties_go_to_the_highest_threshold(self):
        # J is 1/2 at 0.9 (TPR 1/2, FPR 0) and at 0.6 (TPR 1, FPR 1/2)
        assert youden_threshold(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.6, 0.2])) == 0.9

    def test_threshold_reproduces_its_j(self):
        rng = np.random.default_rng(1)
        y = rng.random(50) < 0.3
        s = np.clip(0.25 * y + rng.random(50), 0, 1)
        t = youden_threshold(y, s)
        j = lambda t: (s[y] >= t).mean() - (s[~y] >= t).mean()  # noqa: E731
        assert j(t) == pytest.approx(max(j(u) for u in s))


class TestMaskedBCE:
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.3, 1.5, -2.0], [-0.7, 0.0, 1.0]], dtype=torch.float64)
    targets = torch.tensor([[1.0, NAN, 0.0], [0.0, 1.0, NAN], [NAN, NAN, 1.0]], dtype=torch.float64)

    def reference(self, pos_weight=(1.0, 1.0, 1.0)) -> float:
        """-(w y log s + (1 - y) log(1 - s)), s the sigmoid, averaged over the 5 known entries, written out."""
        total, n = 0.0, 0
        for row_x, row_y in zip(self.logits.tolist(), self.targets.tolist()):
            for k, (x, y) in enumerate(zip(row_x, row_y)):
                if not math.isnan(y):
                    s = 1 / (1 + math.exp(-x))
                    total -= pos_weight[k] * y * math.log(s) + (1 - y) * math.log(1 - s)
                    n += 1
        return total / n

    def test_value(self):
        loss = MaskedBCEWithLogitsLoss()(self.logits, self.targets)
        assert loss.item() == pytest.approx(self.reference(), rel=1e-12)

    def test_unknown_entries_get_no_gradient(self):
        logits = self.logits.clone().requires_grad_()
        MaskedBCEWithLogitsLoss()(logits, self.targets).backward()
        unknown = self.targets.isnan()
        assert torch.all(logits.grad[unknown] == 0)
        known = ~unknown  # d/dx of the mean: (sigmoid(x) - y) / number known
        expected = (self.logits.sigmoid() - self.targets.nan_to_num())[known] / known.sum()
        torch.testing.assert_close(logits.grad[known], expected)

    def test_a_batch_with_nothing_known(self):
        logits = torch.randn(2, 3, requires_grad=True)
        loss = MaskedBCEWithLogitsLoss()(logits, torch.full((2, 3), NAN))
        loss.backward()
        assert loss.item() == 0.0 and torch.all(logits.grad == 0)

    def test_pos_weight(self):
        weight = [4.0, 1.0, 0.25]
        loss = MaskedBCEWithLogitsLoss(weight)(self.logits, self.targets)
        assert loss.item() == pytest.approx(self.reference(weight), rel=1e-6)
        assert loss.item() != pytest.approx(self.reference(), rel=1e-3)

    def test_criterion_by_task(self):
        assert type(make_criterion("multi")) is MaskedBCEWithLogitsLoss
        single = make_criterion("single", label_smoothing=0.1)
        assert type(single) is torch.nn.CrossEntropyLoss and single.label_smoothing == 0.1
        with pytest.raises(InputError, match="--pos-weight.*is for multi-label data"):
            make_criterion("single", pos_weight=torch.ones(2))
        with pytest.raises(InputError, match="task must be one of single, multi; got 'ordinal'"):
            make_criterion("ordinal")


class TestPosWeight:
    def test_values(self):
        weight = pos_weight_from_prevalence([0.5, 0.2, 0.9, 0.001, 0.0, 1.0, NAN])
        # (1 - p) / p: 1, 4, 1/9; 999 and inf clipped to 100; 0 clipped to 0.01; NaN (no labels) neutral
        expected = [1.0, 4.0, 1 / 9, POS_WEIGHT_RANGE[1], POS_WEIGHT_RANGE[1], POS_WEIGHT_RANGE[0], 1.0]
        assert weight.tolist() == pytest.approx(expected, rel=1e-6)
        assert weight.dtype == torch.float32

    def test_not_fractions(self):
        with pytest.raises(InputError, match=r"fractions in \[0, 1\]; got \[1.5\]"):
            pos_weight_from_prevalence([1.5])


class TestCountCorrect:
    def test_multi_label_at_one_half_over_known_entries(self):
        logits = torch.tensor([[1.0, -1.0, -1.0], [-0.5, 2.0, 3.0]])
        targets = torch.tensor([[1.0, 1.0, NAN], [0.0, NAN, 0.0]])
        right, counted = count_correct(logits, targets)
        # right: (0, 0) and (1, 0); wrong: (0, 1) and (1, 2); (0, 2) and (1, 1) unknown, whatever the prediction
        assert (right.item(), counted.item()) == (2, 4)
        right, counted = count_correct(torch.tensor([[0.0]]), torch.tensor([[1.0]]))
        assert right.item() == 1  # logit 0 is probability 0.5: called positive, as a threshold of 0.5 would

    def test_single_label_by_argmax(self):
        right, counted = count_correct(torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, 1.0]]), torch.tensor([1, 1, 1]))
        assert (int(right), counted) == (2, 3)


def test_scikit_learn_is_not_imported_by_training_or_its_metrics():
    """Validating an epoch costs no scikit-learn import (a second or more): the curves are numpy's."""
    code = ("import sys, numpy as np; import gray_effnet.engine, gray_effnet.evaluation, gray_effnet.run_report; "
            "from gray_effnet.metrics import finding_metrics; "
            "m = finding_metrics(np.array([[0.0], [1.0]]), np.array([[0.2], [0.7]])); "
            "print('sklearn' in sys.modules, m.auc[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "1.0"]


class TestAgainstScikitLearn:
    """The numpy curves against scikit-learn's on random scores with many ties, and on hand cases."""

    @pytest.fixture(params=[0, 1, 2])
    def case(self, request):
        rng = np.random.default_rng(request.param)
        n = [7, 200, 1000][request.param]
        labels = rng.random(n) < [0.4, 0.1, 0.5][request.param]
        labels[:2] = [True, False]  # both classes
        scores = np.round(rng.random(n), 1 + request.param)  # few distinct values: ties everywhere
        return labels, scores

    def test_roc_auc_and_average_precision(self, case):
        labels, scores = case
        assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), rel=1e-12)
        assert average_precision(labels, scores) == pytest.approx(average_precision_score(labels, scores),
                                                                  rel=1e-12)

    @pytest.mark.parametrize("drop", [True, False])
    def test_roc_curve(self, case, drop):
        labels, scores = case
        got, want = roc_curve(labels, scores, drop), sklearn_roc_curve(labels, scores, drop_intermediate=drop)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-12)

    def test_auc_is_the_pair_count(self):
        assert roc_auc(LABELS, SCORES) == pytest.approx(pair_auc(LABELS, SCORES))

    def test_one_class_is_an_error(self):
        with pytest.raises(ValueError, match="both positive and negative"):
            roc_curve(np.array([1, 1]), np.array([0.2, 0.3]))
        with pytest.raises(ValueError, match="a positive label"):
            average_precision(np.array([0, 0]), np.array([0.2, 0.3]))
