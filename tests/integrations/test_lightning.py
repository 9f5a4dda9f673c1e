"""eqlosses.integrations.lightning: the statistics callback and the group-accuracy metric."""

import csv
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lightning")
pytest.importorskip("torchmetrics")

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from eqlosses import SoftmaxEQLLoss  # noqa: E402
from eqlosses.data.frequency import lvis_groups, many_medium_few_groups  # noqa: E402
from eqlosses.integrations.lightning import (FrequencyGroupAccuracy,  # noqa: E402
                                             GradientStatisticsCallback,
                                             losses_with_statistics)
from eqlosses.metrics import ClassificationMetrics  # noqa: E402
from eqlosses.monitor import read_stats  # noqa: E402

C = 5
COUNTS = [150, 60, 30, 10, 5]  # many: 0; medium: 1, 2; few: 3, 4


def _data(seed=0, dim=8):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(C, dim, generator=g) * 2
    y = torch.cat([torch.full((n,), k) for k, n in enumerate(COUNTS)])
    x = centers[y] + torch.randn(len(y), dim, generator=g)
    return TensorDataset(x, y)


class Classifier(L.LightningModule):
    def __init__(self, criterion=None, dim=8):
        super().__init__()
        self.net = torch.nn.Linear(dim, C)
        self.criterion = criterion if criterion is not None else SoftmaxEQLLoss(C)
        self.acc = FrequencyGroupAccuracy(COUNTS)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.criterion(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.acc.update(self.net(x), y)

    def on_validation_epoch_end(self):
        self.log_dict({f"val/{k}": v for k, v in self.acc.compute().items()})
        self.acc.reset()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path, **kwargs):
    kwargs.setdefault("logger", CSVLogger(tmp_path))
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(accelerator="cpu", devices=1, enable_progress_bar=False,
                     enable_model_summary=False, deterministic=True, **kwargs)


# ---------------------------------------------------------------------------------------------
# FrequencyGroupAccuracy
# ---------------------------------------------------------------------------------------------

def test_group_accuracy_agrees_with_classification_metrics():
    g = torch.Generator().manual_seed(1)
    metric = FrequencyGroupAccuracy(COUNTS)
    reference = ClassificationMetrics(C, topk=(1,))
    for n in (7, 1, 30):  # several batches; the last class may get no sample in one
        logits = torch.randn(n, C, generator=g)
        targets = torch.randint(0, C, (n,), generator=g)
        metric.update(logits, targets)
        reference.update(logits, targets)
    got = metric.compute()
    expected = reference.compute(many_medium_few_groups(torch.tensor(COUNTS)))
    assert list(got) == ["many", "medium", "few", "balanced", "top1"]
    for name in ("many", "medium", "few"):
        assert float(got[name]) == pytest.approx(expected["groups"][name], abs=1e-6)
    assert float(got["balanced"]) == pytest.approx(expected["balanced_accuracy"], abs=1e-6)
    assert float(got["top1"]) == pytest.approx(expected["top1"], abs=1e-6)


def test_group_accuracy_by_hand_labels_ignore_and_state():
    metric = FrequencyGroupAccuracy([3, 200, 50], groups=lvis_groups(torch.tensor([3, 200, 50])))
    # predicted classes [N]; class 0 (rare): 1 of 2 right; class 2 (common): 0 of 1;
    # class 1 (frequent) never seen; the ignored sample counts nowhere
    metric.update(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 0, 2, -100]))
    out = {k: float(v) for k, v in metric.compute().items()}
    assert list(out) == ["frequent", "common", "rare", "balanced", "top1"]
    assert math.isnan(out["frequent"])
    assert out["common"] == 0.0 and out["rare"] == 0.5
    assert out["balanced"] == 0.25 and out["top1"] == pytest.approx(1 / 3)
    # the whole state: two per-class count vectors, summed across processes
    assert sorted(metric._defaults) == ["correct", "total"]
    assert metric._reductions["correct"] is metric._reductions["total"]
    metric.reset()
    assert int(metric.total.sum()) == 0


