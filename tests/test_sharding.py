"""--shard-model (tl.train.sharding, tl.runs.shards): FSDP2 over torchrun's CPU processes (gloo) against DDP,
sharded training states (DCP) resumed exactly, at other numbers of processes, and refused when damaged."""

import shutil
import signal
import subprocess

import pytest
import torch
from conftest import ROOT, make_imagefolder, one_line_error, run_cli
from safetensors.torch import load_file
from test_checkpoint import metrics_without_timings
from test_distributed import BIN

from tl.core.config import parse_args
from tl.core.errors import UserError
from tl.pack import pack
from tl.runs import checkpoints

pytest.importorskip("timm")

# timm's test ViT has no BatchNorm: DDP and FSDP2 then compute the same steps. fp32: the same numbers.
VIT = ["--model", "timm/test_vit", "--weights", "none", "--image-size", "160", "--precision", "no", "--lr", "0.05",
       "--wandb", "disabled", "--batch-size", "4"]


def torchrun(n: int, *args, **kw):
    return run_cli(str(BIN / "torchrun"), "--nproc_per_node", str(n), str(ROOT / "train.py"), *map(str, args), **kw)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_imagefolder(tmp_path_factory.mktemp("shard") / "d", n_train=10, n_val=6, size=48)
    (root / "val" / "red" / "005.jpg").unlink()  # 11 val images: shards of 6 and 5 (of 4, 4 and 3 at three)
    return root


def losses(out):
    return [(r["train_loss"], r["val_loss"], r["val_acc"], r["val_images"]) for r in metrics_without_timings(out)]


