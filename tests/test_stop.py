"""Stop signals: the first waits for the processes' next agreement, a second stops at once except
inside a save, which finishes first (launchers deliver two: directly and through torchrun's agent)."""

import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
from conftest import FAST, one_line_stop, run_cli

from tl.core.config import parse_args
from tl.core.stop import Stopped, Stopper, StopRequested
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
    with pytest.raises(Stopped, match=r"stopped by SIGTERM during epoch 2; epoch 1 is saved in .*--resume"):
        train(parse_args(argv))
    assert checkpoints.read_metadata(out / "state.safetensors")["epoch"] == 1
    summary, _ = train(parse_args([*argv, "--resume"]))
    assert summary["epochs"] == 2
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_data, base_weights):
    out = tmp_path_factory.mktemp("stop") / "run"
    proc = run_cli("train.py", "--data-dir", str(tiny_data), "--output-dir", str(out), "--epochs", "1",
                   "--weights", str(base_weights), "--wandb", "disabled", *FAST)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


# command: its argv after the module, the function a real signal is sent from, and the files it writes, which
# are all there or none (a stop during the last writes waits for them)
COMMANDS = {
    "tl.export": (["--checkpoint", "{run}/best.safetensors", "--format", "onnx", "--output", "{out}/model.onnx"],
                  "tl.export.check", []),
    "tl.report": (["{run}", "--out", "{out}"], "tl.report.save_picture", ["report.csv", "report.md", "report.png"]),
    "tl.report --errors": (["{run}", "--errors", "--out", "{out}"], "tl.inference.mistakes.probabilities",
                           []),
    "tl.report --errors, writing": (["{run}", "--errors", "--out", "{out}"], "tl.inference.mistakes.thumbnail",
                                    ["errors.html", "errors.json", "errors.png"]),
    "tl.lr_find": (["--data-dir", "{data}", "--steps", "8", "--out", "{out}/lr.png", "--weights", "{weights}",
                    *FAST], "tl.lr_find.range_test", []),
    "tl.pack": (["{data}", "{out}/pack"], "tl.pack._write", []),
}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_stops_with_one_line_and_leaves_nothing(tmp_path, finished_run, tiny_data, base_weights,
                                                                command, signum):
    """A real signal, sent from inside each command's work (a deterministic moment): one `stopped by` line,
    exit status 128 + the signal, no traceback, and no file of the command's left behind, temporary or
    final (TMPDIR included: tl.lr_find's feature cache)."""
    argv, where, written = COMMANDS[command]
    fill = {"run": finished_run, "out": tmp_path / "out", "data": tiny_data, "weights": base_weights}
    (tmp_path / "out").mkdir()
    temp = Path(tempfile.mkdtemp(prefix="stop-"))  # not under tmp_path: a short path for DataLoader workers' sockets
    module, name = where.rsplit(".", 1)
    code = (f"import os, sys, {module} as m\n"
            f"real = m.{name}\n"
            f"def signalled(*args, **kwargs):\n"
            f"    os.kill(os.getpid(), {int(signum)})\n"
            f"    return real(*args, **kwargs)\n"
            f"m.{name} = signalled\n"
            f"from {command.split()[0]} import main\n"
            f"sys.exit(main({[a.format(**fill) for a in argv]!r}))\n")
    try:
        proc = run_cli("-c", code, env={"TMPDIR": str(temp)})
        one_line_stop(proc, signum, f"stopped by {signal.Signals(signum).name}", "run the command again")
        assert sorted(os.listdir(tmp_path / "out")) == written
        ours = [n for n in os.listdir(temp) if "tl" in n]  # onnxruntime's import leaves its own .ses
        assert ours == [], f"{command} left temporary files"
    finally:
        shutil.rmtree(temp)


def test_a_stop_while_finishing_says_so_and_a_resume_finishes(tmp_path, tiny_data, monkeypatch):
    """After the last epoch (the final evaluation, pictures, summary) a stop is not 'during epoch N+1'."""
    from tl.train import finish

    out = tmp_path / "run"
    argv = ["--data-dir", str(tiny_data), "--output-dir", str(out), "--epochs", "1", "--weights", "none",
            "--wandb", "disabled", *FAST]
    real = finish.draw_pictures

    def signalled(*args, **kwargs):
        monkeypatch.setattr(finish, "draw_pictures", real)
        os.kill(os.getpid(), signal.SIGTERM)  # the first is remembered, the second stops at once
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(finish, "draw_pictures", signalled)
    with pytest.raises(Stopped, match=r"stopped by SIGTERM while finishing \(after epoch 1: .*\); every epoch is "
                                      r"saved in .*, finish it with the same command plus --resume"):
        train(parse_args(argv))
    assert not (out / "summary.json").exists()
    summary, _ = train(parse_args([*argv, "--resume"]))
    assert summary["epochs"] == 1 and (out / "summary.json").is_file() and (out / "curves.png").is_file()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_every_process_leaves_the_workers_to_the_main_one(tmp_path, tiny_data, signum):
    """scancel, SLURM's time limit and Ctrl-C in a terminal signal the DataLoader workers as well. Sent from a
    worker of epoch 1 to itself and to its main process: a clean stop (one line, 128 + the signal), not a worker
    dying of it and the loader raising; --resume then finishes the run."""
    out = tmp_path / "run"
    argv = ["--data-dir", str(tiny_data), "--output-dir", str(out), "--epochs", "2", "--weights", "none",
            "--wandb", "disabled", "--num-workers", "2", "--data-mode", "stream", *FAST]
    code = (f"import os, sys, torch.utils.data as d, tl.data.loaders as m\n"
            f"real = m.ImageSet.__getitem__\n"
            f"def signalled(self, i):\n"
            f"    if d.get_worker_info() is not None and self.epoch == 1 and i == 5 and self.transform:\n"
            f"        os.kill(os.getppid(), {int(signum)})\n"
            f"        os.kill(os.getpid(), {int(signum)})\n"
            f"    return real(self, i)\n"
            f"m.ImageSet.__getitem__ = signalled\n"
            f"sys.argv = ['train.py', *{argv!r}]\n"
            f"import runpy; runpy.run_path('train.py', run_name='__main__')\n")
    proc = run_cli("-c", code)
    one_line_stop(proc, signum, f"stopped by {signal.Signals(signum).name}")
    resumed = run_cli("train.py", *argv, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
