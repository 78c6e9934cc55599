"""The pack format (written by tl.pack): its file names and tar headers, and a pack's description read and checked.

A pack is a folder:

    tl-pack.json              format, version, classes, source fingerprint, per split: count,
                              shards, class runs, the source files left out as unreadable
    train.json, val.json      wids shard indexes ({"wids_version": 1, "shardlist": [...]}), shard
                              URLs relative to the folder
    train-offsets.npy, ...    per split, int64 (count, 2): sample i's image bytes as (offset in its
                              shard, size); its shard follows from the shardlist's nsamples
    train-000000.tar, ...     WebDataset tar shards: per image `<key>.cls` (class index, ASCII)
                              and `<key>.<ext>` (the original file's bytes, never re-encoded)

Sample i of a split is the i-th readable image of `tl.listing.list_images(SRC)` for that split (the
key is i, zero-padded), so a pack's order, classes and fingerprint are those of its source folder.
"""

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tl.errors import UserError
from tl.listing import Listing

PACK_FILE = "tl-pack.json"
FORMAT = "tl-pack"
VERSION = 2  # 2: {split}-offsets.npy, each image's place in its shard (version 1 packs are packed again)
SPLITS = ("train", "val")
KEY_DIGITS = 8
SHARD_NAME = re.compile(r"^(train|val)-\d{6,}\.tar$")
BLOCK = 512  # a tar header block
OFFSETS_DTYPE = np.dtype("<i8")


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
    fingerprint: str  # the source's tl.listing.list_images fingerprint: a run on the folder and on its pack agree
    counts: dict[str, int]  # packed images per split
    unreadable: dict[str, list[str]]  # per split: source files (relative to the source) left out
    shards: dict[str, list[dict]]  # per split: wids shardlist entries, url made absolute, filesize as on disk
    runs: dict[str, list[list[int]]]  # per split: [[class index, run length], ...] in sample order
    offsets: dict[str, Path]  # per split: the (count, 2) int64 .npy of (offset, size) of each image
    meta: dict  # tl-pack.json as read

    def targets(self, split: str) -> list[int]:
        return [c for c, n in self.runs[split] for _ in range(n)]

    def names(self, split: str) -> list[str]:
        """Where each sample is, `DIR/train-000000.tar#00000012` (what a Split's paths hold)."""
        return [f"{shard['url']}#{sample_key(i)}"
                for shard, start in zip(self.shards[split], _starts(self.shards[split]))
                for i in range(start, start + shard["nsamples"])]

    def listing(self):
        """A tl.listing.Listing of the pack (classes, fingerprint, (name, class) per sample; reads no shard),
        for code written for folders: the run's identity, tl.splits.choose_data_mode."""
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
    """An offsets file's .npy header and length: int64, (count, 2), nothing more or less (no data read)."""
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
    if shape != (count, 2) or dtype != OFFSETS_DTYPE or fortran or have != count * 2 * OFFSETS_DTYPE.itemsize:
        raise _damaged(file, f"{dtype} {shape} with {have} data bytes where int64 ({count}, 2) belongs")
    return file
