"""tl.predict's output on disk: the row format, each process's part with its progress (committed, resumed
after a kill), and the merge of all parts into one file.

Next to OUT (say predictions.csv), while a prediction runs:

    predictions.csv.parts/part-00001-of-00003.csv    process 1 of 3's rows, appended batch by batch
    predictions.csv.parts/part-00001-of-00003.json   its progress: the job, images done, bytes committed

A commit flushes and fsyncs the part, then writes its progress atomically. So whatever kills a process,
the first `bytes` bytes of its part hold exactly the rows of its first `images` images: a rerun of the
same job truncates the part there and goes on from that image; no row is written twice or lost. The
process that finds every part done merges them (under a lock: two finishing at once merge once) into
OUT, atomically, then writes predictions.metrics.json (the job, the counts, the metrics: the mark of a
finished OUT) and removes the parts folder.
"""

import contextlib
import csv
import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

from tl.core.errors import UserError
from tl.core.files import fsync_dir, write_atomic

VERSION = 1
DECIMALS = 6  # probabilities as fixed-point text: the same bytes from every process
FORMATS = ("csv", "jsonl")


def format_of(out: Path, fmt: str | None) -> str:
    if fmt:
        return fmt
    return "jsonl" if out.suffix.lower() in (".jsonl", ".json", ".ndjson") else "csv"


def file_digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def job_identity(model_file, names: list[str], labels: list[int], **settings) -> dict:
    """What makes two predictions the same job: the model file's bytes, the images and labels in order,
    and the settings that change a row (top-k, format, batch size). Not the number of processes: any
    number writes the same rows."""
    h = hashlib.sha256()
    for name, label in zip(names, labels):
        h.update(f"{name}\0{label}\n".encode("utf-8", "surrogateescape"))
    return {"model": f"sha256:{file_digest(model_file)}", "images": len(names), "samples": f"sha256:{h.hexdigest()}",
            **settings}


# --------------------------------------------------------------------------- rows

def header(fmt: str, top_k: int, labelled: bool) -> bytes:
    if fmt == "jsonl":
        return b""
    cols = ["path", *(f"{kind}_{i}" for i in range(1, top_k + 1) for kind in ("class", "prob"))]
    return (",".join(cols + (["label"] if labelled else [])) + "\n").encode()


def encode_rows(fmt: str, names: list[str], classes: list[list[str]], probs: list[list[float]],
                labels: list[str] | None) -> bytes:
    """One row per image: its path, its top-k classes and their probabilities, its label if known."""
    if fmt == "jsonl":
        lines = []
        for i, name in enumerate(names):
            ps = ", ".join(f"{p:.{DECIMALS}f}" for p in probs[i])
            label = f', "label": {json.dumps(labels[i])}' if labels is not None else ""
            lines.append(f'{{"path": {json.dumps(name)}, "classes": {json.dumps(classes[i])}, '
                         f'"probs": [{ps}]{label}}}\n')
        return "".join(lines).encode("utf-8", "surrogateescape")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for i, name in enumerate(names):
        cells = [name, *(v for c, p in zip(classes[i], probs[i]) for v in (c, f"{p:.{DECIMALS}f}"))]
        writer.writerow(cells + ([labels[i]] if labels is not None else []))
    return buf.getvalue().encode("utf-8", "surrogateescape")


