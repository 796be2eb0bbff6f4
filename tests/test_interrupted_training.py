"""Interrupted training (issue 10): a stop request or a real SIGTERM ends a run cleanly
(exit 143, the last completed epoch saved, no traceback) and ``--resume`` finishes it with
every epoch run exactly once."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import GeneSeg_train
from GeneSegNet.cli import run_reporting_errors
from GeneSegNet.errors import Interrupted
from GeneSegNet.model.checkpoint import load_checkpoint
from tests.test_recursive import write_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> Path:
    """A one-sample crop dataset."""
    root = tmp_path_factory.mktemp("interrupted") / "crops"
    write_dataset(root, {"s": 1}, seed=1)
    return root


TRAIN_ARGS = ["--nbase", "8", "16", "16", "--diam_mean", "20", "--diameter", "0",
              "--recursive_num", "1", "--train_tile_size", "64"]


def _last_checkpoint(run_dir: Path) -> Path:
    return next((run_dir / "models").glob("*_last.pt"))


def test_stop_request_saves_the_last_completed_epoch_and_resume_finishes(
    crops, tmp_path, monkeypatch
):
    """A stop request (what SIGTERM sets) mid-run: exit 143 after saving; --resume ends
    with every epoch run exactly once."""
    from GeneSegNet.training import loop

    original = loop._Run.end_epoch
    holder: dict = {}

    class FakeStop(loop.StopRequest):
        def __enter__(self):
            holder["stop"] = self
            return self

    def end_epoch(self, epoch, *args):
        original(self, epoch, *args)
        if epoch == 1:
            holder["stop"].requested = signal.SIGTERM

    monkeypatch.setattr(loop, "StopRequest", FakeStop)
    monkeypatch.setattr(loop._Run, "end_epoch", end_epoch)
    run_dir = tmp_path / "run"
    argv = ["--train_dir", str(crops), "--save_model_dir", str(run_dir),
            "--n_epochs", "4", "--checkpoint_minutes", "60", *TRAIN_ARGS]
    assert GeneSeg_train.main(argv) == 128 + signal.SIGTERM
    last = _last_checkpoint(run_dir)
    _, meta = load_checkpoint(last)
    assert meta["extra"]["epoch"] == 1  # kept in memory (60 min) and saved on the stop
    monkeypatch.setattr(loop._Run, "end_epoch", original)
    resume = ["--train_dir", str(crops), "--save_model_dir", str(run_dir),
              "--n_epochs", "4", "--resume", str(last), *TRAIN_ARGS]
    assert GeneSeg_train.main(resume) == 0
    _, meta = load_checkpoint(last)
    assert [h["epoch"] for h in meta["extra"]["history"]] == [0, 1, 2, 3]


def test_interrupted_error_exit_code():
    def body():
        raise Interrupted("stopped by SIGTERM", signal.SIGTERM)

    assert run_reporting_errors(body) == 143


def test_sigterm_subprocess_then_resume(crops, tmp_path):
    """A real SIGTERM once the first epoch is saved: clean exit, then --resume finishes."""
    run_dir = tmp_path / "run"
    n_epochs = 12
    argv = [sys.executable, str(REPO / "GeneSeg_train.py"), "--train_dir", str(crops),
            "--save_model_dir", str(run_dir), "--n_epochs", str(n_epochs), *TRAIN_ARGS]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        while proc.poll() is None and not list((run_dir / "models").glob("*_last.pt")):
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    if proc.returncode == 0:
        pytest.skip("training finished before the signal arrived")
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err and "--resume" in err
    last = _last_checkpoint(run_dir)
    _, meta = load_checkpoint(last)
    done = meta["extra"]["epoch"]
    assert [h["epoch"] for h in meta["extra"]["history"]] == list(range(done + 1))
    resume = [*argv, "--resume", str(last)]
    finished = subprocess.run(resume, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    _, meta = load_checkpoint(last)
    assert [h["epoch"] for h in meta["extra"]["history"]] == list(range(n_epochs))
