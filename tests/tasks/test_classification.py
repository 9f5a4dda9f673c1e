"""The classification pipeline on the embedded data, at tiny sizes (seconds each)."""

import json
import os

import pytest
import torch

from eqlosses.config import load_config
from eqlosses.monitor.recorder import read_stats
from eqlosses.tasks import classification as cls
from eqlosses.tasks.common import Progress, load_checkpoint
from tests.dist_utils import free_port, spawn_and_wait

#: pipeline tests (they train models): outside the quick loop, run by CI
pytestmark = pytest.mark.slow

TINY = ["model.width=4", "data.batch_size=256", "data.eval_batch_size=1000", "optim.epochs=2",
        "optim.warmup_epochs=0", "progress=false", "tensorboard=false", "log_every=1",
        "stats_every=1"]


def _cfg(tmp_path, *extra, name="run"):
    return load_config(None, TINY + [f"output_dir={tmp_path}", f"name={name}", *extra])


def _state(run_dir):
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    return ckpt["model"], ckpt["criterion"], ckpt


def ckpt_steps(run_dir):
    return load_checkpoint(run_dir / "checkpoint.pt")["step"]


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _assert_loss_went_down(run_dir):
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "step"]
    assert len(losses) >= 8 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3])


def test_train_writes_outputs_and_sensible_metrics(tmp_path):
    cfg = _cfg(tmp_path, "loss.name=softmax_eql")
    result = cls.train(cfg)
    run = tmp_path / "run"
    for name in ("config.yaml", "log.jsonl", "stats.bin", "checkpoint.pt", "metrics.json"):
        assert (run / name).is_file(), name
    m = result["metrics"]
    assert 0.15 < m["top1"] <= 1.0  # two tiny epochs beat chance (0.1) on the balanced test
    assert set(m["groups"]) == {"few", "medium", "many"}
    assert len(m["per_class_accuracy"]) == 10
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["metrics"]["top1"] == m["top1"]
    kinds = [json.loads(line)["kind"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert kinds[0] == "start" and kinds.count("eval") == 2
    _, criterion, ckpt = _state(run)
    assert int(criterion["stats.num_updates"]) == ckpt["step"] > 0
    with pytest.raises(FileExistsError, match="--resume"):
        cls.train(cfg)


def test_resume_after_an_epoch_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    straight = _cfg(tmp_path, name="straight")
    cls.train(straight)
    split = _cfg(tmp_path, name="split")

    def stop(*args, **kwargs):  # killed right after the end-of-epoch checkpoint
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(cls, "evaluate", stop)
        with pytest.raises(KeyboardInterrupt):
            cls.train(split)
    assert load_checkpoint(tmp_path / "split" / "checkpoint.pt")["epoch"] == 1
    cls.train(split, resume=True)
    a_model, a_crit, _ = _state(tmp_path / "straight")
    b_model, b_crit, _ = _state(tmp_path / "split")
    _assert_same(a_model, b_model)
    _assert_same(a_crit, b_crit)


@pytest.mark.parametrize("how", ["ctrl-c", "kill"])
def test_a_run_stopped_mid_epoch_resumes_exactly(tmp_path, monkeypatch, how):
    straight = _cfg(tmp_path, "checkpoint_every_steps=2", name="straight")
    cls.train(straight)
    stopped = _cfg(tmp_path, "checkpoint_every_steps=2", name="stopped")
    original = Progress.update
    calls = {"n": 0}

    def stop_at_step_5(self, done, samples, **values):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt if how == "ctrl-c" else RuntimeError("killed")
        return original(self, done, samples, **values)

    monkeypatch.setattr(Progress, "update", stop_at_step_5)
    with pytest.raises(KeyboardInterrupt if how == "ctrl-c" else RuntimeError):
        cls.train(stopped)
    monkeypatch.setattr(Progress, "update", original)
    ckpt = load_checkpoint(tmp_path / "stopped" / "checkpoint.pt")
    # Ctrl-C saves at the step it interrupted; a kill loses only the steps since step 4
    assert ckpt["step"] == (5 if how == "ctrl-c" else 4)
    cls.train(stopped, resume=True)
    a_model, a_crit, _ = _state(tmp_path / "straight")
    b_model, b_crit, _ = _state(tmp_path / "stopped")
    _assert_same(a_model, b_model)
    _assert_same(a_crit, b_crit)


def test_incompatible_checkpoint_and_bad_choices_are_clear_errors(tmp_path):
    cls.train(_cfg(tmp_path, "optim.epochs=1", "loss.name=ce", name="ce"))
    with pytest.raises(ValueError, match="loss.name 'ce' in the checkpoint"):
        cls.train(_cfg(tmp_path, "optim.epochs=1", "loss.name=focal", name="ce"), resume=True)
    with pytest.raises(ValueError,
                       match="does not fit the cls head.*losses that fit: balanced_softmax"):
        cls.train(_cfg(tmp_path, "loss.name=seesaw", name="x"))
    with pytest.raises(ValueError, match="unknown loss"):
        cls.train(_cfg(tmp_path, "loss.name=eqlv9", name="y"))
    with pytest.raises(ValueError, match="takes no argument .taus.; its arguments: eps"):
        cls.train(_cfg(tmp_path, "loss.name=softmax_eql", "loss.taus=2", name="z"))
    with pytest.raises(ValueError, match="unknown model"):
        cls.train(_cfg(tmp_path, "model.name=vgg", name="w"))


@pytest.mark.parametrize("loss", ["ce", "balanced_softmax", "sigmoid_eql", "efl", "eql",
                                  "eql_softmax", "federated", "focal", "bce"])
def test_every_classification_loss_trains(tmp_path, loss):
    cls.train(_cfg(tmp_path, "optim.epochs=1", f"loss.name={loss}", name=loss))
    _assert_loss_went_down(tmp_path / loss)


@pytest.mark.parametrize("sampler", ["class_balanced", "sqrt", "rfs"])
def test_samplers_and_cosine_classifier(tmp_path, sampler):
    cfg = _cfg(tmp_path, "optim.epochs=1", f"data.sampler={sampler}", "model.cosine=true",
               "data.rfs_threshold=0.2", name=sampler)
    cls.train(cfg)
    _assert_loss_went_down(tmp_path / sampler)


def test_evaluate_checkpoint_reproduces_the_final_metrics(tmp_path):
    result = cls.train(_cfg(tmp_path, "optim.epochs=1", name="e"))
    metrics, _ = cls.evaluate_checkpoint(tmp_path / "e" / "checkpoint.pt", "cpu")
    assert metrics["top1"] == result["metrics"]["top1"]




def _ddp_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cfg = load_config(None, TINY + ["optim.epochs=1", f"output_dir={out_dir}", "name=ddp"])
    result = cls.train(cfg)
    import torch.distributed as dist

    crit = load_checkpoint(os.path.join(out_dir, "ddp", "checkpoint.pt"))["criterion"] \
        if rank == 0 else None
    torch.save({"metrics": result["metrics"], "criterion": crit}, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_two_processes_train_and_evaluate_without_double_counting(tmp_path):
    spawn_and_wait(_ddp_worker, (free_port(), str(tmp_path)), 2, 300, "2-process training")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["metrics"] == r1["metrics"]  # the all-reduced evaluation is the same everywhere
    assert r0["metrics"]["num_samples"] == 3000  # every test image counted exactly once
    assert int(r0["criterion"]["stats.num_updates"]) > 0


def test_bfloat16_autocast_and_gradient_clipping(tmp_path):
    cfg = _cfg(tmp_path, "optim.epochs=1", "optim.amp=bf16", "optim.grad_clip=1.0",
               "optim.schedule=step", "optim.name=adamw", "optim.lr=0.003", name="amp")
    cls.train(cfg)
    _assert_loss_went_down(tmp_path / "amp")
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        cls.train(_cfg(tmp_path, "optim.amp=fp16", name="fp16"))


def test_ctrl_c_during_a_step_finishes_the_step_then_saves(tmp_path, monkeypatch):
    import signal

    straight = _cfg(tmp_path, name="straight")
    cls.train(straight)
    stopped = _cfg(tmp_path, name="stopped")
    original = torch.optim.SGD.zero_grad
    calls = {"n": 0}

    def sigint_in_step_5(self, *args, **kwargs):  # a real Ctrl-C between forward and backward
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "zero_grad", sigint_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        cls.train(stopped)
    monkeypatch.setattr(torch.optim.SGD, "zero_grad", original)
    ckpt = load_checkpoint(tmp_path / "stopped" / "checkpoint.pt")
    assert ckpt["step"] == 5 and int(ckpt["criterion"]["stats.num_updates"]) == 5
    cls.train(stopped, resume=True)
    _assert_same(_state(tmp_path / "straight")[0], _state(tmp_path / "stopped")[0])
    steps = read_stats(tmp_path / "stopped").steps.tolist()
    assert steps == sorted(set(steps)) and steps[-1] == ckpt_steps(tmp_path / "stopped")


def test_stochastic_loss_resumes_exactly_across_evaluation(tmp_path, monkeypatch):
    extra = ("loss.name=eql_softmax", "loss.lambda_=0.05")
    cls.train(_cfg(tmp_path, *extra, name="straight"))

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(cls, "evaluate", stop)
        with pytest.raises(KeyboardInterrupt):
            cls.train(_cfg(tmp_path, *extra, name="split"))
    cls.train(_cfg(tmp_path, *extra, name="split"), resume=True)
    _assert_same(_state(tmp_path / "straight")[0], _state(tmp_path / "split")[0])


def test_resume_with_another_sample_order_is_refused(tmp_path, monkeypatch):
    cls.train(_cfg(tmp_path, "optim.epochs=1", name="r"))
    with pytest.raises(ValueError, match="batch_size 256 in the checkpoint, 128 now"):
        cls.train(_cfg(tmp_path, "optim.epochs=1", "data.batch_size=128", name="r"),
                  resume=True)


def test_a_user_loss_that_declares_traits_trains_in_the_pipeline(tmp_path):
    loss = "tests.losses.test_contract:SquaredHingeLoss"
    cfg = _cfg(tmp_path, f"loss.name={loss}", "loss.margin=0.5", "optim.epochs=1", name="u")
    result = cls.train(cfg)
    assert 0.0 <= result["metrics"]["top1"] <= 1.0
    assert load_checkpoint(tmp_path / "u" / "checkpoint.pt")["config"]["loss"] == {
        "name": loss, "margin": 0.5}
    with pytest.raises(ValueError, match="margin must be a number >= 0"):
        _cfg(tmp_path, f"loss.name={loss}", "loss.margin=-1")


def test_validation_split_is_carved_from_the_training_data(tmp_path):
    plain = cls.build_data(_cfg(tmp_path))
    held = cls.build_data(_cfg(tmp_path, "data.val_fraction=0.1", "data.val_seed=3"))
    # the default evaluates on the test set (3,000 images); the hold-out is 10% of each class
    # of the 2,478 training images (at least one), and the training set loses exactly those
    assert len(plain.val) == 3000 and len(plain.train) == 2478
    val_counts = torch.bincount(torch.tensor([held.val[i][1] for i in range(len(held.val))]),
                                minlength=10)
    assert val_counts.tolist() == [100, 60, 36, 22, 13, 8, 5, 3, 2, 1]
    train_counts = torch.bincount(torch.as_tensor(held.train_labels), minlength=10)
    assert (train_counts + val_counts).tolist() == [1000, 599, 359, 215, 129, 77, 46, 27, 16,
                                                    10]
    # the validation images are training images, none of them kept for training
    train_images = {plain.train.base[i][0].numpy().tobytes() for i in range(len(plain.train))}
    kept = {held.train.base[i][0].numpy().tobytes() for i in range(len(held.train))}
    val_images = {held.val[i][0].numpy().tobytes() for i in range(len(held.val))}
    assert val_images <= train_images and not val_images & kept
    again = cls.build_data(_cfg(tmp_path, "data.val_fraction=0.1", "data.val_seed=3"))
    assert torch.equal(torch.stack([again.val[i][0] for i in range(20)]),
                       torch.stack([held.val[i][0] for i in range(20)]))


def test_validation_split_choices_are_checked(tmp_path):
    from eqlosses.config import ConfigError

    with pytest.raises(ConfigError, match="one of them"):
        _cfg(tmp_path, "data.val_fraction=0.1", "data.val_per_class=5")
    with pytest.raises(ConfigError, match="val_fraction"):
        _cfg(tmp_path, "data.val_fraction=1.0")
    with pytest.raises(ValueError, match="fashion_mnist only"):
        cls.build_data(_cfg(tmp_path, "data.val_per_class=5"))


def test_training_with_a_validation_split_evaluates_on_it(tmp_path):
    result = cls.train(_cfg(tmp_path, "optim.epochs=1", "data.val_fraction=0.2", name="v"))
    rows = torch.tensor(result["metrics"]["confusion_matrix"]).sum(dim=1)
    assert rows.tolist() == [200, 120, 72, 43, 26, 15, 9, 5, 3, 2]
    # resuming with another split is refused (the training set differs)
    with pytest.raises(ValueError, match="val_fraction"):
        cls.train(_cfg(tmp_path, "optim.epochs=2", "data.val_fraction=0.3", name="v"),
                  resume=True)
