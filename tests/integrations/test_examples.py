"""The framework recipes under examples/ (tiny mode, offline) and the README's
"Integrations" snippets.

The README snippets (```py blocks) are tested in one of two ways: a snippet whose first line names an example
file (``# examples/<name>.py``) must consist of that example's own lines, in order (the example
itself is run below); any other snippet is run as it is.
"""

import importlib.util
import math
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def _load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# The examples, in their tiny mode
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("loss", ["softmax_eql", "ce"])
def test_lightning_example(tmp_path, loss):
    pytest.importorskip("lightning")
    from eqlosses.monitor import read_stats

    results = _load_example("lightning_fmnist_lt").main(["--tiny", "--loss", loss,
                                                         "--out", str(tmp_path)])
    for key in ("val/many", "val/medium", "val/few", "val/balanced", "val/top1"):
        assert 0.0 <= results[key] <= 1.0
    for group in ("many", "medium", "few"):
        assert math.isfinite(results[f"grad_ratio/{group}"])
    log_dir = tmp_path / "lightning_logs" / "version_0"
    header = (log_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"grad_ratio/many", "grad_ratio/medium", "grad_ratio/few", "val/few"} <= set(header)
    history = read_stats(log_dir / "stats.bin")
    assert len(history) >= 1 and history.steps[-1] == 10  # 2 epochs of 5 batches


@pytest.mark.slow
def test_timm_example():
    pytest.importorskip("timm")
    out = _load_example("timm_softmax_eql").main(["--tiny"])
    assert out["updates"] == 4  # 310 images, batches of 64, one epoch
    assert 0.0 <= out["top1"] <= 1.0
    assert math.isfinite(out["head_ratio"]) and math.isfinite(out["tail_ratio"])


@pytest.mark.slow
def test_timm_example_with_mixup_probability_targets():
    pytest.importorskip("timm")
    out = _load_example("timm_softmax_eql").main(["--tiny", "--mixup"])
    assert out["updates"] == 4
    assert math.isfinite(out["head_ratio"]) and math.isfinite(out["tail_ratio"])


@pytest.mark.slow
def test_hf_trainer_example(monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = _load_example("hf_trainer_softmax_eql").main(["--tiny"])
    assert out["updates"] == 4  # four training steps; evaluation forwards do not update
    assert 0.0 <= out["top1"] <= 1.0
    assert math.isfinite(out["tail_ratio"])


@pytest.mark.slow
def test_hf_compute_loss_func_divides_the_summed_loss_by_the_items(monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from types import SimpleNamespace

    from eqlosses import SoftmaxEQLLoss

    example = _load_example("hf_trainer_softmax_eql")
    model = torch.nn.Module()
    compute_loss = example.softmax_eql_loss_func(model, num_classes=4)
    assert isinstance(model.eqlosses_loss, SoftmaxEQLLoss)  # moved and saved with the model
    model.eqlosses_loss.eval()  # the same statistics (none yet) for every call below
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, -100])
    reference = SoftmaxEQLLoss(4).eval()  # the mean over the labelled rows
    expected = reference(logits, labels)
    got = compute_loss(SimpleNamespace(logits=logits), labels)
    torch.testing.assert_close(got, expected)
    # with gradient accumulation the Trainer passes the items of all micro-batches
    got = compute_loss(SimpleNamespace(logits=logits), labels, num_items_in_batch=10)
    torch.testing.assert_close(got, expected * 5 / 10)


# ---------------------------------------------------------------------------------------------
# The README's "Integrations" section
# ---------------------------------------------------------------------------------------------

def _integration_snippets():
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## Integrations\n")
    end = text.index("\n## ", start + 1)
    # ```py, not ```python: tests/test_cli.py runs every ```python block of the README in the
    # quick loop; these snippets are run (or checked against the examples) here
    return re.findall(r"```py\n(.*?)```", text[start:end], flags=re.S)


def test_readme_integrations_section_has_a_snippet_per_host():
    snippets = _integration_snippets()
    joined = "\n".join(snippets)
    for needle in ("eqlosses.integrations.lightning", "eqlosses.integrations.torchvision",
                   "timm", "compute_loss_func"):
        assert needle in joined, needle


def _example_lines(name):
    return [line.strip() for line in (ROOT / name).read_text().splitlines()]


def test_readme_snippets_from_the_examples_are_their_lines():
    checked = 0
    for snippet in _integration_snippets():
        first = snippet.splitlines()[0]
        match = re.fullmatch(r"# (examples/\w+\.py).*", first)
        if not match:
            continue
        lines = _example_lines(match.group(1))
        position = 0
        for line in snippet.splitlines()[1:]:
            line = line.strip()
            if not line or line == "...":
                continue
            try:
                position = lines.index(line, position) + 1
            except ValueError:
                pytest.fail(f"README snippet line not in {match.group(1)} (in this order): "
                            f"{line!r}")
        checked += 1
    assert checked >= 2


def _runnable_snippets():
    return [s for s in _integration_snippets()
            if not re.fullmatch(r"# (examples/\w+\.py).*", s.splitlines()[0])]


@pytest.mark.slow
@pytest.mark.parametrize("index", range(2))
def test_readme_runnable_snippets_run(index, tmp_path, monkeypatch):
    snippets = _runnable_snippets()
    assert len(snippets) == 2  # torchvision and timm
    snippet = snippets[index]
    for module in re.findall(r"^(?:from|import) (\w+)", snippet, flags=re.M):
        pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(snippet, f"README.md snippet {index}", "exec"), {"__name__": "__readme__"})


@pytest.mark.slow
def test_hf_trainer_checkpoint_holds_the_loss_statistics_and_resuming_restores_them(
        tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import Trainer, TrainerCallback, TrainingArguments

    example = _load_example("hf_trainer_softmax_eql")
    seen = {}

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen["pos"] = model.eqlosses_loss.stats.pos_grad.clone()

    def run(steps, resume=None):
        torch.manual_seed(0)
        model = example.tiny_vit()
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, save_steps=2,
                                 per_device_train_batch_size=32, report_to=[], use_cpu=True,
                                 disable_tqdm=True)
        trainer = Trainer(model=model, args=args, callbacks=[Spy()],
                          train_dataset=example.EmbeddedFashionMNIST("train", 8),
                          compute_loss_func=example.softmax_eql_loss_func(model))
        trainer.train(resume_from_checkpoint=resume)
        return model.eqlosses_loss.stats

    saved = run(2)
    saved_pos, saved_updates = saved.pos_grad.clone(), int(saved.num_updates)
    assert saved_updates == 2
    resumed = run(4, resume=str(tmp_path / "checkpoint-2"))
    assert torch.equal(seen["pos"], saved_pos)  # loaded from the checkpoint exactly
    assert int(resumed.num_updates) == 4
