"""The run directory: its file names, one writer at a time, and the rule that an earlier run's
files are touched only after the new run has checked every input.

Only the main process opens a RunDir. The lock is a file created with O_EXCL (atomic on local
disks, NFS and Lustre alike) naming its holder; a heartbeat thread keeps its mtime fresh. A lock
is stale when its holder's process is gone (same machine) or its heartbeat is older than
TL_LOCK_STALE_S (another node, e.g. one that died). Taking over renames the stale file away and
checks it was the one judged stale; a holder that finds the lock no longer its own stops writing.
"""

import contextlib
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

from tl.core.errors import UserError
from tl.core.files import fsync_dir, write_atomic
from tl.runs.provenance import check_array_task

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
BEST = "best.safetensors"
STATE = "state.safetensors"
WANDB_ID = "wandb_run_id"
WANDB_DIR = "wandb"
PICTURES = {name: f"{name}.png" for name in ("predictions", "curves", "confusion", "batch")}
TEST_CONFUSION = "test_confusion.png"  # only with a test/ folder
RELIABILITY = "reliability.png"  # only with --calibrate
# python -m tl.report RUN --errors writes these after the run: of its model, so --overwrite takes them aside with it
ERRORS = {kind: f"errors.{kind}" for kind in ("html", "png", "json")}
LISTING = "listing.json.gz"  # the data set's images and classes as the run began: what a resume compares
RUN_FILES = (CONFIG, METRICS, SUMMARY, BEST, STATE, LISTING, *PICTURES.values(), TEST_CONFUSION, RELIABILITY,
             WANDB_ID, WANDB_DIR, *ERRORS.values())
LOCK = ".tl-lock"
ASIDE = ".tl-overwritten"  # an --overwrite'n run waits here until the new run saves its first epoch
MOVING = ".tl-overwritten.moving"  # files on their way to or from ASIDE: they belong at the top
# The feature cache's per-process files (tl.data.features): live only while a run is, so never in RUN_FILES
# (a dir holding only these holds no run) and never moved aside or kept.
FEATURES = ".tl-features"

HEARTBEAT_S = 30.0


def stale_after_s() -> float:
    return float(os.environ.get("TL_LOCK_STALE_S", "120"))


def read_summary(path: Path) -> dict | None:
    """A finished run's summary.json; None when it is missing or damaged (the run finishes again)."""
    try:
        return json.loads((path / SUMMARY).read_text())
    except (OSError, ValueError):
        return None


def _machine() -> str:
    """Who can check a pid: the same host, boot and pid namespace."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        boot, ns = "", 0
    return f"{socket.gethostname()}/{boot}/{ns}"


def _start_time(pid: int) -> str:
    """A process's start time in clock ticks: tells a live holder from a reused pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


