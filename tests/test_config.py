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


# --------------------------------------------------------------------------------------------
# Resuming from a run's saved configuration
# --------------------------------------------------------------------------------------------

RUN = ["optim.epochs=2", "data.batch_size=512", "loss.name=balanced_softmax", "loss.tau=2",
       "model.width=8", "progress=true", "name=r"]


def _saved_run(tmp_path, *extra, task=None, base=RUN):
    """A run directory holding the config.yaml that a run started with ``base`` would write."""
    cfg = load_config(None, [*base, *extra, f"output_dir={tmp_path}"], task=task)
    save_config(cfg, tmp_path / "r" / "config.yaml")
    return tmp_path / "r", cfg


def _resume(run_dir, path=None, overrides=(), task=None):
    from eqlosses.config import resume_config

    given = load_config(path, list(overrides), task=task, check=False)  # as the command does
    return resume_config(run_dir, given, path, list(overrides))


def test_resume_takes_the_run_configuration_without_repeating_it(tmp_path):
    run_dir, original = _saved_run(tmp_path)
    cfg = _resume(run_dir)  # nothing given again: the defaults (30 epochs...) do not count
    assert to_dict(cfg) == to_dict(original)
    assert cfg.optim.epochs == 2 and cfg.loss.kwargs == {"tau": 2}
    # settings that agree with the run are accepted, whatever their spelling
    same = _resume(run_dir, overrides=["optim.epochs=2", "loss.tau=2.0", "data.batch_size=512",
                                       "optim={epochs: 2}", "model.width=8"])
    assert to_dict(same) == to_dict(original)


def test_resume_applies_the_settings_that_may_change(tmp_path):
    run_dir, original = _saved_run(tmp_path)
    cfg = _resume(run_dir, overrides=["device=cpu", "progress=false", "data.num_workers=2",
                                      "data.eval_batch_size=64", "log_every=1",
                                      "tensorboard=false"])
    assert (cfg.device, cfg.progress, cfg.data.num_workers, cfg.data.eval_batch_size,
            cfg.log_every, cfg.tensorboard) == ("cpu", False, 2, 64, 1, False)
    assert cfg.optim.epochs == 2 and cfg.data.batch_size == 512  # the rest is the run's
    with pytest.raises(ConfigError, match="data.num_workers must be >= 0"):
        _resume(run_dir, overrides=["data.num_workers=-1"])


def test_resume_refuses_conflicting_settings_naming_both_values(tmp_path):
    run_dir, _ = _saved_run(tmp_path)
    with pytest.raises(ConfigError) as err:
        _resume(run_dir, overrides=["optim.epochs=3", "data.batch_size=512",
                                    "loss.tau=1.5", "seed=0"])
    msg = str(err.value)
    assert "optim.epochs=3 (from --set optim.epochs=3) but the run has optim.epochs=2" in msg
    assert "loss.tau=1.5" in msg and "loss.tau=2" in msg
    assert "batch_size=512 (" not in msg and "seed" not in msg.split(". To continue")[0]
    assert "drop these settings" in msg and "--overwrite" in msg and "name=NEW" in msg
    assert "device" in msg and "data.num_workers" in msg  # what may change
    with pytest.raises(ConfigError, match="loss.name=ce .* but the run has loss.name="
                                          "balanced_softmax"):
        _resume(run_dir, overrides=["loss.name=ce"])


def test_resume_compares_the_config_file_and_the_loss_defaults(tmp_path):
    run_dir, _ = _saved_run(tmp_path)
    edited = tmp_path / "edited.yaml"
    edited.write_text("optim:\n  epochs: 2\n  lr: 0.1\nloss:\n  name: balanced_softmax\n")
    with pytest.raises(ConfigError, match=f"optim.lr=0.1 \\(from {edited}\\) but the run has "
                                          f"optim.lr=0.05"):
        _resume(run_dir, path=edited)
    edited.write_text("optim:\n  epochs: 2\ndata:\n  batch_size: 512\noutput_dir: elsewhere\n")
    assert _resume(run_dir, path=edited).optim.epochs == 2  # agrees; output_dir only locates
    # A loss argument the run did not set: the loss's default is what the run used.
    run_dir, _ = _saved_run(tmp_path / "eql", base=["loss.name=softmax_eql", "name=r"])
    assert _resume(run_dir, overrides=["loss.tau=1.0"]).loss.kwargs == {}
    with pytest.raises(ConfigError, match="loss.tau=1.5 .* no loss.tau \\(the loss's default "
                                          "1.0 applied\\)"):
        _resume(run_dir, overrides=["loss.tau=1.5"])
    # an argument of the run's loss, which the default loss does not take, is compared too
    run_dir, _ = _saved_run(tmp_path / "eqls", base=["loss.name=eql_softmax", "loss.lambda_=0.05",
                                                     "name=r"])
    assert _resume(run_dir, overrides=["loss.lambda_=0.05"]).loss.kwargs == {"lambda_": 0.05}
    with pytest.raises(ConfigError, match="loss.lambda_=0.1 .* loss.lambda_=0.05"):
        _resume(run_dir, overrides=["loss.lambda_=0.1"])


def test_resume_errors_name_the_run_directory(tmp_path):
    with pytest.raises(ConfigError, match=f"no run to resume in {tmp_path / 'none'}: "
                                          f".*config.yaml does not exist"):
        _resume(tmp_path / "none")
    run_dir, _ = _saved_run(tmp_path, task="det", base=["loss.name=sigmoid_eql", "name=r"])
    with pytest.raises(ConfigError, match="holds a 'det' run, not a 'cls' one: resume it with "
                                          "`eqlosses train det --resume --run"):
        _resume(run_dir)
