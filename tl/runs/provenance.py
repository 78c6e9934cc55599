"""What config.json records to reproduce a run besides its options: tl's version and commit, the data
set's file counts and a cheap content fingerprint, the SLURM job. Nothing here ever fails a run.

The data's identity (Identity.data, checked on --resume) covers names and sizes only; `data_sample`
adds content: sha256 over the bytes (the first MiB of each) of at most SAMPLE_FILES files spread
evenly over the listing, so a re-encoded or replaced image is likely seen at the cost of about a
thousand reads, whatever the set's size. A pack records its shards' md5 sums (from its wids
indexes), which cover every byte.
"""

import gzip
import hashlib
import importlib.metadata
import json
import os
import subprocess
from pathlib import Path

from tl.core.errors import UserError

SAMPLE_FILES = 1000
SAMPLE_BYTES = 1 << 20


def tl_version() -> str | None:
    try:
        return importlib.metadata.version("tl")
    except importlib.metadata.PackageNotFoundError:
        return None


def tl_commit() -> str | None:
    """HEAD of the checkout tl runs from, `-dirty` when tracked files changed; None outside a git checkout
    (an installed copy) or without git."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode:
            return None
        changed = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    dirty = changed.returncode != 0 or bool(changed.stdout.strip())
    return head.stdout.strip() + ("-dirty" if dirty else "")


PACKAGES = ("torch", "torchvision", "accelerate", "timm", "safetensors", "numpy", "pillow")


def versions() -> dict[str, str | None]:
    """Python's and the libraries' versions: exact resume (bit-identical results) holds with the same ones."""
    import platform

    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def check_versions(config_path: Path) -> None:
    """On a resume: warn when the run began with other versions (its config.json) than this process has."""
    try:
        before = json.loads(config_path.read_text()).get("versions")
    except (OSError, ValueError, AttributeError):
        return
    if not isinstance(before, dict):
        return  # a run from before tl recorded them
    now = versions()
    changed = [f"{name} {before.get(name)} -> {now[name]}" for name in now if before.get(name) != now[name]]
    if changed:
        import warnings

        warnings.warn(f"this resume runs with other versions than the run began with ({', '.join(changed)}): it "
                      "continues, but the results may differ in the last digits from an uninterrupted run's",
                      stacklevel=2)


def slurm_job() -> dict | None:
    """The SLURM job (and array task) the run trains in; None outside SLURM."""
    env = os.environ
    if not env.get("SLURM_JOB_ID"):
        return None
    return {"job_id": env["SLURM_JOB_ID"], "array_job_id": env.get("SLURM_ARRAY_JOB_ID"),
            "array_task_id": env.get("SLURM_ARRAY_TASK_ID")}


def data_sample(paths: list[str]) -> str:
    """sha256 over the first SAMPLE_BYTES of at most SAMPLE_FILES of `paths`, spread evenly (the same
    files for the same listing); an unreadable file counts as a marker, not an error."""
    n = len(paths)
    k = min(n, SAMPLE_FILES)
    digest = hashlib.sha256(f"{n} {k}\n".encode())
    for i in range(k):
        try:
            with open(paths[i * n // k], "rb") as f:
                data = f.read(SAMPLE_BYTES)
        except OSError:
            data = b"\0unreadable"
        digest.update(hashlib.sha256(data).digest())
    return f"sha256:{digest.hexdigest()}"


def record(listing, pack=None) -> dict:
    """config.json's reproduction keys (see tl.core.config.RECORDED); the main process calls this once."""
    splits = {"train": listing.train, "val": listing.val, **({"test": listing.test} if listing.test else {})}
    if pack is not None:  # every byte of every shard, as tl.pack hashed it
        md5 = {split: [s.get("md5sum") for s in shards] for split, shards in pack.shards.items()}
        sample = "sha256:" + hashlib.sha256(json.dumps(md5, sort_keys=True).encode()).hexdigest()
    else:
        sample = data_sample([path for items in splits.values() for path, _ in items])
    return {"tl_version": tl_version(), "tl_commit": tl_commit(), "versions": versions(),
            "data_files": {split: len(items) for split, items in splits.items()}, "data_sample": sample,
            "slurm": slurm_job()}


def check_array_task(config: Path) -> None:
    """An array task must not continue another task's run: launch.sh resumes any existing OUTPUT_DIR, so
    tasks given one dir by mistake would otherwise each 'resume' the first one's finished run."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if not array:
        return
    try:
        saved = json.loads(config.read_text()).get("slurm") or {}
    except (OSError, ValueError, AttributeError):
        return
    if str(saved.get("array_job_id")) == array and str(saved.get("array_task_id")) != task:
        raise UserError(f"{config.parent} holds the run of task {saved.get('array_task_id')} of array job {array}, "
                        f"not of this task ({task}): give every array task its own output dir, e.g. "
                        "OUTPUT_DIR='runs/x-$SLURM_ARRAY_TASK_ID', or use slurm/sweep.sbatch")


def listing_rows(data) -> dict[str, list[list[str]]]:
    """A data set's images (tl.data.sources.DataSet) per split as [path from its base, class]."""
    base, classes = str(data.base), data.listing.classes
    return {split: [[os.path.relpath(path, base), classes[c]] for path, c in getattr(data.listing, split)]
            for split in ("train", "val", "test") if getattr(data.listing, split)}


def write_listing(path: Path, data) -> None:
    """The run dir's listing.json.gz: what data_changes compares a resume's data set with."""
    from tl.core.files import write_atomic

    write_atomic(path, gzip.compress(json.dumps(listing_rows(data)).encode(), compresslevel=1, mtime=0))


def data_changes(listing: Path, data) -> str | None:
    """What changed in the data set since the run began (its listing.json.gz, write_listing's), in words: rows
    (images) relabelled, moved to another split, added, removed, each with its first; None without it."""
    try:
        old = json.loads(gzip.decompress(listing.read_bytes()))
        before = {p: (split, c) for split, rows in old.items() for p, c in rows}
    except (OSError, ValueError, EOFError, TypeError):
        return None
    after = {p: (split, c) for split, rows in listing_rows(data).items() for p, c in rows}
    what = "rows" if data.label_file else "images"
    relabelled = [p for p in after if p in before and after[p][1] != before[p][1]]
    moved = [p for p in after if p in before and after[p][0] != before[p][0] and p not in relabelled]
    added = [p for p in after if p not in before]
    removed = [p for p in before if p not in after]
    parts = [f"{len(relabelled)} relabelled (the first: {relabelled[0]}, {before[relabelled[0]][1]} -> "
             f"{after[relabelled[0]][1]})"] if relabelled else []
    parts += [f"{len(moved)} moved to another split (the first: {moved[0]}, {before[moved[0]][0]} -> "
              f"{after[moved[0]][0]})"] if moved else []
    parts += [f"{len(added)} added (the first: {added[0]})"] if added else []
    parts += [f"{len(removed)} removed (the first: {removed[0]})"] if removed else []
    if not parts:
        parts = ["the same paths and classes, but an image's file size changed"]
    return f"{data.called} ({what} changed since the run began: {', '.join(parts)})"
