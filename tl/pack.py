"""Pack an ImageFolder set or a label file into WebDataset tar shards with wids indexes (see tl/data/packs.py).

    python -m tl.pack SRC DST [--shard-size-mb 256] [--workers N] [--data-root DIR]
    python -m tl.pack --verify PACK

For train/ and val/ of SRC (listed exactly as training lists them: tl.data.listing.list_images, or for a
label file tl.data.labels.list_label_file) this writes
DST/{split}-000000.tar, ... (each at most --shard-size-mb, 10^6 bytes, unless one image is larger),
DST/{split}.json (the wids index), DST/{split}-offsets.npy (each image's offset, size and CRC-32 in its
shard, read back from each finished shard: what tl reads by and checks) and DST/tl-pack.json.
Every image is decoded once on the way; unreadable ones are left out, named on stderr and in
tl-pack.json. The files are written into DST/.tl-pack-tmp-<pid>/ and renamed into place at the
end, tl-pack.json last: an interrupted pack leaves DST as it was (or holding no tl-pack.json). An
identical pack already in DST is kept ("already packed"), one of the same source in an older
format is packed again; a different one is never overwritten.
"""

import argparse
import errno
import hashlib
import io
import json
import mmap
import os
import shutil
import sys
import time
import warnings
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from tl.core.cli import Parser, number
from tl.core.errors import UserError, run_cli
from tl.data import labels
from tl.data.packs import (
    BLOCK,
    FORMAT,
    KEY_DIGITS,
    OFFSETS_COLUMNS,
    OFFSETS_DTYPE,
    PACK_FILE,
    SHARD_NAME,
    SPLITS,
    VERSION,
    DamagedSample,
    PackedSplit,
    is_pack,
    offsets_name,
    open_pack,
    read_meta,
    sample_key,
    shard_name,
    tar_header,
)
from tl.data.sources import open_data
from tl.data.splits import usable_cpus

TMP_PREFIX = ".tl-pack-tmp-"
RECORD = 10240  # a stream-written tar ends on a 20-block record (BLOCK: a header, and the data unit)
MAX_LISTED_WARNINGS = 10


