"""What config.json records to reproduce a run: a content fingerprint of the data that sees a changed
image of the same size, the same for the same files anywhere; tl's version; nothing that can fail."""

import json
import platform
import re
import shutil
import warnings

import pytest
import torch
from conftest import make_imagefolder

from tl.core.errors import UserError
from tl.data.listing import list_images
from tl.runs import provenance
from tl.runs.rundir import CONFIG, RunDir


def test_data_sample_sees_content_not_location(tmp_path):
    root = make_imagefolder(tmp_path / "a", n_train=5, n_val=3)
    first = provenance.record(list_images(root))
    assert first["data_files"] == {"train": 10, "val": 6} and first["data_sample"].startswith("sha256:")
    moved = shutil.copytree(root, tmp_path / "b")
    assert provenance.record(list_images(moved))["data_sample"] == first["data_sample"]
    image = moved / "train" / "red" / "002.jpg"
    data = bytearray(image.read_bytes())
    data[-10] ^= 0xFF  # same size, so the names-and-sizes fingerprint cannot see it
    image.write_bytes(bytes(data))
    again = provenance.record(list_images(moved))
    assert again["data_sample"] != first["data_sample"]


def test_data_sample_reads_at_most_sample_files_spread_over_the_listing(tmp_path, monkeypatch):
    read = []
    real_open = open

    def spy(path, *args, **kwargs):
        read.append(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(provenance, "SAMPLE_FILES", 4)
    monkeypatch.setattr("builtins.open", spy)
    paths = [str(tmp_path / f"{i}") for i in range(10)]
    for p in paths:
        real_open(p, "w").write(p)
    provenance.data_sample(paths)
    assert read == [paths[0], paths[2], paths[5], paths[7]]
    assert provenance.data_sample(paths[:3]) != provenance.data_sample([*paths[:2], str(tmp_path / "gone")])


def test_version_commit_and_job_never_fail(monkeypatch):
    assert provenance.tl_version()
    monkeypatch.setenv("PATH", "/nonexistent")  # no git: null, not an error
    assert provenance.tl_commit() is None
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert provenance.slurm_job() is None
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "10")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    assert provenance.slurm_job() == {"job_id": "12", "array_job_id": "10", "array_task_id": "2"}


def test_a_pack_records_its_shards_md5(tmp_path):
    from tl.data import packs
    from tl.pack import pack

    root = make_imagefolder(tmp_path / "a", n_train=5, n_val=3)
    pack(root, tmp_path / "p", progress=False)
    info = packs.open_pack(tmp_path / "p")
    packed = provenance.record(info.listing(), info)
    assert packed["data_files"] == {"train": 10, "val": 6}
    assert all(s.get("md5sum") for split in info.shards.values() for s in split)
    assert packed["data_sample"].startswith("sha256:")
    assert packed["data_sample"] != provenance.record(list_images(root))["data_sample"]


def test_an_array_task_does_not_continue_another_tasks_run(tmp_path, monkeypatch):
    """Tasks of one array given one dir, one after another: launch.sh adds --resume to any existing dir,
    so without this check task 1 would 'resume' task 0's finished run and report success."""
    run = tmp_path / "shared"
    run.mkdir()
    (run / CONFIG).write_text(json.dumps({"slurm": {"job_id": "11", "array_job_id": "10", "array_task_id": "0"}}))
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "10")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    with pytest.raises(UserError, match=r"shared holds the run of task 0 of array job 10, not of this task \(1\): "
                                        "give every array task its own output dir"):
        RunDir.open(str(run), "finetune", True, False)
    assert not (run / ".tl-lock").exists()  # released
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")  # the same task, requeued: its own run
    RunDir.open(str(run), "finetune", True, False).close(failed=False)
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "20")  # another array's task may continue it (a new submission)
    RunDir.open(str(run), "finetune", True, False).close(failed=False)


def test_versions_are_recorded_and_a_resume_with_others_warns(tmp_path):
    found = provenance.versions()
    assert found["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert found["python"] == platform.python_version() and found["torchvision"] and found["accelerate"]
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"versions": found}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        provenance.check_versions(config)  # the same: silent
        config.write_text(json.dumps({"epochs": 3}))
        provenance.check_versions(config)  # a run from before versions were recorded: silent
    config.write_text(json.dumps({"versions": {**found, "torch": "2.0.0"}}))
    changed = re.escape(f"other versions than the run began with (torch 2.0.0 -> {found['torch']})")
    with pytest.warns(UserWarning, match=changed):
        provenance.check_versions(config)
