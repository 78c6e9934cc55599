"""A pack's images read at their stored offsets (PackedSplit), its splits decoded into memory or streamed.

Reading by stored offsets. A pack is still a plain WebDataset/wids data set (wids.ShardListDataset
reads train.json as it is), but tl does not read it through wids: wids' IndexedTarSamples indexes a
shard by scanning all its tar headers each time a process opens it, ~26 us a sample (1.1-2.6 s per
shard of 80k small images, ~33 s at ImageNet's 1.28M images), and DataLoader workers are new every
epoch, so every worker paid that every epoch. tl.pack records where each image's bytes are;
PackedSplit reads item i with one pread at that offset (the 512-byte tar header in front of it is
read too and must name sample i: a shard replaced or shifted since packing is an error, not wrong
data), and its class comes from tl-pack.json. Shards are read in place (no copy into a cache dir,
no lock file, nothing written), so a read-only pack on a shared file system works. Staging to
node-local disk: a pack is relocatable (relative shard names), so on a cluster whose shared file
system is slow, copy it to each node's local disk before training and pass that copy, e.g. in a
SLURM job script before the training step:

    srun --ntasks-per-node=1 --nodes="$SLURM_NNODES" rsync -a /lustre/packs/hym/ "$TMPDIR/hym/"
    DATA_DIR="$TMPDIR/hym"   # --data-dir $TMPDIR/hym

Each shard is one large file kept open per process, so even in place a shared file system sees a
few hundred opens instead of one per image.
"""

import contextlib
import io
import os
import resource
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from tl.errors import UserError
from tl.pack_format import BLOCK, OFFSETS_DTYPE, SPLITS, PackInfo, _damaged, open_pack, sample_key, tar_header
from tl.preprocess import decode
from tl.splits import UNREADABLE, Split, usable_cpus


