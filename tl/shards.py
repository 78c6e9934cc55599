"""Packed data sets: read what `python -m tl.pack` wrote (WebDataset tar shards, wids indexes).

A pack is a folder:

    tl-pack.json              format, version, classes, source fingerprint, per split: count,
                              shards, class runs, the source files left out as unreadable
    train.json, val.json      wids shard indexes ({"wids_version": 1, "shardlist": [...]}), shard
                              URLs relative to the folder
    train-000000.tar, ...     WebDataset tar shards: per image `<key>.cls` (class index, ASCII)
                              and `<key>.<ext>` (the original file's bytes, never re-encoded)

Sample i of a split is the i-th readable image of `tl.data.list_images(SRC)` for that split (the
key is i, zero-padded), so a pack's order, classes and fingerprint are those of its source folder.

Reading in place. wids' ShardListDataset copies every shard into a cache dir (/tmp/_wids_cache)
and takes lock files next to it before reading; PackedSplit reads local shards where they are
(memory-mapped, no copy, no lock file, nothing written), so a read-only pack on a shared file
system works. Staging to node-local disk: a pack is relocatable (relative shard names), so on a
cluster whose shared file system is slow, copy it to each node's local disk before training and
pass that copy, e.g. in a SLURM job script before the training step:

    srun --ntasks-per-node=1 --nodes="$SLURM_NNODES" rsync -a /lustre/packs/hym/ "$TMPDIR/hym/"
    DATA_DIR="$TMPDIR/hym"   # --data-dir $TMPDIR/hym

Each shard is one large file read from start to end, so even in place a shared file system sees a
few hundred opens instead of one per image.
"""

import contextlib
import io
import json
import re
import resource
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from tl.errors import UserError

PACK_FILE = "tl-pack.json"
FORMAT = "tl-pack"
VERSION = 1
SPLITS = ("train", "val")
KEY_DIGITS = 8
SHARD_NAME = re.compile(r"^(train|val)-\d{6,}\.tar$")


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:06d}.tar"


def sample_key(i: int) -> str:
    return f"{i:0{KEY_DIGITS}d}"


def is_pack(path) -> bool:
    """Whether path is a folder holding a pack (its tl-pack.json)."""
    return (Path(path) / PACK_FILE).is_file()


@dataclass
class PackInfo:
    """A checked pack: what tl-pack.json says, with every shard present at its recorded size."""
    path: Path
    classes: list[str]
    fingerprint: str  # the source's tl.data.list_images fingerprint: a run on the folder and on its pack agree
    counts: dict[str, int]  # packed images per split
    unreadable: dict[str, list[str]]  # per split: source files (relative to the source) left out
    shards: dict[str, list[dict]]  # per split: wids shardlist entries, url made absolute
    runs: dict[str, list[list[int]]]  # per split: [[class index, run length], ...] in sample order
    meta: dict  # tl-pack.json as read

    def targets(self, split: str) -> list[int]:
        return [c for c, n in self.runs[split] for _ in range(n)]

    def names(self, split: str) -> list[str]:
        """Where each sample is, `DIR/train-000000.tar#00000012` (what a Split's paths hold)."""
        return [f"{shard['url']}#{sample_key(i)}"
                for shard, start in zip(self.shards[split], _starts(self.shards[split]))
                for i in range(start, start + shard["nsamples"])]

    def listing(self):
        """A tl.data.Listing of the pack (classes, fingerprint, (name, class) per sample; reads no shard),
        for code written for folders: the run's identity, tl.data.choose_data_mode."""
        from tl.data import Listing
        return Listing(self.classes, *([*zip(self.names(s), self.targets(s))] for s in SPLITS),
                       fingerprint=self.fingerprint)


def _starts(shards: list[dict]) -> list[int]:
    starts, n = [], 0
    for shard in shards:
        starts.append(n)
        n += shard["nsamples"]
    return starts


def _damaged(file: Path, why: str) -> UserError:
    return UserError(f"{file} is damaged ({why}); pack the source again with python -m tl.pack SRC "
                     f"{file.parent} (into an empty or new folder)")


def read_meta(path) -> dict:
    """tl-pack.json of a pack as a dict, checked for format and version only."""
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
    return meta


