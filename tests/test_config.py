import pytest

from eqlosses.config import (ClassificationConfig, ConfigError, from_dict, load_config,
                             save_config, to_dict)


def test_defaults_file_and_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("seed: 3\noptim:\n  lr: 0.2\n  milestones: [5, 8]\nloss:\n  name: "
                    "balanced_softmax\n  tau: 2\n")
    cfg = load_config(path, ["optim.lr=0.3", "loss.tau=1.5", "model.cosine=true",
                             "data.n_max=null"])
    assert cfg.seed == 3 and cfg.optim.lr == 0.3 and cfg.optim.milestones == [5, 8]
    assert cfg.loss.name == "balanced_softmax" and cfg.loss.kwargs == {"tau": 1.5}
    assert cfg.model.cosine is True and cfg.data.n_max is None
    assert cfg.optim.epochs == ClassificationConfig().optim.epochs  # untouched default


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["loss.name=softmax_eql", "loss.tau=0.5", "data.sampler=rfs"])
    path = save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(path)
    assert to_dict(again) == to_dict(cfg)
    assert to_dict(from_dict(to_dict(cfg))) == to_dict(cfg)


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown key 'lrr'.*valid keys: .*lr"),
    ("optim.lr=fast", "expected a number"),
    ("model.cosine=3", "expected true or false"),
    ("optim.epochs=2.5", "expected an integer"),
    ("data=3", "is a section"),
    ("seed.x=1", "not a section"),
    ("loss.tau", "expected key=value"),
    ("optim.epochs=null", "null is not allowed"),
])
def test_bad_overrides_say_what_to_fix(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_shipped_configs_are_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(configs) >= 3
    for path in configs:
        cfg = load_config(path)
        assert cfg.loss.name and cfg.optim.epochs > 0, path


@pytest.mark.parametrize("override, message", [
    ("log_every=0", "log_every must be >= 1"),
    ("eval.every_epochs=0", "eval.every_epochs must be >= 1"),
    ("data.batch_size=0", "data.batch_size must be >= 1"),
    ("optim.epochs=-3", "optim.epochs must be >= 1"),
    ("optim.lr=0", "optim.lr must be > 0"),
    ("loss.name=3", "expected a string"),
    ("optim.milestones=[a]", "list of integers"),
    ("eval.few_below=500", "must not exceed"),
])
def test_values_out_of_range_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_task_configs_come_from_the_file_or_the_command(tmp_path):
    from eqlosses.config import DetectionConfig, SegmentationConfig

    det_file = tmp_path / "det.yaml"
    det_file.write_text("task: det\nmodel:\n  arch: retinanet\nloss:\n  name: efl\n")
    cfg = load_config(det_file)
    assert isinstance(cfg, DetectionConfig) and cfg.model.arch == "retinanet"
    assert cfg.eval.score_thresh == 1e-4 and cfg.eval.detections_per_img == 300  # LVIS
    with pytest.raises(ConfigError, match="'det' configuration, but a 'seg'"):
        load_config(det_file, task="seg")
    seg = load_config(None, ["model.options.width=16", "eval.head_above=0.05"], task="seg")
    assert isinstance(seg, SegmentationConfig) and seg.model.options == {"width": 16}
    with pytest.raises(ConfigError, match="tail_below"):
        load_config(None, ["eval.tail_below=0.5"], task="seg")
    with pytest.raises(ConfigError, match="unknown key 'arch'"):
        load_config(None, ["model.arch=x"], task="cls")
    with pytest.raises(ConfigError, match="unknown task"):
        load_config(None, task="pose")