def test_group_accuracy_rejects_bad_input():
    metric = FrequencyGroupAccuracy(COUNTS)
    with pytest.raises(ValueError, match=r"targets must be in \[0, 5\)"):
        metric.update(torch.zeros(2, C), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"preds must be \[N, 5\]"):
        metric.update(torch.zeros(2, C + 1), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class_counts"):
        FrequencyGroupAccuracy([[1, 2]])


# ---------------------------------------------------------------------------------------------
# GradientStatisticsCallback
# ---------------------------------------------------------------------------------------------

def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_fit_with_csv_logger_writes_the_ratio_columns_and_the_statistics_file(tmp_path):
    from eqlosses.monitor.diagnosis import group_ratios

    torch.manual_seed(0)
    module = Classifier()
    data = DataLoader(_data(), batch_size=32, shuffle=True)
    trainer = _trainer(tmp_path, max_epochs=2, log_every_n_steps=1,
                       callbacks=[GradientStatisticsCallback(COUNTS, every_n_steps=3)])
    trainer.fit(module, data, DataLoader(_data(seed=1), batch_size=64))
    steps = trainer.global_step
    assert steps == 2 * math.ceil(sum(COUNTS) / 32)

    rows = _read_csv(Path(trainer.log_dir) / "metrics.csv")
    logged = [r for r in rows if r.get("grad_ratio/few")]
    assert [int(r["step"]) for r in logged] == list(range(3, steps, 3)) + [steps]
    stats = module.criterion.stats
    expected = group_ratios(stats, torch.tensor(COUNTS), many_medium_few_groups(
        torch.tensor(COUNTS)))
    assert sorted(expected) == ["few", "many", "medium"]
    for group, value in expected.items():
        assert float(logged[-1][f"grad_ratio/{group}"]) == pytest.approx(value, rel=1e-6)
    assert any(r.get("val/few") for r in rows)  # the metric logged through log_dict

    history = read_stats(Path(trainer.log_dir) / "stats.bin")
    assert history.steps.tolist() == [int(r["step"]) for r in logged]
    torch.testing.assert_close(torch.as_tensor(history.pos_grad[-1]),
                               stats.pos_grad.float(), rtol=1e-6, atol=0)


def test_callback_needs_a_loss_with_statistics(tmp_path):
    module = Classifier(criterion=torch.nn.CrossEntropyLoss())
    trainer = _trainer(tmp_path, max_steps=1, callbacks=[GradientStatisticsCallback(COUNTS)])
    with pytest.raises(ValueError, match="no loss with statistics"):
        trainer.fit(module, DataLoader(_data(), batch_size=32))
    wrong = _trainer(tmp_path, max_steps=1, callbacks=[GradientStatisticsCallback([1, 2, 3])])
    with pytest.raises(ValueError, match="statistics for 5 classes, class_counts has 3"):
        wrong.fit(Classifier(), DataLoader(_data(), batch_size=32))


def test_losses_with_statistics_finds_shared_and_baseline_losses():
    import inspect

    from eqlosses import CrossEntropyLoss

    module = torch.nn.Module()
    module.a = SoftmaxEQLLoss(C)
    module.b = SoftmaxEQLLoss(C, stats=module.a.stats)  # shares a's statistics: listed once
    module.c = torch.nn.Sequential(SoftmaxEQLLoss(C))
    assert [name for name, _ in losses_with_statistics(module)] == ["a", "c.0"]
    if "track_statistics" in inspect.signature(CrossEntropyLoss).parameters:
        module.d = CrossEntropyLoss(C, track_statistics=True)
        module.e = CrossEntropyLoss(C)
        assert [name for name, _ in losses_with_statistics(module)] == ["a", "c.0", "d"]


@pytest.mark.slow
def test_checkpoint_holds_the_statistics_and_resuming_restores_them_exactly(tmp_path):
    data = _data()

    def fit(epochs, root, ckpt_path=None, module=None):
        torch.manual_seed(0)
        module = module or Classifier()
        checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
        trainer = _trainer(root, max_epochs=epochs, enable_checkpointing=True,
                           callbacks=[checkpoint,
                                      GradientStatisticsCallback(COUNTS, every_n_steps=2)])
        L.seed_everything(0, verbose=False)
        trainer.fit(module, DataLoader(data, batch_size=32), ckpt_path=ckpt_path)
        return module, trainer

    full, _ = fit(2, tmp_path / "full")
    half, trainer = fit(1, tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "ckpt" / "last.ckpt", weights_only=True)
    saved = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("criterion.stats.")}
    assert sorted(saved) == ["criterion.stats.neg_grad", "criterion.stats.num_skipped",
                             "criterion.stats.num_updates", "criterion.stats.pos_grad"]
    assert torch.equal(saved["criterion.stats.pos_grad"], half.criterion.stats.pos_grad)
    assert int(saved["criterion.stats.num_updates"]) == trainer.global_step

    seen = {}

    class Spy(L.Callback):
        def on_train_start(self, trainer, module):
            seen["pos"] = module.criterion.stats.pos_grad.clone()

    fresh = Classifier()
    torch.manual_seed(0)
    trainer2 = _trainer(tmp_path / "run", max_epochs=2, logger=CSVLogger(tmp_path / "run"),
                        callbacks=[Spy(), GradientStatisticsCallback(COUNTS,
                                                                     every_n_steps=2)])
    L.seed_everything(0, verbose=False)
    trainer2.fit(fresh, DataLoader(data, batch_size=32),
                 ckpt_path=tmp_path / "run" / "ckpt" / "last.ckpt")
    assert torch.equal(seen["pos"], saved["criterion.stats.pos_grad"])  # restored exactly
    assert int(fresh.criterion.stats.num_updates) == int(full.criterion.stats.num_updates)
    assert torch.equal(fresh.criterion.stats.pos_grad, full.criterion.stats.pos_grad)
    assert torch.equal(fresh.criterion.stats.neg_grad, full.criterion.stats.neg_grad)