def open_pack(path) -> PackInfo:
    """Read and check a pack: tl-pack.json, both wids indexes, every shard's presence and size
    (one stat per shard; no shard is read). Any problem is one UserError naming the file."""
    root = Path(path)
    meta = read_meta(root)
    file = root / PACK_FILE
    classes, fingerprint, splits = meta.get("classes"), meta.get("fingerprint"), meta.get("splits")
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)):
        raise _damaged(file, "classes is not a list of at least 2 names")
    if not isinstance(fingerprint, str) or not isinstance(splits, dict):
        raise _damaged(file, "no fingerprint or splits")
    info = PackInfo(root, classes, fingerprint, {}, {}, {}, {}, meta)
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
        shards.append({**entry, "url": str(shard.absolute())})
    if sum(s["nsamples"] for s in shards) != count:
        raise _damaged(file, f"its shards hold {sum(s['nsamples'] for s in shards)} samples, "
                             f"{root / PACK_FILE} says {count}")
    return shards


class _InPlaceShards:
    """wids' shard cache (LRUShards' get_shard) without its download step: local shards are
    memory-mapped where they are: no copy into a cache dir, no lock file beside the shard."""

    def __init__(self, size: int):
        from wids.wids_lru import LRUCache
        self.lru = LRUCache(size, release_handler=lambda key, value: value.close())
        self.accesses = self.misses = 0

    def get_shard(self, url: str):
        from wids.wids import IndexedTarSamples
        self.accesses += 1
        shard = self.lru[url]
        if shard is None:
            self.misses += 1
            try:
                shard = IndexedTarSamples(path=url)  # mmap (the mmap holds its own descriptor)
            except (OSError, ValueError, struct.error, AssertionError) as e:  # an empty file, a bad header
                raise UserError(f"cannot read shard {url} ({e}); copy the pack again, or pack the source "
                                "again with python -m tl.pack") from None
            shard.stream.close()
            self.lru[url] = shard
        return shard

    def clear(self):
        self.lru.clear()