class DirLock:
    def __init__(self, directory: Path):
        self.path = directory / LOCK
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "machine": _machine(),
                   "start": _start_time(os.getpid()), "job": os.environ.get("SLURM_JOB_ID"),
                   "restart": os.environ.get("SLURM_RESTART_COUNT", "0"), "task": _array_task(),
                   "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.token = json.dumps(self.me, sort_keys=True)
        self.lost: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self.token)
                f.flush()
                os.fsync(f.fileno())
            self._thread = threading.Thread(target=self._beat, name="tl-lock-heartbeat", daemon=True)
            self._thread.start()
            return
        raise UserError(f"could not lock {self.path.parent}: other processes keep taking it; make sure "
                        "only one run uses this --output-dir")

    def _read(self, path: Path) -> tuple[str, float]:
        try:
            return path.read_text(), path.stat().st_mtime
        except FileNotFoundError:
            return "", -1.0
        except (OSError, UnicodeDecodeError):
            raise UserError(f"{path} is not a tl lock file; remove it if no run uses {path.parent}") from None

    def _take_over_if_stale(self) -> None:
        text, mtime = self._read(self.path)
        if mtime < 0:
            return  # released meanwhile: try again
        try:
            holder = json.loads(text)
        except ValueError:
            holder = None  # being written right now, or damaged
        age = time.time() - mtime
        if self._alive(holder, age):
            mine, theirs = self.me["task"], (holder or {}).get("task")
            if mine and theirs and mine.split("_")[0] == theirs.split("_")[0]:  # tasks of one array
                raise UserError(f"{self.path.parent} is in use by {describe(holder)}, another task of this array "
                                "job: give every array task its own output dir, e.g. "
                                "OUTPUT_DIR='runs/x-$SLURM_ARRAY_TASK_ID', or use slurm/sweep.sbatch")
            raise UserError(f"{self.path.parent} is in use by {describe(holder)}; wait for it to end or pass "
                            f"another --output-dir (a holder that is gone is detected by itself: a dead "
                            f"process at once, another node {stale_after_s():.0f} s after its last heartbeat)")
        aside = self.path.with_name(f"{LOCK}.stale.{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        if self._read(aside)[0] == text:  # the one judged stale: gone for good
            aside.unlink()
            return
        with contextlib.suppress(OSError):  # a fresh lock moved by mistake: give it back
            os.link(aside, self.path)
        aside.unlink()

    def _alive(self, holder: dict | None, age: float) -> bool:
        if holder is None:
            return age < 10  # a holder writes its name right after creating the file
        if holder.get("job") and holder["job"] == self.me["job"] and holder.get("restart") != self.me["restart"]:
            return False  # SLURM ended that incarnation of this job before requeueing it, on any node
        if holder.get("machine") == self.me["machine"]:
            return _start_time(holder["pid"]) == holder.get("start") and holder["pid"] != os.getpid()
        return age < stale_after_s()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if not self.held():
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def held(self) -> bool:
        text = self._read(self.path)[0]
        if text != self.token and self.lost is None:
            try:
                self.lost = json.loads(text)
            except ValueError:
                self.lost = {}
        return self.lost is None

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if self.held():
            with contextlib.suppress(OSError):
                self.path.unlink()


def _array_task() -> str | None:
    """<array job>_<task> of a SLURM array task (its SLURM_JOB_ID is its own, not the array's)."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if array else None


def describe(holder: dict | None) -> str:
    if not holder:
        return "a run that is starting (its lock file names no holder yet)"
    job = f", SLURM job {holder.get('task') or holder['job']}" if holder.get("job") else ""
    return f"pid {holder['pid']} on {holder['host']}{job} (since {holder['since']})"


class RunDir:
    """One run's output directory, locked for the life of the run (main process only)."""

    def __init__(self, path: Path, created: bool, lock: DirLock, resume: bool, overwrite: bool):
        self.path, self.created, self.lock = path, created, lock
        self._finish_moving()
        present = {name for name in RUN_FILES if (path / name).exists()}
        aside = (path / ASIDE).exists()
        has_state = STATE in present
        if aside and has_state:
            self._drop_aside()  # a kill came between the first saved epoch and this cleanup
            aside = False
        if CONFIG in present:  # before --resume, which launch.sh adds to any dir holding a config.json
            check_array_task(path / CONFIG)
        if present and not (resume or overwrite):
            raise UserError(f"{path} already holds a run ({', '.join(sorted(present))}); pass --resume to "
                            "continue it, --overwrite to replace it, or another --output-dir")
        if resume and not present and not aside:
            raise UserError(f"nothing to resume: {path} holds no run (no {CONFIG}); start the run there without "
                            "--resume, or pass the --output-dir of the run to continue")
        if resume and not has_state and self._worth_keeping():
            raise UserError(f"{path} holds a run's results ({', '.join(sorted(present - {CONFIG}))}) but no "
                            f"{STATE} to continue from; pass --overwrite to train again (the old files are kept "
                            "until the new run saves its first epoch) or another --output-dir")
        self.resuming = self.saved = resume and has_state  # saved: an epoch of this dir's run is on disk
        # What begin() clears: a real earlier run (--overwrite moves it aside until the new run saves
        # its first epoch), or the leftovers of a start cut short before its first epoch (deleted).
        self.replace = sorted(present) if not self.resuming else []
        self.keep_aside = overwrite and not aside
        self.moved_aside = False

    def _worth_keeping(self) -> bool:
        """Results beyond what a kill during the first epoch's saves leaves (its row, maybe its best)."""
        from tl.runs.checkpoints import (
            read_metadata,  # here: it imports torch, which tl.report and tl.sweep do not need
        )

        if (self.path / SUMMARY).exists():
            return True
        try:
            if (self.path / METRICS).read_bytes().count(b"\n") > 1:
                return True
        except FileNotFoundError:
            pass
        except OSError:
            return True
        if (self.path / BEST).exists():
            try:
                return read_metadata(self.path / BEST).get("epoch", 2) > 1
            except UserError:
                return True
        return False

    @classmethod
    def open(cls, output_dir: str | None, mode: str, resume: bool, overwrite: bool) -> "RunDir":
        if output_dir is None:
            path = Path("runs") / f"{mode}-{time.strftime('%Y%m%d-%H%M%S')}"
            for n in range(2, 1000):  # two runs started in the same second get their own dirs
                if not path.exists():
                    break
                path = path.with_name(f"{mode}-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        else:
            path = Path(output_dir)
        if resume and not path.is_dir():
            raise UserError(f"nothing to resume: {path} does not exist; check --output-dir or drop --resume")
        created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create output dir {path} ({e.strerror}); pass --output-dir "
                            "with a writable location") from None
        lock = DirLock(path)
        try:
            lock.acquire()
        except OSError as e:  # read-only file system, permissions, full disk
            raise UserError(f"cannot write in output dir {path} ({e.strerror}); pass --output-dir "
                            "with a writable location") from None
        try:
            return cls(path, created, lock, resume, overwrite)
        except BaseException:
            lock.release()
            raise

    def file(self, name: str) -> Path:
        return self.path / name

    def begin(self) -> None:
        """Every input is checked: from here on the directory is this run's."""
        try:
            self._begin()
        except OSError as e:
            raise UserError(f"cannot prepare output dir {self.path} ({e.strerror}: {e.filename}); make it "
                            "writable or pass another --output-dir") from None

    def _begin(self) -> None:
        for leftover in [*self.path.glob(".*.tmp"), *self.path.glob(".tmp*")]:  # of writes a kill cut short
            if leftover.is_file():
                leftover.unlink()
        if not self.replace:
            return
        aside = self.path / ASIDE
        if self.keep_aside and not aside.exists():
            # Through MOVING, renamed at the end: a kill half-way leaves the old run to be put back whole.
            moving = self.path / MOVING
            moving.mkdir()
            for name in self.replace:
                os.replace(self.path / name, moving / name)
            os.replace(moving, aside)
            self.moved_aside = True
        else:  # leftovers of a start cut short (an older run may wait in ASIDE)
            for name in self.replace:
                target = self.path / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()
        fsync_dir(self.path)

    def check_lock(self) -> None:
        if not self.lock.held():
            raise UserError(f"lost the lock on {self.path} to {describe(self.lock.lost)}; stopping without "
                            "writing: only one run may use an output dir")

    def epoch_saved(self) -> None:
        """The first saved epoch makes this the dir's run: the one it replaced can go."""
        if not self.saved:
            self.saved = True
            self._drop_aside()

    def _drop_aside(self) -> None:
        if (self.path / ASIDE).exists():
            shutil.rmtree(self.path / ASIDE)

    def write_json(self, name: str, obj) -> None:
        write_atomic(self.file(name), (json.dumps(obj, indent=2) + "\n").encode())

    def write_rows(self, rows: list[dict]) -> None:
        write_atomic(self.file(METRICS), "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())

    def append_row(self, row: dict) -> None:
        try:
            with open(self.file(METRICS), "a") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")  # as the state's copy, so rebuilt rows match
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise UserError(f"cannot write {self.file(METRICS)} ({e.strerror}); free disk space or make "
                            f"{self.path} writable, then continue with --resume") from None

    def _finish_moving(self) -> None:
        """Files in MOVING are an earlier run's, cut off half-way by a kill: they go back to the top."""
        moving = self.path / MOVING
        if moving.is_dir():
            for item in moving.iterdir():
                os.replace(item, self.path / item.name)
            moving.rmdir()

    def close(self, failed: bool) -> None:
        """Release the lock. A run that failed before saving an epoch leaves the dir as it found it."""
        try:
            if failed and not self.saved and self.moved_aside:  # put the replaced run back
                for name in RUN_FILES:
                    target = self.path / name
                    if target.is_dir():
                        shutil.rmtree(target)
                    elif target.exists():
                        target.unlink()
                os.replace(self.path / ASIDE, self.path / MOVING)
                self._finish_moving()
        finally:
            self.lock.release()
        if failed and not self.saved and self.created:
            shutil.rmtree(self.path, ignore_errors=True)  # everything in it is this start's