DDP_SCRIPT = textwrap.dedent('''
    import sys
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    sys.path.insert(0, sys.argv[2])
    from test_lightning import COUNTS, Classifier, _data
    from eqlosses.integrations.lightning import GradientStatisticsCallback

    out = sys.argv[1]
    torch.manual_seed(0)
    module = Classifier()
    labels = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            labels.append(batch[1])

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1,
                        logger=L.pytorch.loggers.CSVLogger(out), enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[Record(),
                                   GradientStatisticsCallback(COUNTS, every_n_steps=2)])
    trainer.fit(module, DataLoader(_data(), batch_size=16))
    rank = trainer.global_rank
    # each process counts its own half of a validation set; compute() syncs the counts
    x, y = _data(seed=1).tensors
    module.acc.reset()
    with torch.no_grad():
        module.acc.update(module.net(x[rank::2]), y[rank::2])
    stats = module.criterion.stats
    torch.save({"pos": stats.pos_grad, "neg": stats.neg_grad, "n": stats.num_updates,
                "labels": torch.cat(labels), "net": module.net.state_dict(),
                "acc": {k: v for k, v in module.acc.compute().items()}},
               f"{out}/rank{rank}.pt")
''')


@pytest.mark.slow
def test_ddp_two_processes_hold_identical_statistics(tmp_path):
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path),
                           str(Path(__file__).parent)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # each process trained on its own half of the data (DistributedSampler repeats one
    # sample to make the halves equal) ...
    seen = torch.bincount(torch.cat([r0["labels"], r1["labels"]]), minlength=C)
    extra = seen - torch.tensor(COUNTS)
    assert bool((extra >= 0).all()) and int(extra.sum()) == sum(COUNTS) % 2
    assert not torch.equal(r0["labels"], r1["labels"])
    # ... and both hold the same statistics (one all-reduce per step)
    assert int(r0["n"]) == int(r1["n"]) > 0
    assert torch.equal(r0["pos"], r1["pos"]) and torch.equal(r0["neg"], r1["neg"])
    # the metric, synced by torchmetrics, is that of the whole validation set on both
    net = torch.nn.Linear(8, C)
    net.load_state_dict(r0["net"])
    x, y = _data(seed=1).tensors
    reference = ClassificationMetrics(C, topk=(1,))
    with torch.no_grad():
        reference.update(net(x), y)
    expected = reference.compute(many_medium_few_groups(torch.tensor(COUNTS)))
    for r in (r0, r1):
        assert float(r["acc"]["top1"]) == pytest.approx(expected["top1"], abs=1e-6)
        for group in ("many", "medium", "few"):
            assert float(r["acc"][group]) == pytest.approx(expected["groups"][group],
                                                           abs=1e-6)
    # rank 0 alone wrote the statistics file
    files = list(tmp_path.rglob("stats.bin"))
    assert len(files) == 1
    assert read_stats(files[0]).steps[-1] > 0