def read_rows(path, fmt: str):
    """(path, top class, its probability, label or None) of every row of a written file, streamed."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        if fmt == "jsonl":
            for line in f:
                row = json.loads(line)
                yield row["path"], row["classes"][0], row["probs"][0], row.get("label")
            return
        reader = csv.reader(f)
        cols = next(reader, None) or []
        labelled = cols[-1:] == ["label"]
        for row in reader:
            yield row[0], row[1], float(row[2]), row[-1] if labelled else None


# --------------------------------------------------------------------------- parts

def _write_error(path: Path, e: OSError, committed: int) -> UserError:
    kept = f"the {committed} images committed are kept: run the same command again once"
    if e.errno == errno.ENOSPC:
        return UserError(f"the disk holding {path} is full; {kept} there is space")
    return UserError(f"cannot write {path} ({e.strerror or e}); {kept} it is writable")


class Part:
    """One process's rows and progress. `images`: how many of its shard's images are committed (a
    whole number of batches); `skipped`: the unreadable ones among them."""

    def __init__(self, folder: Path, k: int, n: int, job: dict, fmt: str):
        self.data = folder / f"part-{k:05d}-of-{n:05d}.{fmt}"
        self.progress = self.data.with_suffix(".json")
        self.job, self.k, self.n = job, k, n
        self.images, self.bytes, self.skipped, self.done = 0, 0, [], False
        state = read_progress(self.progress)
        if state and state["job"] == job and self.data.is_file() and self.data.stat().st_size >= state["bytes"]:
            self.images, self.bytes, self.skipped, self.done = (state["images"], state["bytes"], state["skipped"],
                                                                state["done"])
        try:
            self.file = open(self.data, "r+b" if self.data.is_file() else "wb")  # noqa: SIM115  (closed in close)
            self.file.truncate(self.bytes)  # what a kill left past the last commit
            self.file.seek(self.bytes)
        except OSError as e:
            raise _write_error(self.data, e, self.images) from None
        self.pending = (self.images, self.bytes, list(self.skipped))

    def append(self, rows: bytes, images: int, skipped: list[str]) -> None:
        """The rows of the next batch: `images` images (the unreadable `skipped` among them have none)."""
        try:
            self.file.write(rows)
        except OSError as e:
            raise _write_error(self.data, e, self.images) from None
        done, size, gone = self.pending
        self.pending = (done + images, size + len(rows), gone + skipped)

    def commit(self, done: bool = False) -> None:
        images, size, skipped = self.pending
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as e:
            raise _write_error(self.data, e, self.images) from None
        state = {"version": VERSION, "job": self.job, "part": self.k, "parts": self.n, "images": images,
                 "bytes": size, "skipped": skipped, "done": done}
        if not self.data.parent.is_dir():
            raise UserError(f"{self.data.parent}, where this process keeps its part, was removed while it ran: another "
                            "tl.predict on the same --out (with another number of processes) finished and removed "
                            "it, or it was deleted. Run one job per --out: the same command again goes on from what "
                            "is there")
        write_atomic(self.progress, (json.dumps(state) + "\n").encode())
        self.images, self.bytes, self.skipped, self.done = images, size, skipped, done

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()


def read_progress(path: Path) -> dict | None:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and state.get("version") == VERSION else None


# --------------------------------------------------------------------------- the whole output

class Output:
    """OUT and its sidecars: the parts folder while the job runs; metrics, skipped images and (many
    classes) the confusion matrix once it is merged."""

    def __init__(self, out, job: dict, fmt: str):
        self.out, self.job, self.fmt = Path(out), job, fmt
        self.parts = self.out.with_name(self.out.name + ".parts")
        stem = self.out.name.rsplit(".", 1)[0] if "." in self.out.name[1:] else self.out.name
        self.metrics = self.out.with_name(f"{stem}.metrics.json")
        self.skipped = self.out.with_name(f"{stem}.skipped.txt")
        self.confusion = self.out.with_name(f"{stem}.confusion.csv")

    def finished(self) -> dict | None:
        """The record of OUT when it is complete for this job (then there is nothing to do), else None."""
        try:
            record = json.loads(self.metrics.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("job") != self.job:
            return None
        with contextlib.suppress(OSError):
            if self.out.stat().st_size == record.get("bytes"):
                return record
        return None

    def check(self, k: int, n: int, overwrite: bool) -> None:
        """Refuse to mix this job's rows with another's; with overwrite, let this process replace what
        another job left (its own part now, OUT when it merges)."""
        if not self.out.parent.is_dir():
            raise UserError(f"cannot write {self.out}: the folder {self.out.parent} does not exist; create it or "
                            "pass another --out")
        redo = "pass --overwrite to replace it, or another --out"
        if self.out.is_dir():
            raise UserError(f"--out {self.out} is a folder; pass a file name, e.g. {self.out / 'predictions.csv'}")
        if self.out.exists() and not self.parts.is_dir() and not overwrite:
            try:
                other = json.loads(self.metrics.read_text()).get("job")
            except (OSError, ValueError, AttributeError):
                other = None
            what = ("another prediction (another model, images or settings)" if other
                    else "a file tl.predict did not finish")
            raise UserError(f"{self.out} holds {what}; {redo}")
        for progress in sorted(self.parts.glob("part-*.json")) if self.parts.is_dir() else ():
            state = read_progress(progress) or {}
            if state.get("job") == self.job and state.get("parts") == n:
                continue
            mine = progress.name.startswith(f"part-{k:05d}-of-{n:05d}.")
            if overwrite and (mine or not progress.name.endswith(f"-of-{n:05d}.json")):  # never another process's
                for f in (progress, progress.with_suffix(f".{self.fmt}")):
                    f.unlink(missing_ok=True)
            elif overwrite:
                continue  # that process replaces it
            elif state.get("job") == self.job:
                raise UserError(f"{self.parts} holds this prediction split over {state.get('parts')} processes; run "
                                f"it with {state.get('parts')} processes to continue it, or pass --overwrite to start "
                                "over")
            else:
                raise UserError(f"{self.parts} holds an unfinished prediction of another job ({progress.name}: "
                                f"another model, images or settings); {redo}")

    def open_part(self, k: int, n: int) -> Part:
        try:
            self.parts.mkdir(exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot write next to {self.out} ({e.strerror or e}); make {self.out.parent} writable "
                            "or pass another --out") from None
        return Part(self.parts, k, n, self.job, self.fmt)

    def merge(self, n: int, top_k: int, labelled: bool, summarize) -> dict | None:
        """When all n parts are done: OUT from them, atomically, then its record (the job, `bytes`,
        `rows`, `skipped`, and summarize(the merged file)) written as the metrics file, the parts
        removed. Returns the record; None while parts are missing, or when another process merged."""
        try:
            lock = open(self.parts / "merge.lock", "a")  # noqa: SIM115
        except FileNotFoundError:  # merged and removed meanwhile
            return None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.finished():  # merged by another process of this job, or by one of another process count
                self._remove_parts(n)
                return None
            states = [read_progress(self.parts / f"part-{k:05d}-of-{n:05d}.json") for k in range(n)]
            if not all(s and s["job"] == self.job and s["done"] for s in states):
                return None
            tmp = self.out.with_name(f".{self.out.name}.{os.getpid()}.tmp")
            try:
                with open(tmp, "wb") as f:
                    f.write(header(self.fmt, top_k, labelled))
                    for k, state in enumerate(states):
                        with open(self.parts / f"part-{k:05d}-of-{n:05d}.{self.fmt}", "rb") as part:
                            _copy(part, f, state["bytes"])
                    f.flush()
                    os.fsync(f.fileno())
                    size = f.tell()
                record = {"job": self.job, "bytes": size, "skipped": sum(len(s["skipped"]) for s in states),
                          **summarize(tmp)}
                skipped = [name for s in states for name in s["skipped"]]
                if skipped:
                    write_atomic(self.skipped, "".join(f"{name}\n" for name in skipped).encode("utf-8",
                                                                                              "surrogateescape"))
                else:
                    self.skipped.unlink(missing_ok=True)
                os.replace(tmp, self.out)
                fsync_dir(self.out.parent)
            except OSError as e:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise _write_error(self.out, e, sum(s["images"] for s in states)) from None
            write_atomic(self.metrics, (json.dumps(record, indent=1) + "\n").encode())
            self._remove_parts(n)
        return record

    def _remove_parts(self, n: int) -> None:
        """This job's n parts; the folder too once empty. Another job's parts on the same --out (another
        process count) stay: their process is still writing them."""
        for k in range(n):
            for suffix in ("json", self.fmt):
                (self.parts / f"part-{k:05d}-of-{n:05d}.{suffix}").unlink(missing_ok=True)
        try:
            others = any(p.name.startswith("part-") for p in self.parts.iterdir())
        except FileNotFoundError:  # the process that merged removed it while this one waited for the lock
            return
        if not others:
            shutil.rmtree(self.parts, ignore_errors=True)


def _copy(src, dst, size: int) -> None:
    while size > 0:
        block = src.read(min(size, 1 << 20))
        if not block:
            raise OSError(errno.EIO, f"{src.name} is shorter than its committed {size} bytes")
        dst.write(block)
        size -= len(block)