def _open_file_budget(shards: int) -> int:
    """How many of a split's shards may be open at once in this process: all of them (the soft
    descriptor limit lifted towards the hard one if needed), or under a low hard limit a share of it
    (then the least recently read shard is closed)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * shards + 256  # a pack's two splits, and room for everything else
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return shards
    return max(8, min(shards, (soft - 256) // 2))


class PackedSplit(Dataset):
    """One split of a pack as a map-style Dataset: item i is (the image file's bytes, class index),
    read by random access at the offset tl.pack stored, so DistributedSampler, strided val shards
    and any index order work. Decode with decode_bytes. `targets` comes from tl-pack.json. Shards
    (and the offsets table) open lazily in each process (DataLoader workers included) and stay open;
    nothing open is pickled (spawned workers open their own)."""

    def __init__(self, path, split: str, info: PackInfo | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        self.info = info if info is not None else open_pack(path)
        self.split = split
        self.targets = self.info.targets(split)
        shards = self.info.shards[split]
        self._urls = [s["url"] for s in shards]
        self._sizes = [s["filesize"] for s in shards]
        self._ends = np.cumsum([s["nsamples"] for s in shards])
        self._offsets = None  # per process: the offsets table, memory-mapped
        self._files = OrderedDict()  # per process: shard index -> open descriptor, least recently read first
        self._max_open = 0

    def __len__(self):
        return self.info.counts[self.split]

    def __getstate__(self):  # to DataLoader workers under spawn: no descriptors, no memory maps
        return {**self.__dict__, "_offsets": None, "_files": OrderedDict(), "_max_open": 0}

    def _index(self, i) -> int:
        n, i = len(self), int(i)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} {self.split} samples")
        return i % n

    def _table(self) -> np.ndarray:
        if self._offsets is None:
            file = self.info.offsets[self.split]
            try:
                table = np.load(file, mmap_mode="r")
            except FileNotFoundError:
                raise UserError(f"{file} is missing: the pack is incomplete; {self.info.repack_hint()}") from None
            except (OSError, ValueError) as e:
                raise _damaged(file, f"{type(e).__name__}: {e}") from None
            if table.shape != (len(self), 2) or table.dtype != OFFSETS_DTYPE:
                raise _damaged(file, f"{table.dtype} {table.shape} where int64 ({len(self)}, 2) belongs")
            self._offsets = table
        return self._offsets

    def _fd(self, s: int) -> int:
        fd = self._files.get(s)
        if fd is not None:
            self._files.move_to_end(s)
            return fd
        if not self._max_open:
            self._max_open = _open_file_budget(len(self._urls))
        while len(self._files) >= self._max_open:
            os.close(self._files.popitem(last=False)[1])
        url = self._urls[s]
        try:
            fd = os.open(url, os.O_RDONLY)
        except FileNotFoundError:
            raise UserError(f"shard {url} is missing; copy the whole pack folder, or "
                            f"{self.info.repack_hint()}") from None
        except OSError as e:
            raise UserError(f"cannot read shard {url} ({e.strerror}); check the pack folder") from None
        self._files[s] = fd
        return fd

    def where(self, i) -> str:
        """`DIR/train-000000.tar#00000012`: sample i's shard and key."""
        i = self._index(i)
        return f"{self._urls[int(np.searchsorted(self._ends, i, side='right'))]}#{sample_key(i)}"

    def read(self, i) -> bytes:
        """The image file's bytes of sample i: one read at its stored offset, with the tar header in
        front, which must name sample i (so a shard changed since packing is an error, never wrong data)."""
        i = self._index(i)
        s = int(np.searchsorted(self._ends, i, side="right"))
        offset, size = self._table()[i].tolist()
        url, key, shard_bytes = self._urls[s], sample_key(i), self._sizes[s]
        if not (offset >= BLOCK and size >= 0 and offset + size <= shard_bytes):
            raise _damaged(self.info.offsets[self.split], f"sample {key} at bytes {offset}..{offset + size} of "
                                                          f"{url}, which has {shard_bytes}")
        try:
            buf = os.pread(self._fd(s), BLOCK + size, offset - BLOCK)
        except OSError as e:
            raise UserError(f"cannot read shard {url} ({e.strerror}); check the pack folder") from None
        try:
            if len(buf) != BLOCK + size:
                raise ValueError(f"the shard ends before byte {offset + size}: truncated")
            name, stored = tar_header(buf[:BLOCK])
            if not name.startswith(key + ".") or name == f"{key}.cls" or stored != size:
                raise ValueError(f"the tar header there names {name!r} of {stored} bytes, not its image of {size}")
        except ValueError as e:
            raise UserError(f"shard {url} does not match the pack's offsets (sample {key}, byte {offset - BLOCK}: "
                            f"{e}): the pack is damaged; copy it again, or {self.info.repack_hint()}") from None
        return buf[BLOCK:]

    def __getitem__(self, i):
        i = self._index(i)
        return self.read(i), self.targets[i]

    def close(self):
        files, self._files, self._offsets = self._files, OrderedDict(), None
        for fd in files.values():
            with contextlib.suppress(OSError):
                os.close(fd)

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


def decode_bytes(data: bytes, pre, train: bool) -> torch.Tensor:
    """tl.preprocess.decode on an image file's bytes: the same uint8 CHW tensor as decoding the file."""
    return decode(io.BytesIO(data), pre, train)


def _decode_or_error(args):
    try:
        return decode_bytes(*args)
    except UNREADABLE as e:  # what tl.splits.load_split skips
        return e


def load_packed_split(path, split: str, pre, train: bool, main: bool, strict: bool = False,
                      info: PackInfo | None = None):
    """tl.splits.load_split for a pack: every image of the split decoded into memory (a tl.splits.Split,
    paths like `DIR/train-000000.tar#00000012`), shards read in order. The files the pack left out
    as unreadable are the Split's skipped (relative to the source folder)."""
    ds = PackedSplit(path, split, info)
    left_out = ds.info.unreadable[split]
    if strict and left_out:
        raise UserError(f"the pack {path} left out {len(left_out)} unreadable {split} image(s) of its source (e.g. "
                        f"{left_out[0]}); fix or remove them in the source and pack it again, or pass "
                        "--strict-images off")
    names = ds.info.names(split)
    out = Split([], [], [], skipped=list(left_out))
    workers = usable_cpus()
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        pending = []

        def finish(item):
            i, future = item
            img, where = future.result(), names[i]
            if isinstance(img, Exception) and strict:
                raise UserError(f"unreadable image {where} ({img}); pack the source again, or pass --strict-images off "
                                "to skip such images")
            if isinstance(img, Exception):
                if main:
                    warnings.warn(f"skipping unreadable image {where}: {img}", stacklevel=1)
                out.skipped.append(where)
            else:
                out.images.append(img)
                out.targets.append(ds.targets[i])
                out.paths.append(where)

        for i in tqdm(range(len(ds)), leave=False, desc=f"decode {split}", disable=not main):
            pending.append((i, pool.submit(_decode_or_error, (ds.read(i), pre, train))))
            if len(pending) >= 4 * workers:
                finish(pending.pop(0))
        for item in pending:
            finish(item)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        ds.close()
        raise
    pool.shutdown()
    ds.close()
    if not out.images:
        raise UserError(f"none of the {len(ds)} {split} images of the pack {path} is readable; pack the source again")
    return out


class PackedImages:
    """A pack's split decoded on access (in DataLoader workers), like tl.splits.LazyImages: item i is
    decode_bytes of sample i. Every image was fully decoded once when the pack was made."""

    def __init__(self, split: PackedSplit, pre, train: bool):
        self.split, self.pre, self.train = split, pre, train

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        data = self.split.read(i)
        try:
            return decode_bytes(data, self.pre, self.train)
        except UNREADABLE as e:
            raise UserError(f"unreadable image {self.split.where(i)} while streaming ({e}): the pack is damaged; "
                            "copy it again, or pack the source again with python -m tl.pack") from None


def stream_packed_split(path, split: str, pre, train: bool, main: bool, strict: bool = False,
                        info: PackInfo | None = None):
    """tl.splits.stream_split for a pack: a tl.splits.Split whose images decode on access (PackedImages);
    nothing is read now (the pack checked every image when it was made)."""
    ds = PackedSplit(path, split, info)
    left_out = ds.info.unreadable[split]
    if strict and left_out:
        raise UserError(f"the pack {path} left out {len(left_out)} unreadable {split} image(s) of its source (e.g. "
                        f"{left_out[0]}); fix or remove them in the source and pack it again, or pass "
                        "--strict-images off")
    return Split(PackedImages(ds, pre, train), list(ds.targets), ds.info.names(split), skipped=list(left_out))
