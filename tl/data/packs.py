"""The pack format (written by tl.pack): its file names and tar headers, and a pack's description read and checked.

A pack is a folder:

    tl-pack.json              format, version, classes, source fingerprint, per split: count,
                              shards, class runs, the source files left out as unreadable
    train.json, val.json      wids shard indexes ({"wids_version": 1, "shardlist": [...]}), shard
                              URLs relative to the folder
    train-offsets.npy, ...    per split, int64 (count, 3): sample i's image bytes as (offset in its
                              shard, size, CRC-32); its shard follows from the shardlist's nsamples
    train-000000.tar, ...     WebDataset tar shards: per image `<key>.cls` (class index, ASCII)
                              and `<key>.<ext>` (the original file's bytes, never re-encoded)

Sample i of a split is the i-th readable image of `tl.data.listing.list_images(SRC)` for that split (the
key is i, zero-padded), so a pack's order, classes and fingerprint are those of its source folder.

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

Every read checks its bytes: the offsets table holds each image's CRC-32 (zlib's, computed from the
finished shard on disk when it was packed), and a sample whose bytes differ is a DamagedSample, never
different pixels. CRC-32 because the threat is a flipped or lost byte on a disk or a copy, not an
attacker: it catches every error burst up to 32 bits and all but 2^-32 of the rest, at several GB/s
(about 1% of a JPEG's decoding time). The index's per-shard md5 sums cover the tar headers too;
`python -m tl.pack --verify PACK` checks both over the whole pack.
"""

import contextlib
import io
import json
import os
import re
import resource
import warnings
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from tl.core.errors import UserError
from tl.data.listing import Listing
from tl.data.preprocess import decode
from tl.data.splits import UNREADABLE, Split, usable_cpus

PACK_FILE = "tl-pack.json"
FORMAT = "tl-pack"
VERSION = 3  # 2: {split}-offsets.npy, each image's place in its shard; 3: and its CRC-32 (older: packed again)
SPLITS = ("train", "val")
KEY_DIGITS = 8
SHARD_NAME = re.compile(r"^(train|val)-\d{6,}\.tar$")
BLOCK = 512  # a tar header block
OFFSETS_DTYPE = np.dtype("<i8")
OFFSETS_COLUMNS = 3  # offset, size, CRC-32


class DamagedSample(ValueError):
    """A pack sample whose bytes fail their CRC-32: skipped like an unreadable image, or an error under
    --strict-images on."""


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:06d}.tar"


def offsets_name(split: str) -> str:
    return f"{split}-offsets.npy"


def sample_key(i: int) -> str:
    return f"{i:0{KEY_DIGITS}d}"


def is_pack(path) -> bool:
    """Whether path is a folder holding a pack (its tl-pack.json)."""
    return (Path(path) / PACK_FILE).is_file()


def tar_header(block: bytes) -> tuple[str, int]:
    """(name, size) of a tar header block of a plain file; ValueError if it is no such header (bad
    checksum, another member type). tl.pack reads offsets back through it, PackedSplit checks with it."""
    if len(block) != BLOCK:
        raise ValueError(f"a tar header has {BLOCK} bytes, not {len(block)}")
    try:
        stored = int(block[148:156].strip(b"\0 "), 8)
    except ValueError:
        stored = -1
    if stored != sum(block[:148]) + 8 * 32 + sum(block[156:]):  # the checksum field counts as 8 spaces
        raise ValueError("no tar header there (checksum)")
    if block[156:157] not in (b"0", b"\0"):
        raise ValueError(f"a tar member of type {block[156:157]!r}, not a file")
    if block[124] & 0x80:  # GNU base-256 size (8 GiB and more)
        size = int.from_bytes(block[125:136], "big")
    else:
        size = int(block[124:136].strip(b"\0 ") or b"0", 8)
    name = block[:100].split(b"\0", 1)[0]
    prefix = block[345:500].split(b"\0", 1)[0] if block[257:262] == b"ustar" else b""
    if prefix:
        name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape"), size