def close(a, b, tol=1e-5):
    return len(a) == len(b) and all(abs(x - y) <= tol * max(1, abs(x)) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


@pytest.mark.slow
@pytest.mark.parametrize("options", [["--epochs", "1", "--mode", "lora", "--layer-decay", "0.8", "--accumulate", "2",
                                      "--grad-checkpointing"],
                                     ["--epochs", "1", "--model", "resnet18", "--image-size", "64"]],
                         ids=["vit lora+levers", "resnet finetune"])
def test_sharded_training_gives_ddps_losses_and_weights(tmp_path, data, options):
    """The same steps as DDP: on a ViT (no BatchNorm) with LoRA, layer decay, accumulation and checkpointing, and
    finetuning a ResNet whose BatchNorm statistics are broadcast from the main process at every training forward
    as DDP does (tl.train.sharding.broadcast_buffers)."""
    runs = {}
    for name, extra in (("ddp", []), ("sharded", ["--shard-model"])):
        runs[name] = tmp_path / name
        proc = torchrun(2, "--data-dir", data, "--output-dir", runs[name], *VIT, *options, *extra, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "shard units (FSDP2) over 2 processes" in proc.stdout
    assert close(losses(runs["ddp"]), losses(runs["sharded"]))
    assert all(row[3] == 11 for row in losses(runs["sharded"]))  # every val image once
    ddp, sharded = (load_file(runs[n] / "best.safetensors") for n in ("ddp", "sharded"))
    assert ddp.keys() == sharded.keys()  # best.safetensors: one ordinary file, as without sharding
    assert max((ddp[k] - sharded[k]).abs().max().item() for k in ddp) < 1e-5
    state = checkpoints.read_metadata(runs["sharded"] / "state.safetensors")
    folder = runs["sharded"] / state["shards"]
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert [p.name for p in runs["sharded"].glob("shards*")] == [state["shards"]]


@pytest.mark.slow
def test_a_sharded_run_killed_inside_an_epoch_resumes_exactly(tmp_path):
    data = make_imagefolder(tmp_path / "d", n_train=36, n_val=5, size=48)  # 18 steps a process at batch 2
    args = ["--data-dir", data, *VIT, "--batch-size", "2", "--epochs", "1", "--num-workers", "2", "--data-mode",
            "stream", "--shard-model"]  # killed at step 16 of 18
    ref = torchrun(2, *args, "--output-dir", tmp_path / "ref", timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "run"
    # the main process SIGKILLs the job right after its first save inside an epoch
    job = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", str(ROOT / "tests" / "kill_after_save.py"),
                          *map(str, args), "--output-dir", str(out), "--save-every", "0.0001"], cwd=ROOT,
                         capture_output=True, text=True, start_new_session=True, timeout=600)
    assert job.returncode == -signal.SIGKILL, job.stderr[-2000:]  # torchrun itself killed
    assert checkpoints.read_metadata(out / "state.safetensors")["step"] > 0
    resumed = torchrun(2, *args, "--output-dir", out, "--resume", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming epoch" in resumed.stdout
    assert metrics_without_timings(out) == metrics_without_timings(tmp_path / "ref")
    assert (out / "best.safetensors").read_bytes() == (tmp_path / "ref" / "best.safetensors").read_bytes()


@pytest.fixture(scope="module")
def packed(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("pack") / "pack"
    pack(data, out, progress=False)
    return out


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory, packed):
    """A sharded run of 2 epochs at 2 processes on a pack (streamed), to go on from."""
    out = tmp_path_factory.mktemp("two") / "run"
    proc = torchrun(2, "--data-dir", packed, "--output-dir", out, *VIT, "--epochs", "2", "--shard-model", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 3])
def test_a_sharded_state_goes_on_at_another_number_of_processes(tmp_path, packed, two_epochs, processes):
    out = tmp_path / "run"
    shutil.copytree(two_epochs, out)
    args = ["--data-dir", packed, "--output-dir", out, *VIT, "--epochs", "3", "--shard-model", "--resume"]
    proc = run_cli("train.py", *args) if processes == 1 else torchrun(processes, *args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming at {processes} process(es) a run saved by 2" in proc.stdout
    assert "resuming after epoch 2" in proc.stdout and "Traceback" not in proc.stderr
    rows = metrics_without_timings(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[:2] == metrics_without_timings(two_epochs)
    assert rows[2]["val_images"] == 11 and rows[2]["train_loss"] < rows[0]["train_loss"]  # it went on training
    assert checkpoints.read_metadata(out / "state.safetensors")["shards"] == "shards-3-0"


@pytest.mark.slow
def test_a_damaged_or_incomplete_sharded_state_is_one_line_and_touches_nothing(tmp_path, packed, two_epochs):
    args = ["--data-dir", packed, *VIT, "--epochs", "3", "--shard-model", "--resume"]
    name = checkpoints.read_metadata(two_epochs / "state.safetensors")["shards"]
    for damage, phrase in (("missing", "damaged or missing a process's file"), ("metadata", "missing or incomplete"),
                           ("bytes", "damaged or missing a process's file")):
        out = tmp_path / damage
        shutil.copytree(two_epochs, out)
        shard = out / name / "__1_0.distcp"
        if damage == "missing":
            shard.unlink()
        elif damage == "metadata":
            (out / name / ".metadata").unlink()
        else:
            shard.write_bytes(shard.read_bytes()[:1000])
        before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        proc = run_cli("train.py", "--output-dir", out, *args)
        one_line_error(proc, phrase, "--overwrite")
        assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_a_save_cut_short_leaves_the_previous_state_to_resume_from(tmp_path, packed, two_epochs):
    """A kill while the processes write (shards.tmp half written) or before the state file names the new folder
    (a complete folder no state names): the resume goes on from the state file's folder and clears the rest."""
    out = tmp_path / "run"
    shutil.copytree(two_epochs, out)
    name = checkpoints.read_metadata(out / "state.safetensors")["shards"]
    (out / "shards.tmp").mkdir()
    (out / "shards.tmp" / "__0_0.distcp").write_bytes(b"half")
    shutil.copytree(out / name, out / "shards-3-0")  # renamed, but the state was not written
    proc = run_cli("train.py", "--data-dir", packed, "--output-dir", out, *VIT, "--epochs", "3", "--shard-model",
                   "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming after epoch 2" in proc.stdout
    assert sorted(p.name for p in out.glob("shards*")) == ["shards-3-0"]


@pytest.mark.parametrize("args, message", [
    (["--mode", "feature-extract"], "--shard-model: feature-extract on the feature cache"),
    (["--ema", "0.99"], "--ema keeps a whole copy of the model"),
    (["--compile"], "--compile with --shard-model is not supported"),
])
def test_options_that_do_not_shard_are_one_line_errors(args, message):
    with pytest.raises(UserError, match=message):
        parse_args(["--shard-model", *args])
    parse_args(["--shard-model", "--mode", "feature-extract", "--feature-cache", "off"])  # the backbone runs: fine


def test_one_process_warns_that_it_shards_nothing_and_saves_a_sharded_state(tmp_path, data):
    proc = run_cli("train.py", "--data-dir", data, "--output-dir", tmp_path / "run", *VIT, "--epochs", "1",
                   "--shard-model")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("--shard-model with one process shards nothing") == 1
    assert "torch.distributed is disabled" not in proc.stderr
    meta = checkpoints.read_metadata(tmp_path / "run" / "state.safetensors")
    assert meta["shards"] == "shards-1-0" and (tmp_path / "run" / "shards-1-0" / "__0_0.distcp").is_file()
    best = load_file(tmp_path / "run" / "best.safetensors")
    assert all(isinstance(v, torch.Tensor) for v in best.values()) and "head.weight" in best
    pred = run_cli("-m", "tl.predict", "--checkpoint", tmp_path / "run" / "best.safetensors", data / "val")
    assert pred.returncode == 0 and "accuracy" in pred.stdout, pred.stderr[-2000:]
