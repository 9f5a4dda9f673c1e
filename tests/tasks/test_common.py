"""Checkpoints, RNG states, logs and collective errors of tasks/common.py (quick: no training,
no processes)."""

import errno
import io
import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from eqlosses import cli
from eqlosses.tasks import common
from eqlosses.tasks.common import (CheckpointWriteError, CollectiveError, collective_errors,
                                   load_checkpoint, rng_state, save_checkpoint, set_rng_state,
                                   truncate_jsonl)


# --------------------------------------------------------------------------------------------
# Untrusted checkpoint files
# --------------------------------------------------------------------------------------------

def _plant_marker(path):
    """What a malicious checkpoint runs when it is unpickled: leaves a file behind."""
    with open(path, "w") as fh:
        fh.write("this code ran")
    return {}


class _RunsCode:
    """Unpickles as a call of ``func(*args)``: what a hostile checkpoint holds."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _hostile_file(tmp_path, how, marker):
    payload = {"format": "eqlosses-cls-1", "model": {"w": torch.zeros(2)},
               "config": _RunsCode(_plant_marker, str(marker))}
    if how == "os.system":
        payload["config"] = _RunsCode(os.system, f"touch {marker}")
    path = tmp_path / f"hostile-{how}.pt"
    if how == "legacy-torch-format":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    elif how == "plain-pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    return path


@pytest.mark.parametrize("how", ["function", "os.system", "legacy-torch-format"])
def test_a_checkpoint_that_would_run_code_is_not_loaded(tmp_path, how):
    marker = tmp_path / "pwned"
    path = _hostile_file(tmp_path, how, marker)
    # the control: a plain torch.load really runs the file's code
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    assert not marker.exists()
    message = str(info.value)
    assert str(path) in message
    assert "not loaded" in message and "outside what eqlosses checkpoints contain" in message
    assert "could run arbitrary code" in message
    found = "system" if how == "os.system" else "_plant_marker"
    assert found in message.split("Found:")[1]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_plain_pickle_is_not_loaded_either(tmp_path):
    marker = tmp_path / "pwned"
    path = _hostile_file(tmp_path, "plain-pickle", marker)
    with pytest.raises(ValueError, match="cannot be read .Unsupported operand"):
        load_checkpoint(path)
    assert not marker.exists()


def test_eval_command_refuses_a_hostile_checkpoint_in_one_line(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = _hostile_file(tmp_path, "function", marker)
    assert cli.main(["eval", "--checkpoint", str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert err.startswith("eqlosses: error: ") and err.count("\n") == 1
    assert "could run arbitrary code" in err and "_plant_marker" in err


def test_files_that_are_not_checkpoints_are_clear_errors(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="not an eqlosses checkpoint: it holds a Tensor"):
        load_checkpoint(tmp_path / "tensor.pt")
    save_checkpoint(tmp_path / "ok.pt", {"w": torch.arange(10000)})
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.pt cannot be read.*truncated"):
        load_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("hi")  # torch's own error is a bare KeyError(104)
    with pytest.raises(ValueError, match=r"text.pt cannot be read as a torch file \(KeyError"):
        load_checkpoint(tmp_path / "text.pt")


def test_eval_names_what_a_dict_without_our_format_holds(tmp_path, capsys):
    torch.save({"a": 1, "state_dict": {}}, tmp_path / "other.pt")
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "other.pt"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "not an eqlosses checkpoint: it has no 'format' entry" in err
    assert "'a', 'state_dict'" in err


# --------------------------------------------------------------------------------------------
# RNG states: plain data now, numpy objects in checkpoints of earlier versions
# --------------------------------------------------------------------------------------------

def _draws():
    return random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist()


def test_rng_states_are_plain_data_and_round_trip_exactly(tmp_path):
    np.random.seed(1)
    np.random.randn()  # an odd count of normals leaves a cached gaussian in the state
    state = rng_state()
    assert state["numpy"]["has_gauss"] == 1
    expected = _draws()
    save_checkpoint(tmp_path / "c.pt", {"rng": [state]})
    # nothing to allow-list: torch's own weights_only loader reads it as it is
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(tmp_path / "c.pt")) == []
    torch.load(tmp_path / "c.pt", weights_only=True)
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"][0])
    assert _draws() == expected


def test_a_checkpoint_of_an_earlier_version_with_numpy_rng_objects_loads(tmp_path):
    old = {"python": random.getstate(), "numpy": np.random.get_state(),
           "torch": torch.get_rng_state()}
    expected = _draws()
    torch.save({"format": "eqlosses-cls-1", "rng": [old]}, tmp_path / "old.pt")
    # it does hold numpy globals, which a plain weights_only load refuses ...
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(tmp_path / "old.pt"))
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "old.pt", weights_only=True)
    # ... and load_checkpoint allows exactly those
    ckpt = load_checkpoint(tmp_path / "old.pt")
    set_rng_state(ckpt["rng"][0])
    assert _draws() == expected


def test_numpy_objects_other_than_the_rng_state_arrays_are_refused(tmp_path):
    torch.save({"x": np.random.RandomState(0)}, tmp_path / "rs.pt")
    with pytest.raises(ValueError, match="not loaded.*Found: .*randomstate_ctor"):
        load_checkpoint(tmp_path / "rs.pt")


# --------------------------------------------------------------------------------------------
# Writing checkpoints: atomic, and a full disk leaves the previous one intact
# --------------------------------------------------------------------------------------------

def _half_written_then(error, real_save=torch.save):
    def save(obj, fh, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf)
        fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise error
    return save


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_a_full_disk_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch, where):
    path = tmp_path / "run" / "checkpoint.pt"
    save_checkpoint(path, {"format": "eqlosses-cls-1", "step": 2, "w": torch.arange(1000)})
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if where == "write":
        monkeypatch.setattr(torch, "save", _half_written_then(full))
    else:  # the data reaches the disk at the flush: the error comes there
        def fsync(fd):
            raise full
        monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(CheckpointWriteError) as info:
        save_checkpoint(path, {"format": "eqlosses-cls-1", "step": 4, "w": torch.arange(1000)})
    monkeypatch.undo()
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    message = str(info.value)
    assert f"cannot write the checkpoint {path}: the disk is full" in message
    assert f"previous checkpoint {path} is intact" in message
    assert f"free some space, then resume the run (eqlosses train cls --resume --run " \
           f"{path.parent})" in message
    assert not path.with_name("checkpoint.pt.tmp").exists()
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pt"]
    assert load_checkpoint(path)["step"] == 2


def test_other_write_errors_and_a_first_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    monkeypatch.setattr(torch, "save", _half_written_then(OSError(errno.EIO, "I/O error")))
    with pytest.raises(CheckpointWriteError, match="the write failed .I/O error.*No checkpoint "
                       "of this run was saved before: fix the cause") as info:
        save_checkpoint(path, {"w": torch.zeros(10)})
    assert info.value.errno == errno.EIO
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_save_removes_its_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1})
    monkeypatch.setattr(torch, "save", _half_written_then(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    assert load_checkpoint(path)["step"] == 1


def test_a_stale_temporary_file_does_not_disturb_the_next_save(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1})
    path.with_name("checkpoint.pt.tmp").write_bytes(b"PK\x03\x04 half a checkpoint")
    assert load_checkpoint(path)["step"] == 1  # never read
    save_checkpoint(path, {"step": 2})
    assert load_checkpoint(path)["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


# --------------------------------------------------------------------------------------------
# Logs cut short
# --------------------------------------------------------------------------------------------

def test_truncate_jsonl_drops_later_steps_and_a_line_cut_short(tmp_path):
    path = tmp_path / "log.jsonl"
    lines = [json.dumps({"kind": "start"})] + [json.dumps({"kind": "step", "step": s})
                                              for s in (1, 2, 3)]
    path.write_text("\n".join(lines) + "\n" + lines[-1][:9])  # the kill cut the last line
    truncate_jsonl(path, 2)
    assert path.read_text() == "\n".join(lines[:3]) + "\n"
    path.write_text(path.read_text() + "7\n" + lines[1][:-1])  # not an object; cut short
    truncate_jsonl(path, 5)
    assert [json.loads(line) for line in path.read_text().splitlines()] == \
        [{"kind": "start"}, {"kind": "step", "step": 1}, {"kind": "step", "step": 2}]
    assert [p.name for p in tmp_path.iterdir()] == ["log.jsonl"]


# --------------------------------------------------------------------------------------------
# Collectives that fail
# --------------------------------------------------------------------------------------------

GLOO_RESET = ("[../third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
              "[127.0.0.1]:62594: Connection reset by peer")


def test_collective_errors_names_the_cause_with_several_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(CollectiveError) as info:
        with collective_errors(7.5):
            raise RuntimeError(GLOO_RESET)
    message = str(info.value)
    assert message.startswith("rank 1: a collective operation failed: another process "
                              "stopped or is stuck; no collective completed within 7.5 s "
                              "(dist_timeout)")
    assert "--resume" in message and "Connection reset by peer" in message
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(RuntimeError, match="^mat1 and mat2 shapes") as other:
        with collective_errors(7.5):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    assert not isinstance(other.value, CollectiveError)


def test_collective_errors_leaves_a_single_process_alone(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RuntimeError) as info:
        with collective_errors(7.5):
            raise RuntimeError(GLOO_RESET)
    assert not isinstance(info.value, CollectiveError)


def test_init_distributed_passes_the_timeout(monkeypatch):
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(common.dist, "init_process_group",
                        lambda backend, **kw: seen.update(backend=backend, **kw))
    common.init_distributed(torch.device("cpu"), 12.5)
    assert seen["backend"] == "gloo" and seen["timeout"].total_seconds() == 12.5