@dataclass
class PackInfo:
    """A checked pack: what tl-pack.json says, with every shard present at its recorded size."""
    path: Path
    classes: list[str]
    fingerprint: str  # the source's tl.data.listing.list_images fingerprint: a run on the folder and on its pack agree
    counts: dict[str, int]  # packed images per split
    unreadable: dict[str, list[str]]  # per split: source files (relative to the source) left out
    shards: dict[str, list[dict]]  # per split: wids shardlist entries, url made absolute, filesize as on disk
    runs: dict[str, list[list[int]]]  # per split: [[class index, run length], ...] in sample order
    offsets: dict[str, Path]  # per split: the (count, 3) int64 .npy of (offset, size, CRC-32) of each image
    meta: dict  # tl-pack.json as read

    def targets(self, split: str) -> list[int]:
        return [c for c, n in self.runs[split] for _ in range(n)]

    def names(self, split: str) -> list[str]:
        """Where each sample is, `DIR/train-000000.tar#00000012` (what a Split's paths hold)."""
        return [f"{shard['url']}#{sample_key(i)}"
                for shard, start in zip(self.shards[split], _starts(self.shards[split]))
                for i in range(start, start + shard["nsamples"])]

    def listing(self):
        """A tl.data.listing.Listing of the pack (classes, fingerprint, (name, class) per sample; reads no shard),
        for code written for folders: the run's identity, tl.data.splits.choose_data_mode."""
        return Listing(self.classes, *([*zip(self.names(s), self.targets(s))] for s in SPLITS),
                       fingerprint=self.fingerprint)

    def repack_hint(self) -> str:
        root = f" --data-root {self.meta['data_root']}" if self.meta.get("data_root") else ""
        return f"pack the source again: python -m tl.pack {self.meta.get('source') or 'SRC'} {self.path}{root}"


def _starts(shards: list[dict]) -> list[int]:
    starts, n = [], 0
    for shard in shards:
        starts.append(n)
        n += shard["nsamples"]
    return starts


def _damaged(file: Path, why: str) -> UserError:
    return UserError(f"{file} is damaged ({why}); pack the source again with python -m tl.pack SRC "
                     f"{file.parent} (into an empty or new folder)")


def read_meta(path, any_version: bool = False) -> dict:
    """tl-pack.json of a pack as a dict, checked for format and version only (any_version: an older
    version too, for tl.pack to pack it again)."""
    file = Path(path) / PACK_FILE
    if not file.is_file():
        raise UserError(f"{path} is not a tl pack (no {PACK_FILE}); make one with python -m tl.pack SRC {path}")
    try:
        meta = json.loads(file.read_bytes())
    except OSError as e:
        raise UserError(f"cannot read {file} ({e.strerror}); check its permissions") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise _damaged(file, f"not JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{file} is not a tl pack description (format is not {FORMAT!r}); pass a folder made "
                        "by python -m tl.pack")
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _damaged(file, f"version {version!r}")
    if version > VERSION:
        raise UserError(f"{file} has pack format version {version}, newer than this tl reads ({VERSION}); "
                        "update tl, or pack the source again with this one")
    if version < VERSION and not any_version:
        source = meta.get("source") if isinstance(meta.get("source"), str) else "SRC"
        raise UserError(f"{file} has the old pack format version {version} (this tl reads {VERSION}: each "
                        f"image at a stored offset); pack the source again: python -m tl.pack {source} {path} "
                        "(repacks it in place)")
    return meta


def open_pack(path) -> PackInfo:
    """Read and check a pack: tl-pack.json, both wids indexes, every shard's presence and size
    (one stat per shard; no shard is read), each offsets file's shape (its header). Any problem is
    one UserError naming the file."""
    root = Path(path)
    meta = read_meta(root)
    file = root / PACK_FILE
    classes, fingerprint, splits = meta.get("classes"), meta.get("fingerprint"), meta.get("splits")
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)):
        raise _damaged(file, "classes is not a list of at least 2 names")
    if not isinstance(fingerprint, str) or not isinstance(splits, dict):
        raise _damaged(file, "no fingerprint or splits")
    info = PackInfo(root, classes, fingerprint, {}, {}, {}, {}, {}, meta)
    for split in SPLITS:
        s = splits.get(split)
        if not isinstance(s, dict):
            raise _damaged(file, f"no {split} split")
        count, runs, unreadable = s.get("count"), s.get("targets"), s.get("unreadable", [])
        ok_runs = isinstance(runs, list) and all(
            isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) for v in r)
            and 0 <= r[0] < len(classes) and r[1] > 0 for r in runs)
        if not isinstance(count, int) or count < 1 or not ok_runs or sum(r[1] for r in runs) != count:
            raise _damaged(file, f"{split}: count and class runs disagree")
        info.counts[split], info.runs[split] = count, runs
        info.unreadable[split] = [u["path"] if isinstance(u, dict) else str(u) for u in unreadable]
        info.shards[split] = read_index(root, split, count)
        name = s.get("offsets")
        if not isinstance(name, str) or "/" in name or not name:
            raise _damaged(file, f"{split}: no offsets file named")
        info.offsets[split] = check_offsets(root / name, count)
    return info