def _raise_open_file_limit(needed: int) -> None:
    """Each open shard holds a file descriptor: lift the soft limit towards the hard one if needed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


class PackedSplit(Dataset):
    """One split of a pack as a map-style Dataset: item i is (the image file's bytes, class index),
    read by random access through wids.ShardListDataset, so DistributedSampler, strided val shards
    and any index order work. Decode with decode_bytes. `targets` comes from tl-pack.json (no shard
    is read). Shards open lazily in each process (DataLoader workers included) and stay open."""

    def __init__(self, path, split: str, info: PackInfo | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        self.info = info if info is not None else open_pack(path)
        self.split = split
        self.targets = self.info.targets(split)
        self._ds = None

    def __len__(self):
        return self.info.counts[self.split]

    def __getstate__(self):  # to DataLoader workers under spawn: no open mmaps
        return {**self.__dict__, "_ds": None}

    def _dataset(self):
        if self._ds is None:
            from wids import ShardListDataset
            shards = self.info.shards[self.split]
            _raise_open_file_limit(len(shards))
            # ShardListDataset prints a summary line to stderr and warns about big LRU sizes: keep
            # that out of a run's output. Its own cache (a copy of every shard) is replaced.
            with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = ShardListDataset([dict(s) for s in shards], transformations=[], lru_size=len(shards),
                                      localname=lambda url: url)
            ds.cache = _InPlaceShards(len(shards))
            ds.check_cache_misses = lambda: None  # its warning (on stdout) is about its own copying cache
            self._ds = ds
        return self._ds

    def sample(self, i: int) -> dict:
        """The raw wids sample of item i: {".cls": BytesIO, ".jpg": BytesIO, "__key__": ..., ...}."""
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} {self.split} samples")
        i %= n
        ds = self._dataset()
        try:
            sample = ds[i]
        except (IndexError, KeyError, AssertionError, ValueError) as e:  # a shard with fewer samples than indexed
            shard = ds.shards[int(np.searchsorted(ds.cum_lengths, i, side="right"))]["url"]
            raise UserError(f"shard {shard} does not hold the samples its index lists ({type(e).__name__}: {e}): "
                            "the pack is damaged; copy it again, or pack the source again with python -m tl.pack"
                            ) from None
        if sample.get("__key__") != sample_key(i):
            raise UserError(f"shard {sample.get('__shard__')} holds sample {sample.get('__key__')!r} where "
                            f"{sample_key(i)!r} belongs: the pack is damaged; pack the source again")
        return sample

    def __getitem__(self, i):
        return self.unpack(self.sample(i))

    @staticmethod
    def unpack(sample: dict) -> tuple[bytes, int]:
        """(image bytes, class index) of a raw sample."""
        images = [k for k in sample if not k.startswith("_") and k != ".cls"]
        if len(images) != 1 or ".cls" not in sample:
            raise UserError(f"shard {sample['__shard__']} sample {sample['__key__']} holds {sorted(images)} and "
                            f"{'a' if '.cls' in sample else 'no'} .cls: the pack is damaged; pack the source again")
        return sample[images[0]].getvalue(), int(sample[".cls"].getvalue())

    def close(self):
        if self._ds is not None:
            self._ds.cache.clear()
            self._ds = None


def decode_bytes(data: bytes, image_size: int, train: bool) -> torch.Tensor:
    """tl.data.decode on an image file's bytes: the same uint8 CHW tensor as decoding the file."""
    from tl.data import decode
    return decode(io.BytesIO(data), image_size, train)


def _decode_or_error(args):
    try:
        return decode_bytes(*args)
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # what tl.data.load_split skips
        return e


def load_packed_split(path, split: str, image_size: int, train: bool, main: bool, strict: bool = False,
                      info: PackInfo | None = None):
    """tl.data.load_split for a pack: every image of the split decoded into memory (a tl.data.Split,
    paths like `DIR/train-000000.tar#00000012`), shards read in order. The files the pack left out
    as unreadable are the Split's skipped (relative to the source folder)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from tl.data import Split, usable_cpus

    ds = PackedSplit(path, split, info)
    left_out = ds.info.unreadable[split]
    if strict and left_out:
        raise UserError(f"the pack {path} left out {len(left_out)} unreadable {split} image(s) of its source (e.g. "
                        f"{left_out[0]}); fix or remove them in the source and pack it again, or drop --strict-images")
    out = Split([], [], [], skipped=list(left_out))
    workers = usable_cpus()
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        pending = []

        def finish(item):
            i, shard, key, target, future = item
            img = future.result()
            where = f"{shard}#{key}"
            if isinstance(img, Exception) and strict:
                raise UserError(f"unreadable image {where} ({img}); pack the source again, or drop --strict-images "
                                "to skip such images")
            if isinstance(img, Exception):
                if main:
                    warnings.warn(f"skipping unreadable image {where}: {img}", stacklevel=1)
                out.skipped.append(where)
            else:
                out.images.append(img)
                out.targets.append(target)
                out.paths.append(where)

        for i in tqdm(range(len(ds)), leave=False, desc=f"decode {split}", disable=not main):
            sample = ds.sample(i)
            data, target = ds.unpack(sample)
            pending.append((i, sample["__shard__"], sample["__key__"], target,
                            pool.submit(_decode_or_error, (data, image_size, train))))
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
    """A pack's split decoded on access (in DataLoader workers), like tl.data.LazyImages: item i is
    decode_bytes of sample i. Every image was fully decoded once when the pack was made."""

    def __init__(self, split: PackedSplit, image_size: int, train: bool):
        self.split, self.image_size, self.train = split, image_size, train

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        sample = self.split.sample(i)
        data, _ = self.split.unpack(sample)
        try:
            return decode_bytes(data, self.image_size, self.train)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise UserError(f"unreadable image {sample['__shard__']}#{sample['__key__']} while streaming ({e}): "
                            "the pack is damaged; copy it again, or pack the source again with python -m tl.pack"
                            ) from None


def stream_packed_split(path, split: str, image_size: int, train: bool, main: bool, strict: bool = False,
                        info: PackInfo | None = None):
    """tl.data.stream_split for a pack: a tl.data.Split whose images decode on access (PackedImages);
    nothing is read now (the pack checked every image when it was made)."""
    from tl.data import Split

    ds = PackedSplit(path, split, info)
    left_out = ds.info.unreadable[split]
    if strict and left_out:
        raise UserError(f"the pack {path} left out {len(left_out)} unreadable {split} image(s) of its source (e.g. "
                        f"{left_out[0]}); fix or remove them in the source and pack it again, or drop --strict-images")
    return Split(PackedImages(ds, image_size, train), list(ds.targets), ds.info.names(split), skipped=list(left_out))
