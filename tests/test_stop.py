"""Stop signals: the first waits for the processes' next agreement, a second stops at once except
inside a save, which finishes first (launchers deliver two: directly and through torchrun's agent)."""

import json
import os
import signal

import pytest
from conftest import FAST

from tl.core.config import parse_args
from tl.core.errors import UserError
from tl.core.stop import Stopper, StopRequested
from tl.runs import checkpointer, checkpoints
from tl.train.loop import train


def test_a_second_signal_stops_at_once_but_waits_for_a_save():
    stopper = Stopper()
    try:
        stopper.defer(None)
        os.kill(os.getpid(), signal.SIGTERM)  # the first: remembered for the next agreement
        assert stopper.signum == signal.SIGTERM
        saved = []
        with pytest.raises(StopRequested), stopper.saving():
            os.kill(os.getpid(), signal.SIGINT)  # the second, inside a save
            saved.append("whole")  # Python runs the handler before this line: the save goes on
        assert saved == ["whole"]
        with pytest.raises(StopRequested):  # outside a save, a further signal stops at once
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("not stopped")
    finally:
        stopper.restore()


def test_two_signals_during_the_epochs_save_keep_the_epoch_and_resume_after_it(tmp_path, tiny_data, monkeypatch):
    """What scancel or Ctrl-C under accelerate launch does: two signals at once, here while epoch 1 is
    being saved. The epoch is saved whole, the message says so, and --resume goes on from epoch 2."""
    out = tmp_path / "run"
    argv = ["--data-dir", str(tiny_data), "--output-dir", str(out), "--epochs", "2", "--weights", "none",
            "--wandb", "disabled", *FAST]
    real_save_state = checkpointer.save_state

    def signalled_save_state(*args, **kwargs):
        monkeypatch.setattr(checkpointer, "save_state", real_save_state)  # once: epoch 1's save
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        return real_save_state(*args, **kwargs)

    monkeypatch.setattr(checkpointer, "save_state", signalled_save_state)
    with pytest.raises(UserError, match=r"stopped by SIGTERM during epoch 2; epoch 1 is saved in .*--resume"):
        train(parse_args(argv))
    assert checkpoints.read_metadata(out / "state.safetensors")["epoch"] == 1
    summary, _ = train(parse_args([*argv, "--resume"]))
    assert summary["epochs"] == 2
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