def read_index(root: Path, split: str, count: int) -> list[dict]:
    """The wids index of a split, checked against the shards on disk; urls made absolute."""
    file = root / f"{split}.json"
    try:
        index = json.loads(file.read_bytes())
    except FileNotFoundError:
        raise UserError(f"{file} is missing: the pack in {root} is incomplete; pack the source again "
                        "with python -m tl.pack") from None
    except OSError as e:
        raise UserError(f"cannot read {file} ({e.strerror}); check its permissions") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise _damaged(file, f"not JSON: {e}") from None
    shardlist = index.get("shardlist") if isinstance(index, dict) else None
    if not isinstance(shardlist, list) or index.get("wids_version") != 1 or not shardlist:
        raise _damaged(file, "not a wids shard index with wids_version 1 and a shardlist")
    shards = []
    for entry in shardlist:
        url, n, size = (entry.get(k) if isinstance(entry, dict) else None for k in ("url", "nsamples", "filesize"))
        if not isinstance(url, str) or "/" in url or not isinstance(n, int) or n < 1:
            raise _damaged(file, f"bad shardlist entry {entry!r}")
        shard = root / url
        try:
            st = shard.stat()
        except FileNotFoundError:
            raise UserError(f"shard {shard} is missing (listed in {file}); copy the whole pack folder, or pack "
                            "the source again with python -m tl.pack") from None
        except OSError as e:
            raise UserError(f"cannot read shard {shard} ({e.strerror}); check the pack folder") from None
        if isinstance(size, int) and st.st_size != size:
            raise UserError(f"shard {shard} has {st.st_size} bytes, {file} says {size}: it is truncated or "
                            "was replaced; copy the pack again, or pack the source again with python -m tl.pack")
        shards.append({**entry, "url": str(shard.absolute()), "filesize": st.st_size})
    if sum(s["nsamples"] for s in shards) != count:
        raise _damaged(file, f"its shards hold {sum(s['nsamples'] for s in shards)} samples, "
                             f"{root / PACK_FILE} says {count}")
    return shards


def check_offsets(file: Path, count: int) -> Path:
    """An offsets file's .npy header and length: int64, (count, 3), nothing more or less (no data read)."""
    try:
        with open(file, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f".npy version {version}")
            shape, fortran, dtype = read_header(f)
            have = os.fstat(f.fileno()).st_size - f.tell()
    except FileNotFoundError:
        raise UserError(f"{file} is missing: the pack in {file.parent} is incomplete; pack the source again "
                        "with python -m tl.pack") from None
    except OSError as e:
        raise UserError(f"cannot read {file} ({e.strerror}); check its permissions") from None
    except ValueError as e:
        raise _damaged(file, f"not an offsets table: {e}") from None
    if shape != (count, OFFSETS_COLUMNS) or dtype != OFFSETS_DTYPE or fortran or \
            have != count * OFFSETS_COLUMNS * OFFSETS_DTYPE.itemsize:
        raise _damaged(file, f"{dtype} {shape} with {have} data bytes where int64 ({count}, {OFFSETS_COLUMNS}) "
                             "belongs")
    return file



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
            if table.shape != (len(self), OFFSETS_COLUMNS) or table.dtype != OFFSETS_DTYPE:
                raise _damaged(file, f"{table.dtype} {table.shape} where int64 ({len(self)}, {OFFSETS_COLUMNS}) "
                                     "belongs")
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

    check_bytes = True  # every read checks its CRC-32 (bench/data.py measures the cost with it off)

    def read(self, i) -> bytes:
        """The image file's bytes of sample i: one read at its stored offset, with the tar header in
        front, which must name sample i (so a shard changed since packing is an error, never wrong data),
        and the bytes' CRC-32 checked (a damaged sample raises DamagedSample)."""
        i = self._index(i)
        s = int(np.searchsorted(self._ends, i, side="right"))
        offset, size, crc = self._table()[i].tolist()
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
        data = buf[BLOCK:]
        if self.check_bytes and zlib.crc32(data) != crc:
            raise DamagedSample(f"sample {key} of shard {url} fails its checksum (CRC-32 {zlib.crc32(data):08x}, "
                                f"packed {crc:08x}): its bytes changed since packing")
        return data

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
    """tl.data.preprocess.decode on an image file's bytes: the same uint8 CHW tensor as decoding the file."""
    return decode(io.BytesIO(data), pre, train)


