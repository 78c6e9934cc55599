"""A split's images read for training: decoded into memory at start-up, or checked now and decoded when streamed.

`memory` keeps every decoded image (hymenoptera: about 150 MB a process); `stream` decodes in
DataLoader workers every epoch, the same pixels. choose_data_mode picks one for the machine.
"""

import dataclasses
import functools
import os
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from tl.core.errors import UserError
from tl.data.listing import Listing
from tl.data.preprocess import Preprocess, decode


@dataclass
class Split:
    """One split decoded into memory: uint8 CHW images, integer labels, the files it skipped."""
    images: list[torch.Tensor]
    targets: list[int]
    paths: list[str]
    skipped: list[str] = field(default_factory=list)


UNREADABLE = (OSError, ValueError, Image.DecompressionBombError)  # what makes a file no image, not a bug


def _decode_or_error(path: str, pre: Preprocess, train: bool):
    try:
        return decode(path, pre, train)
    except UNREADABLE as e:
        return e


def _read_all(samples: list[tuple[str, int]], read, verb: str, train: bool, main: bool, strict: bool,
              threads: bool = True, name=str) -> Split:
    """read(path) for every (path, label), in threads (PIL releases the GIL; without `threads` when a
    read is too short to pay for a thread hand-off), kept in order: a result,
    or the exception that makes a file unreadable: skipped with a warning, or with strict, the end of
    the run. Only the main process shows progress and warnings; they call a file name(path) (a label
    file's line, tl.data.labels.naming)."""
    split = Split([], [], [])
    pool = ThreadPoolExecutor(max_workers=usable_cpus())
    try:
        results = (pool.map if threads else map)(read, [path for path, _ in samples])
        for (path, target), result in tqdm(zip(samples, results), total=len(samples), leave=False,
                                           desc=f"{verb} {'train' if train else 'val'}", disable=not main):
            if isinstance(result, Exception) and strict:
                raise UserError(f"unreadable image {name(path)} ({result}); remove or replace it, or pass "
                                "--strict-images off to skip such files")
            if isinstance(result, Exception):
                if main:
                    warnings.warn(f"skipping unreadable image {name(path)}: {result}", stacklevel=1)
                split.skipped.append(path)
            else:
                split.images.append(result)
                split.targets.append(target)
                split.paths.append(path)
    except BaseException:
        # A stop signal (its handler raises here) or an error: drop the queued work at once
        # instead of waiting for the whole set.
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    if not split.images:
        raise UserError(f"none of the {len(samples)} files is a readable image "
                        f"({samples[0][0] if samples else 'no files'}, ...); check the files")
    return split


def load_split(samples: list[tuple[str, int]], pre: Preprocess, train: bool, main: bool,
               strict: bool = False, name=str) -> Split:
    """Decode (path, label) pairs, e.g. a Listing's train, into memory; unreadable files are skipped
    with a warning, or with strict, end the run."""
    return _read_all(samples, lambda path: _decode_or_error(path, pre, train), "decode", train, main, strict,
                     name=name)


class LazyImages:
    """A split's images decoded on access (in DataLoader workers): memory does not grow with the set.
    Decoding is tl.data.preprocess.decode, exactly as the memory path's, so both give the same pixels."""

    def __init__(self, paths: list[str], pre: Preprocess, train: bool):
        self.paths, self.pre, self.train = paths, pre, train

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return decode(self.paths[i], self.pre, self.train)
        except UNREADABLE as e:
            raise UserError(f"unreadable image {self.paths[i]} while streaming ({e}); replace it or remove it and "
                            "start the run afresh (a resume refuses a changed data set); --data-mode memory and "
                            "python -m tl.pack decode every image before training and skip such files") from None


def _signature_or_error(path: str):
    """Stream mode's start-up check of one file, a few microseconds: its first bytes name a format
    Pillow reads (Pillow's own signature tests). Damage past them stops the run when a worker meets it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # never blocks, even on a FIFO swapped in since the listing
        try:
            head = os.read(fd, 16)
        finally:
            os.close(fd)
    except OSError as e:
        return e
    if not head:
        return ValueError("an empty file")
    for accept in _signatures():
        try:
            if accept(head):
                return True
        except (struct.error, IndexError, ValueError):  # a signature test that needs more bytes than a tiny file has
            pass
    return ValueError(f"its first bytes {head[:8]!r} match no image format")


@functools.cache
def _signatures() -> list:
    Image.init()
    ids = sorted(Image.ID, key=lambda i: i not in ("JPEG", "PNG"))  # the usual ones first
    return [Image.OPEN[i][1] for i in ids if Image.OPEN[i][1]]


def stream_split(samples: list[tuple[str, int]], pre: Preprocess, train: bool, main: bool,
                 strict: bool = False, name=str) -> Split:
    """Like load_split, but only each file's signature is checked now; the pixels are decoded every
    epoch by whoever indexes the split (DataLoader workers)."""
    checked = _read_all(samples, _signature_or_error, "check", train, main, strict, threads=False, name=name)
    return dataclasses.replace(checked, images=LazyImages(checked.paths, pre, train))


def decoded_bytes(listing: Listing, pre: Preprocess) -> int:
    """An upper bound on the memory path's decoded pixels: train images with the shorter side at
    2x the crop (4:3), val and test at the crop."""
    side = 2 * max(pre.crop, pre.train_crop)
    return len(listing.train) * side * side * 4 // 3 * 3 + (len(listing.val) + len(listing.test)) * pre.crop ** 2 * 3


def available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def choose_data_mode(requested: str, listing: Listing, pre: Preprocess, processes_on_node: int) -> tuple[str, str]:
    """memory (decode once, keep it: fastest when it fits) or stream (decode every epoch in workers);
    auto picks memory while every process's copy fits in half the available memory. Returns the
    mode and why, for the run to say."""
    need, free = decoded_bytes(listing, pre), available_memory()
    why = (f"at most {need / 2**30:.2f} GiB of decoded images per process, {processes_on_node} process(es) on "
           f"this node, {free / 2**30:.1f} GiB available")
    if requested != "auto":
        return requested, f"--data-mode {requested}; {why}"
    return ("memory" if need * processes_on_node <= free // 2 else "stream"), f"auto: {why}"


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what SLURM or taskset lets this process use
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1
