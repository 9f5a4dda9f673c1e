"""Faults injected into real runs: a SIGKILL while a checkpoint is written (with the logs cut
short), a full disk, a process of a two-process run that dies or hangs.

Each training run is the tiny classification run (one epoch of 10 steps, a checkpoint every
2 steps), compared with one uninterrupted run of the same configuration.
"""

import errno
import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from eqlosses import cli
from eqlosses.config import load_config
from eqlosses.monitor.recorder import read_stats
from eqlosses.tasks import classification as cls
from eqlosses.tasks.common import load_checkpoint, save_checkpoint
from tests.dist_utils import free_port

#: these train models or spawn processes: outside the quick loop
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ARGS = ["model.width=4", "data.batch_size=256", "data.eval_batch_size=1000",
        "optim.epochs=1", "optim.warmup_epochs=0", "progress=false", "tensorboard=false",
        "log_every=1", "stats_every=1", "checkpoint_every_steps=2"]


def _cfg(root, name, *extra):
    return load_config(None, ARGS + [f"output_dir={root}", f"name={name}", *extra])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run the resumed ones must equal."""
    root = tmp_path_factory.mktemp("straight")
    cls.train(_cfg(root, "straight"))
    return root / "straight"


def _assert_same_run(run, reference):
    a, b = load_checkpoint(run / "checkpoint.pt"), load_checkpoint(reference / "checkpoint.pt")
    assert a["step"] == b["step"] == 10
    for part in ("model", "criterion"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    # the logs: every line parses, each step is there once, as in the uninterrupted run
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "step"]
    assert steps == list(range(1, 11))
    ours, theirs = read_stats(run), read_stats(reference)
    assert ours.steps.tolist() == theirs.steps.tolist() == list(range(1, 11))
    for key in theirs.arrays:
        np.testing.assert_array_equal(ours.arrays[key], theirs.arrays[key])


# --------------------------------------------------------------------------------------------
# SIGKILL while a checkpoint is written
# --------------------------------------------------------------------------------------------

#: run in a child process: the second checkpoint save writes half of the file, then hangs
#: until the test kills the process
KILLED_WHILE_SAVING = r"""
import io, sys, time
from pathlib import Path
import torch
from eqlosses.config import load_config
from eqlosses.tasks import classification as cls, common

torch.set_num_threads(1)  # as the tests' process (conftest): the same float results
what, marker = sys.argv[1], Path(sys.argv[2])
real_save, saves = torch.save, []

def hanging_save(obj, fh, *args, **kwargs):
    if not str(getattr(fh, "name", "")).endswith(".tmp"):
        return real_save(obj, fh, *args, **kwargs)
    saves.append(1)
    if len(saves) < 2:
        return real_save(obj, fh, *args, **kwargs)
    buf = io.BytesIO()
    real_save(obj, buf)
    fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    fh.flush()
    marker.write_text("half written")
    time.sleep(600)

torch.save = hanging_save
if what == "save":
    target = sys.argv[3]
    common.save_checkpoint(target, {"step": 1, "w": torch.arange(100000)})
    common.save_checkpoint(target, {"step": 2, "w": torch.arange(100000)})
else:
    cls.train(load_config(None, sys.argv[3:]))