def _decode_or_error(args):
    try:
        return decode_bytes(*args)
    except UNREADABLE as e:  # what tl.data.splits.load_split skips
        return e


def _open_split(path, split: str, info: PackInfo | None, strict: bool) -> tuple["PackedSplit", list[str]]:
    """A split to read, and the source files the pack left out as unreadable (refused with strict)."""
    ds = PackedSplit(path, split, info)
    left_out = ds.info.unreadable[split]
    if strict and left_out:
        raise UserError(f"the pack {path} left out {len(left_out)} unreadable {split} image(s) of its source (e.g. "
                        f"{left_out[0]}); fix or remove them in the source and pack it again, or pass "
                        "--strict-images off")
    return ds, left_out


def load_packed_split(path, split: str, pre, train: bool, main: bool, strict: bool = False,
                      info: PackInfo | None = None):
    """tl.data.splits.load_split for a pack: every image of the split decoded into memory (a tl.data.splits.Split,
    paths like `DIR/train-000000.tar#00000012`), shards read in order. The files the pack left out
    as unreadable are the Split's skipped (relative to the source folder)."""
    ds, left_out = _open_split(path, split, info, strict)
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
                    what = "damaged" if isinstance(img, DamagedSample) else "unreadable"
                    warnings.warn(f"skipping {what} image {where}: {img}", stacklevel=1)
                out.skipped.append(where)
            else:
                out.images.append(img)
                out.targets.append(ds.targets[i])
                out.paths.append(where)

        for i in tqdm(range(len(ds)), leave=False, desc=f"decode {split}", disable=not main):
            try:
                data = ds.read(i)
            except DamagedSample as e:
                if strict:
                    raise UserError(f"damaged image in the pack: {e}; copy the pack again, or "
                                    f"{ds.info.repack_hint()}, or pass --strict-images off to skip it") from None
                pending.append((i, pool.submit(lambda e=e: e)))
            else:
                pending.append((i, pool.submit(_decode_or_error, (data, pre, train))))
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
    """A pack's split decoded on access (in DataLoader workers), like tl.data.splits.LazyImages: item i is
    decode_bytes of sample i. Every image was fully decoded once when the pack was made."""

    def __init__(self, split: PackedSplit, pre, train: bool):
        self.split, self.pre, self.train = split, pre, train

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        try:
            data = self.split.read(i)
        except DamagedSample as e:
            raise UserError(f"damaged image while streaming the pack: {e}; copy the pack again, or "
                            f"{self.split.info.repack_hint()}; --data-mode memory skips damaged images (with "
                            "--strict-images off)") from None
        try:
            return decode_bytes(data, self.pre, self.train)
        except UNREADABLE as e:
            raise UserError(f"unreadable image {self.split.where(i)} while streaming ({e}): the pack is damaged; "
                            "copy it again, or pack the source again with python -m tl.pack") from None


def stream_packed_split(path, split: str, pre, train: bool, main: bool, strict: bool = False,
                        info: PackInfo | None = None):
    """tl.data.splits.stream_split for a pack: a tl.data.splits.Split whose images decode on access (PackedImages);
    nothing is read now (the pack checked every image when it was made)."""
    ds, left_out = _open_split(path, split, info, strict)
    return Split(PackedImages(ds, pre, train), list(ds.targets), ds.info.names(split), skipped=list(left_out))