def member_bytes(size: int) -> int:
    """Bytes one file takes in a tar: a header block plus its data padded to whole blocks."""
    return BLOCK + -(-size // BLOCK) * BLOCK


def tar_bytes(members: int) -> int:
    """A finished stream tar's size given its members' bytes: two zero blocks, padded to a record."""
    return -(-(members + 2 * BLOCK) // RECORD) * RECORD


def image_offsets(path: Path, first: int, count: int) -> np.ndarray:
    """(offset, size, CRC-32) of the image bytes of samples first .. first+count-1 in a finished shard, read
    back from the tar's own headers (checksums checked) and bytes, not from what the writer meant to write."""
    table = np.full((count, OFFSETS_COLUMNS), -1, dtype=OFFSETS_DTYPE)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as tar:
        pos, end, zero = 0, len(tar), bytes(BLOCK)
        while pos + BLOCK <= end and tar[pos:pos + BLOCK] != zero:
            try:
                name, size = tar_header(tar[pos:pos + BLOCK])
            except ValueError as e:
                raise RuntimeError(f"{path} at byte {pos}: {e}") from None
            key, _, ext = name.partition(".")
            j = int(key) - first if len(key) == KEY_DIGITS and key.isdigit() else -1
            if not 0 <= j < count or not ext or pos + BLOCK + size > end:
                raise RuntimeError(f"{path} at byte {pos}: unexpected member {name!r} of {size} bytes")
            if ext != "cls":
                if table[j, 0] >= 0:
                    raise RuntimeError(f"{path}: two images of sample {key}")
                table[j] = pos + BLOCK, size, zlib.crc32(tar[pos + BLOCK:pos + BLOCK + size])
            pos += member_bytes(size)
    if (table[:, 0] < 0).any():
        raise RuntimeError(f"{path}: no image for sample {sample_key(first + int(np.argmax(table[:, 0] < 0)))}")
    return table


def check_image(data: bytes) -> None:
    """Decode the whole file, as tl.data.preprocess.decode would (JPEG at a reduced scale: every byte is still
    parsed, so a truncated or corrupt file fails here). Raises what PIL raises."""
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (64, 64))
        img.convert("RGB")


def read_checked(path: str) -> bytes | Exception:
    try:
        with open(path, "rb") as f:
            data = f.read()
        check_image(data)
        return data
    except UnidentifiedImageError:
        return UnidentifiedImageError("cannot identify image file")  # PIL's names an anonymous BytesIO
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        return e  # SyntaxError: some PIL plugins' "not a ... file"


class HashingFile:
    """A binary file that keeps the md5 and the count of what was written (wids' index has both)."""

    def __init__(self, path: Path):
        self.f = open(path, "wb")  # noqa: SIM115  closed in close()
        self.md5, self.size, self.aborted = hashlib.md5(), 0, False

    def write(self, b) -> int:
        if self.aborted:  # the tar writer's last words after a failure: the file is being deleted
            return len(b)
        self.md5.update(b)
        self.size += len(b)
        return self.f.write(b)

    def close(self):
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()

    def abort(self):
        self.aborted = True
        self.f.close()


class SplitWriter:
    """Samples into shards of at most max_bytes (a sample larger than that gets a shard to itself)."""

    def __init__(self, tmp: Path, split: str, max_bytes: int):
        self.tmp, self.split, self.max_bytes = tmp, split, max_bytes
        self.shards: list[dict] = []
        self.offsets: list[np.ndarray] = []  # per finished shard
        self.writer, self.file, self.members, self.count, self.first = None, None, 0, 0, 0

    def _close(self):
        if self.writer is None:
            return
        self.writer.close()
        self.file.close()
        entry = self.shards[-1]
        entry.update(nsamples=self.count, filesize=self.file.size, md5sum=self.file.md5.hexdigest())
        assert self.file.size == tar_bytes(self.members), (self.file.size, tar_bytes(self.members))
        self.writer = None
        self.offsets.append(image_offsets(self.tmp / entry["url"], self.first, self.count))
        self.first += self.count

    def write(self, index: int, ext: str, data: bytes, target: int) -> None:
        from webdataset import TarWriter
        cls = str(target).encode()
        size = member_bytes(len(data)) + member_bytes(len(cls))
        if self.writer is not None and self.count and tar_bytes(self.members + size) > self.max_bytes:
            self._close()
        if self.writer is None:
            name = shard_name(self.split, len(self.shards))
            self.shards.append({"url": name})
            self.file = HashingFile(self.tmp / name)
            # Fixed owner and time: the same source gives byte-identical shards.
            self.writer = TarWriter(self.file, encoder=False, user="tl", group="tl", mtime=0)
            self.members = self.count = 0
        self.writer.write({"__key__": sample_key(index), "cls": cls, ext: data})
        self.members += size
        self.count += 1

    def close(self) -> list[dict]:
        self._close()
        return self.shards

    def abort(self) -> None:
        """After a failure (a full disk, a signal): close without writing anything more."""
        if self.writer is not None:
            self.file.abort()
            try:
                self.writer.close()
            except Exception:  # noqa: BLE001
                pass
            self.writer = None


def write_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp(dst: Path) -> None:
    """Temporary folders of packs that were killed (their process is gone on this machine)."""
    for entry in dst.iterdir():
        if not entry.name.startswith(TMP_PREFIX):
            continue
        pid = entry.name[len(TMP_PREFIX):]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def check_dst(src: Path, dst: Path, classes: list[str], fingerprint: str) -> bool:
    """Whether DST already holds this exact pack (intact); refuses one it must not overwrite. A pack inside a
    folder SRC would be listed as images of it next time; a label file's data set is its rows, so any DST
    outside the file itself is fine."""
    src_r, dst_r = src.resolve(), dst.resolve()
    if src.is_dir() and (dst_r == src_r or src_r in dst_r.parents):
        raise UserError(f"DST {dst} is inside SRC {src}: the pack would become part of the data set; pass a DST "
                        "outside SRC")
    if dst.exists() and not dst.is_dir():
        raise UserError(f"DST {dst} exists and is not a folder; pass a new or empty folder")
    if not (dst / PACK_FILE).exists():
        return False
    meta = read_meta(dst, any_version=True)  # a damaged or foreign tl-pack.json: its own one-line error
    if meta.get("classes") != classes or meta.get("fingerprint") != fingerprint:
        what = "classes" if meta.get("classes") != classes else "images (fingerprint)"
        raise UserError(f"{dst} holds a different pack (other {what} than {src}); refusing to overwrite it: "
                        "pass another DST, or delete that one first")
    if meta["version"] < VERSION:
        warnings.warn(f"{dst} holds a pack of this source in the old format version {meta['version']}; packing "
                      f"it again as version {VERSION}", stacklevel=1)
        return False
    try:
        open_pack(dst)
    except UserError as e:
        warnings.warn(f"{dst} holds a pack of this source that is incomplete ({e}); packing it again",
                      stacklevel=1)
        return False
    return True


def pack(src, dst, shard_size_mb: float = 256, workers: int | None = None, progress: bool = True,
         data_root: str | None = None) -> dict:
    """Pack SRC (an ImageFolder, or a label file whose paths start from data_root) into DST; returns
    tl-pack.json's content (with "already_packed" if nothing was done)."""
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise UserError(f"SRC {src} does not exist; pass an ImageFolder root holding train/ and val/, or a label "
                        "file (.csv or .jsonl)")
    if not src.is_dir() and src.suffix.lower() not in labels.SUFFIXES:
        raise UserError(f"SRC {src} is not a folder or a label file; pass an ImageFolder root holding train/ and val/ "
                        "(extract a zip first), or a .csv or .jsonl label file")
    if data_root and src.is_dir():
        raise UserError("--data-root is where a label file's paths start from; SRC is a folder: drop --data-root")
    if not shard_size_mb > 0:
        raise UserError(f"--shard-size-mb {shard_size_mb} must be positive, e.g. 256")
    if is_pack(src):
        raise UserError(f"SRC {src} is a pack already; pass the ImageFolder or label file it was packed from")
    t0 = time.perf_counter()
    listing = open_data(src, data_root, label_file=not src.is_dir()).listing
    base = src if src.is_dir() else labels.base_dir(src, data_root)
    if not src.is_dir() and listing.test:  # a pack holds train and val, as it does of a folder with test/
        warnings.warn(f"{len(listing.test)} test rows of {src} are not packed: a pack holds train and val; "
                      "evaluate test from the label file", stacklevel=1)
    if check_dst(src, dst, listing.classes, listing.fingerprint):
        meta = read_meta(dst)
        return {**meta, "already_packed": True}
    created = not dst.exists()
    try:
        dst.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(dst)
        tmp = dst / f"{TMP_PREFIX}{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise UserError(f"cannot write to DST {dst} ({e.strerror}); pass a DST in a writable location") from None
    try:
        meta = _write(base, dst, tmp, listing, int(shard_size_mb * 1e6), workers or min(32, 2 * usable_cpus()),
                      progress)
        meta["source"] = str(src.resolve())
        if data_root:
            meta["data_root"] = str(Path(data_root).resolve())
        meta["seconds"] = round(time.perf_counter() - t0, 3)
        write_json(tmp / PACK_FILE, meta)
        _commit(dst, tmp, meta)
    except OSError as e:
        what = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror or str(e)
        raise UserError(f"cannot write the pack into {dst} ({what}{': ' + e.filename if e.filename else ''}); "
                        "DST was left as it was: free space or pass a DST on another disk") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not (dst / PACK_FILE).exists():  # a failed start leaves no folder it made
            shutil.rmtree(dst, ignore_errors=True)
    return meta


def _read_ahead(paths: list[str], workers: int):
    """read_checked over paths in order, up to a few dozen files ahead (parallel reads: shared file
    systems answer many small requests in parallel much faster than one after the other)."""
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        queue = deque()
        it = iter(paths)
        for path in it:
            queue.append(pool.submit(read_checked, path))
            if len(queue) >= 4 * workers:
                break
        while queue:
            yield queue.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                queue.append(pool.submit(read_checked, nxt))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _write(src: Path, dst: Path, tmp: Path, listing, max_bytes: int, workers: int, progress: bool) -> dict:
    splits, unreadable_all = {}, []
    total = len(listing.train) + len(listing.val)
    bar = tqdm(total=total, desc="pack", unit="img", disable=not progress, file=sys.stderr)
    try:
        for split in SPLITS:
            samples = getattr(listing, split)
            bar.set_description(f"pack {split}")
            writer = SplitWriter(tmp, split, max_bytes)
            runs, unreadable, count = [], [], 0
            try:
                for (path, target), data in zip(samples, _read_ahead([p for p, _ in samples], workers)):
                    bar.update()
                    rel = Path(os.path.relpath(path, src)).as_posix()
                    if isinstance(data, Exception):
                        unreadable.append({"path": rel, "error": str(data) or type(data).__name__})
                        continue
                    writer.write(count, Path(path).suffix.lower().lstrip("."), data, target)
                    count += 1
                    if runs and runs[-1][0] == target:
                        runs[-1][1] += 1
                    else:
                        runs.append([target, 1])
                shards = writer.close()
            except BaseException:
                writer.abort()
                raise
            if not count:
                raise UserError(f"none of the {len(samples)} {split} files of {src} is a readable image "
                                f"({unreadable[0]['path']}: {unreadable[0]['error']}, ...); check the files")
            index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": split, "shardlist": shards}
            write_json(tmp / f"{split}.json", index)
            offsets = np.concatenate(writer.offsets)
            assert offsets.shape == (count, OFFSETS_COLUMNS), (offsets.shape, count)
            write_npy(tmp / offsets_name(split), offsets)
            splits[split] = {"count": count, "listed": len(samples), "fingerprint": listing.fingerprint,
                             "index": f"{split}.json", "offsets": offsets_name(split),
                             "shards": [s["url"] for s in shards],
                             "bytes": sum(s["filesize"] for s in shards), "targets": runs, "unreadable": unreadable}
            unreadable_all += unreadable
    finally:
        bar.close()
    if unreadable_all:
        report_unreadable(src, dst, unreadable_all)
    return {"format": FORMAT, "version": VERSION, "classes": listing.classes, "fingerprint": listing.fingerprint,
            "source": str(src.resolve()), "shard_size_bytes": max_bytes,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "splits": splits}


def report_unreadable(src: Path, dst: Path, unreadable: list[dict]) -> None:
    if len(unreadable) <= MAX_LISTED_WARNINGS:
        for u in unreadable:
            warnings.warn(f"not packed: unreadable image {src / u['path']} ({u['error']})", stacklevel=1)
    else:
        examples = ", ".join(u["path"] for u in unreadable[:3])
        warnings.warn(f"not packed: {len(unreadable)} unreadable images in {src} (e.g. {examples}); all are "
                      f"listed in {dst / PACK_FILE}", stacklevel=1)


def _commit(dst: Path, tmp: Path, meta: dict) -> None:
    """Rename the new files into DST, tl-pack.json last; then remove shards no index names any more."""
    names = [name for s in SPLITS for name in meta["splits"][s]["shards"]] + [f"{s}.json" for s in SPLITS] + \
        [offsets_name(s) for s in SPLITS]
    for name in names:
        os.replace(tmp / name, dst / name)
    os.replace(tmp / PACK_FILE, dst / PACK_FILE)
    keep = set(names)
    for entry in dst.iterdir():
        if SHARD_NAME.match(entry.name) and entry.name not in keep:
            entry.unlink()
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse to fsync a folder
        pass
    finally:
        os.close(fd)


def verify(path, progress: bool = True) -> dict:
    """Check every byte of a pack: each shard against its md5 in the wids index (tar headers included) and
    each image against its CRC-32. Returns the counts; a damaged pack is one UserError naming the first
    damaged shard and sample."""
    info = open_pack(path)  # tl-pack.json, the indexes, the shards' sizes, the offsets tables
    shards = [s for split in SPLITS for s in info.shards[split]]
    bad_shards, damaged, samples = [], [], 0
    with tqdm(total=sum(s["filesize"] for s in shards), unit="B", unit_scale=True, desc="verify shards",
              disable=not progress, leave=False) as bar:
        for shard in shards:
            md5 = hashlib.md5()
            with open(shard["url"], "rb") as f:
                for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                    md5.update(chunk)
                    bar.update(len(chunk))
            if md5.hexdigest() != shard.get("md5sum"):
                bad_shards.append(Path(shard["url"]).name)
    with tqdm(total=sum(info.counts.values()), unit="img", desc="verify images", disable=not progress,
              leave=False) as bar:
        for split in SPLITS:
            ds = PackedSplit(path, split, info)
            for i in range(len(ds)):
                try:
                    ds.read(i)
                except (DamagedSample, UserError):  # its bytes changed, or the tar header in front of them
                    damaged.append(ds.where(i).rsplit("/", 1)[-1])
                bar.update()
            samples += len(ds)
            ds.close()
    if bad_shards or damaged:
        what = [f"{len(damaged)} of {samples} images fail their checksum (the first: {damaged[0]})"] if damaged else []
        what += [f"{len(bad_shards)} of {len(shards)} shards differ from their md5 (the first: {bad_shards[0]})"] \
            if bad_shards else []
        raise UserError(f"the pack {path} is damaged: {'; '.join(what)}; copy it again from a good copy, or "
                        f"{info.repack_hint()}")
    return {"images": samples, "shards": len(shards), "bytes": sum(s["filesize"] for s in shards)}


def main(argv=None) -> int:
    parser = Parser(prog="python -m tl.pack", description=__doc__.split("\n\n")[0],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", metavar="SRC", nargs="?", help="ImageFolder root holding train/ and val/, or a "
                        "label file (.csv or .jsonl of path,label,split; see docs/label-files.md)")
    parser.add_argument("--data-root", help="the folder a label file's relative paths start from (default: its "
                        "folder)")
    parser.add_argument("dst", metavar="DST", nargs="?", help="folder for the pack (created; an identical pack there "
                        "is kept)")
    parser.add_argument("--verify", metavar="PACK", help="instead of packing: check every byte of PACK (each shard's "
                        "md5, each image's CRC-32); exit status 2 naming the first damaged image")
    parser.add_argument("--shard-size-mb", type=number(float, 0, above=True), default=256,
                        help="largest shard in MB (10^6 bytes) (default: %(default)s)")
    parser.add_argument("--workers", type=number(int, 1), default=None,
                        help="files read and checked in parallel (default: 2 per usable CPU, at most 32)")

    def work():
        args = parser.parse_args(argv)
        if args.verify and (args.src or args.dst):
            raise UserError("--verify PACK checks a pack; pass it alone, without SRC and DST")
        if args.verify:
            found = verify(args.verify)
            print(f"verified {args.verify}: {found['images']} images in {found['shards']} shards "
                  f"({found['bytes'] / 1e6:.1f} MB), every byte as packed")
            return 0
        if not args.dst:
            raise UserError("pass SRC and DST (python -m tl.pack SRC DST), or --verify PACK")
        meta = pack(args.src, args.dst, args.shard_size_mb, args.workers, data_root=args.data_root)
        splits = meta["splits"]
        counts = " and ".join(f"{splits[s]['count']} {s}" for s in SPLITS)
        if meta.get("already_packed"):
            print(f"already packed: {args.dst} holds {counts} images of {args.src} (same classes and fingerprint)")
            return 0
        shards = sum(len(splits[s]["shards"]) for s in SPLITS)
        size = sum(splits[s]["bytes"] for s in SPLITS) / 1e6
        left = sum(len(splits[s]["unreadable"]) for s in SPLITS)
        print(f"packed {counts} images ({len(meta['classes'])} classes) into {shards} shards, {size:.1f} MB, in "
              f"{args.dst} in {meta['seconds']:.1f}s" + (f"; {left} unreadable left out" if left else ""))
        return 0

    return run_cli(work)


if __name__ == "__main__":
    sys.exit(main())