"""


def _run_and_kill_while_saving(tmp_path, *args):
    """Start the child, wait until it is inside the second save, SIGKILL it."""
    script = tmp_path / "killed_while_saving.py"
    script.write_text(KILLED_WHILE_SAVING)
    marker = tmp_path / "in-save"
    with open(tmp_path / "child.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, str(script), *args[:1], str(marker),
                                 *args[1:]], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while not marker.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                pytest.fail("the child never reached its second checkpoint save:\n"
                            + (tmp_path / "child.log").read_text()[-3000:])
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL


def test_sigkill_while_saving_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    _run_and_kill_while_saving(tmp_path, "save", str(path))
    stale = tmp_path / "checkpoint.pt.tmp"
    assert stale.is_file() and stale.stat().st_size > 0  # the half-written save
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.arange(100000))
    save_checkpoint(path, {"step": 3})  # the stale file does not get in the way
    assert load_checkpoint(path)["step"] == 3 and not stale.exists()


def test_a_run_killed_while_saving_with_its_logs_cut_short_resumes_exactly(tmp_path,
                                                                          straight):
    run = tmp_path / "killed"
    _run_and_kill_while_saving(tmp_path, "train", *ARGS, f"output_dir={tmp_path}",
                               "name=killed")
    # killed while writing the step-4 checkpoint: the step-2 one is on disk
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 2
    assert (run / "checkpoint.pt.tmp").is_file()
    # and a kill in the middle of a write cuts the logs' last record short
    log = (run / "log.jsonl").read_text()
    assert json.loads(log.splitlines()[-1])["step"] == 4
    (run / "log.jsonl").write_text(log[:-25])
    stats = (run / "stats.bin").read_bytes()
    (run / "stats.bin").write_bytes(stats[:-7])
    with pytest.warns(RuntimeWarning, match="removed .* bytes of a last record cut short"):
        cls.train(_cfg(tmp_path, "killed"), resume=True)
    assert not (run / "checkpoint.pt.tmp").exists()
    _assert_same_run(run, straight)


# --------------------------------------------------------------------------------------------
# A full disk
# --------------------------------------------------------------------------------------------

def test_a_full_disk_stops_the_run_with_one_clear_line_and_it_resumes(tmp_path, monkeypatch,
                                                                      capsys, straight):
    real_save, saves = torch.save, []

    def full_disk_on_the_second_checkpoint(obj, fh, *args, **kwargs):
        if str(getattr(fh, "name", "")).endswith("checkpoint.pt.tmp"):
            saves.append(1)
            if len(saves) == 2:
                buf = io.BytesIO()
                real_save(obj, buf)
                fh.write(buf.getvalue()[:1000])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, fh, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_on_the_second_checkpoint)
    run = tmp_path / "full"
    argv = ["train", "cls", "--run", str(run)] + [w for a in ARGS for w in ("--set", a)]
    assert cli.main(argv) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert err.startswith("eqlosses: error: cannot write the checkpoint") and err.count("\n") == 1
    assert "the disk is full" in err and "previous checkpoint" in err and "is intact" in err
    assert f"eqlosses train cls --resume --run {run}" in err
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.yaml",
                                                     "log.jsonl", "stats.bin"]
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 2
    assert cli.main(["train", "cls", "--resume", "--run", str(run)]) == 0
    _assert_same_run(run, straight)


# --------------------------------------------------------------------------------------------
# A process of a two-process run dies or hangs
# --------------------------------------------------------------------------------------------

def _join_env(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


def _report(out_dir, rank, started, err=None):
    result = {"finished": err is None, "seconds": time.time() - started, "at": time.time()}
    if err is not None:
        result.update(type=type(err).__name__, message=str(err))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    os._exit(0)  # no clean-up of a broken process group


def _rank_dies_before_a_collective(rank, port, out_dir):
    import torch.distributed as dist

    from eqlosses import distributed
    from eqlosses.tasks.common import collective_errors, init_distributed

    _join_env(rank, port)
    init_distributed(torch.device("cpu"), 3.0)
    dist.barrier()
    if rank == 1:
        os._exit(1)  # abruptly: no clean-up, no goodbye
    started = time.time()
    try:
        with collective_errors(3.0):
            distributed.all_reduce_sum_(torch.ones(4))
            distributed.all_reduce_sum_(torch.ones(4))
    except Exception as err:  # noqa: BLE001 - reported to the test
        _report(out_dir, rank, started, err)
    _report(out_dir, rank, started)


def _rank_hangs_in_training(rank, port, out_dir):
    from eqlosses.tasks.common import Progress

    _join_env(rank, port)
    if rank == 1:
        original = Progress.update

        def hang_after_step_2(self, done, *args, **kwargs):
            if done == 2:
                Path(out_dir, "hangs").write_text(str(time.time()))
                time.sleep(600)  # alive, but never joins the next collective
            return original(self, done, *args, **kwargs)

        Progress.update = hang_after_step_2
    cfg = load_config(None, ARGS + [f"output_dir={out_dir}", "name=ddp", "dist_timeout=4"])
    started = time.time()
    try:
        cls.train(cfg)
    except Exception as err:  # noqa: BLE001 - reported to the test
        _report(out_dir, rank, started, err)
    _report(out_dir, rank, started)


def _two_processes(target, out_dir, timeout_s):
    """Run ``target(rank, port, out_dir)`` on ranks 0 and 1; wait for rank 0's report (or
    ``timeout_s``), then kill what is left. Returns rank 0's report."""
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, port, str(out_dir))) for r in range(2)]
    for p in procs:
        p.start()
    report = Path(out_dir, "rank0.json")
    try:
        procs[0].join(timeout_s)  # rank 0 writes its report, then exits
        hangs = procs[0].is_alive()
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(10)
    if hangs:
        pytest.fail(f"rank 0 did not stop within {timeout_s} s: it hangs in a collective")
    if not report.exists():
        pytest.fail(f"rank 0 exited (code {procs[0].exitcode}) without a report")
    return json.loads(report.read_text())


def test_a_rank_that_dies_stops_the_other_with_a_clear_error(tmp_path):
    result = _two_processes(_rank_dies_before_a_collective, tmp_path, 120)
    assert not result["finished"], result
    assert result["type"] == "CollectiveError"
    assert result["message"].startswith(
        "rank 0: a collective operation failed: another process stopped or is stuck; no "
        "collective completed within 3 s (dist_timeout)")
    assert result["seconds"] < 3 + 10  # at once (a closed connection), or at the timeout


def test_a_rank_that_hangs_stops_the_other_after_dist_timeout(tmp_path):
    result = _two_processes(_rank_hangs_in_training, tmp_path, 240)
    assert not result["finished"], result
    assert result["type"] == "CollectiveError"
    assert "another process stopped or is stuck; no collective completed within 4 s " \
           "(dist_timeout)" in result["message"]
    assert "Timed out" in result["message"] or "timed out" in result["message"]
    # rank 0 waited for the hung rank dist_timeout, then stopped (the margin: a busy machine)
    waited = result["at"] - float((tmp_path / "hangs").read_text())
    assert 3 <= waited < 4 + 15, waited
