"""Packed shards: python -m tl.pack writes WebDataset tars + wids indexes + each image's offset;
tl.data.packs reads them back at those offsets."""

import errno
import json
import os
import pickle
import shutil
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_imagefolder, run_cli
from conftest import one_line_error as cli_error
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler, Subset

import tl.pack
from tl.core.errors import UserError
from tl.data.listing import list_images
from tl.data.loaders import ImageSet
from tl.data.packs import (
    VERSION,
    DamagedSample,
    PackedSplit,
    decode_bytes,
    is_pack,
    load_packed_split,
    open_pack,
    stream_packed_split,
)
from tl.data.preprocess import Preprocess, decode
from tl.data.splits import load_split
from tl.pack import pack

PACK_FILES = ["tl-pack.json", "train-000000.tar", "train-offsets.npy", "train.json", "val-000000.tar",
              "val-offsets.npy", "val.json"]


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("src") / "set", classes=("ant", "bee", "cat"),
                            n_train=8, n_val=3)


@pytest.fixture(scope="module")
def packed(src, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("packs") / "set.pack"
    pack(src, dst, progress=False)
    return dst


def test_read_back_bytes_classes_and_order(src, packed):
    listing = list_images(src)
    info = open_pack(packed)
    assert is_pack(packed) and not is_pack(src)
    assert info.classes == listing.classes == ["ant", "bee", "cat"]
    assert info.fingerprint == listing.fingerprint  # a run on the folder and one on its pack agree
    as_listing = info.listing()
    assert as_listing.fingerprint == listing.fingerprint and as_listing.classes == listing.classes
    assert [c for _, c in as_listing.train] == [c for _, c in listing.train]
    assert as_listing.val[4][0] == f"{packed.absolute()}/val-000000.tar#00000004"
    assert info.counts == {"train": 24, "val": 9}
    for split in ("train", "val"):
        ds = PackedSplit(packed, split)
        samples = getattr(listing, split)
        assert len(ds) == len(samples) and ds.targets == [c for _, c in samples]
        for i, (path, target) in enumerate(samples):
            data, cls = ds[i]
            assert data == Path(path).read_bytes() and cls == target
    assert sorted(p.name for p in packed.iterdir()) == PACK_FILES


def test_index_is_a_wids_index(packed):
    import wids
    ds = wids.ShardListDataset(str(packed / "val.json"), transformations=[], localname=lambda url: url)
    assert len(ds) == 9
    sample = ds[4]
    assert sample["__key__"] == "00000004" and sample[".cls"].read() == b"1"
    assert Image.open(sample[".jpg"]).size == (96, 80)
    index = json.loads((packed / "train.json").read_text())
    assert index["wids_version"] == 1 and index["shardlist"][0]["url"] == "train-000000.tar"


def test_shard_size_limit_gives_several_shards(src, tmp_path):
    dst = tmp_path / "small"
    pack(src, dst, shard_size_mb=0.02, progress=False)
    info = open_pack(dst)
    shards = sorted(dst.glob("train-*.tar"))
    assert len(shards) >= 3 and [s.name for s in shards] == [f"train-{i:06d}.tar" for i in range(len(shards))]
    assert all(s.stat().st_size <= 20_000 for s in dst.glob("*.tar"))
    assert sum(e["nsamples"] for e in info.shards["train"]) == 24
    listing = list_images(src)
    ds = PackedSplit(dst, "train")
    for i in (0, 5, 11, 23, 17, 2):  # random access across shards
        assert ds[i] == (Path(listing.train[i][0]).read_bytes(), listing.train[i][1])


def test_same_source_gives_identical_shards(src, packed, tmp_path):
    pack(src, tmp_path / "again", progress=False)
    for name in PACK_FILES[1:]:
        assert (tmp_path / "again" / name).read_bytes() == (packed / name).read_bytes()


def test_unreadable_files_are_listed_not_packed(tmp_path, capsys):
    src = make_imagefolder(tmp_path / "src", n_train=5, n_val=2)
    (src / "train" / "red" / "002.jpg").write_bytes(b"not an image")
    good = (src / "train" / "blue" / "001.jpg").read_bytes()
    (src / "train" / "blue" / "003.jpg").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.warns(UserWarning, match="not packed: unreadable image") as record:
        meta = pack(src, tmp_path / "dst", progress=False)
    assert len(record) == 2
    unreadable = [u["path"] for u in meta["splits"]["train"]["unreadable"]]
    assert unreadable == ["train/blue/003.jpg", "train/red/002.jpg"]
    info = open_pack(tmp_path / "dst")
    assert info.counts == {"train": 8, "val": 4} and info.unreadable["train"] == unreadable
    # What tl.data.splits skips when training on the folder is exactly what the pack left out.
    listing = list_images(src)
    split = load_split(listing.train, Preprocess.tutorial(64), True, False)
    assert sorted(os.path.relpath(p, src) for p in split.skipped) == unreadable
    ds = PackedSplit(tmp_path / "dst", "train")
    assert [ds[i][0] for i in range(len(ds))] == [Path(p).read_bytes() for p in split.paths]
    assert ds.targets == split.targets
    packed_split = load_packed_split(tmp_path / "dst", "train", Preprocess.tutorial(64), True, False)
    assert packed_split.skipped == unreadable and packed_split.targets == split.targets
    assert all(torch.equal(a, b) for a, b in zip(packed_split.images, split.images))
    with pytest.raises(UserError, match="left out 2 unreadable train image.*pass --strict-images off"):
        load_packed_split(tmp_path / "dst", "train", Preprocess.tutorial(64), True, False, strict=True)
    streamed = stream_packed_split(tmp_path / "dst", "train", Preprocess.tutorial(64), True, False)
    assert streamed.paths == packed_split.paths and streamed.skipped == unreadable
    assert streamed.targets == split.targets and len(streamed.images) == len(split.images)
    assert all(torch.equal(streamed.images[i], split.images[i]) for i in range(len(split.images)))


def test_many_unreadable_files_give_one_warning(tmp_path):
    src = make_imagefolder(tmp_path / "src", n_train=14, n_val=1)
    for i in range(12):
        (src / "train" / "red" / f"{i:03d}.jpg").write_bytes(b"")
    with pytest.warns(UserWarning, match="12 unreadable images") as record:
        pack(src, tmp_path / "dst", progress=False)
    assert len(record) == 1
    assert len(json.loads((tmp_path / "dst" / "tl-pack.json").read_text())["splits"]["train"]["unreadable"]) == 12


def test_a_different_pack_is_never_overwritten(src, packed, tmp_path):
    dst = tmp_path / "dst"
    shutil.copytree(packed, dst)
    other = make_imagefolder(tmp_path / "other", classes=("ant", "bee", "cat"), n_train=8, n_val=3, seed=1)
    (other / "val" / "cat" / "000.jpg").unlink()  # another set: fewer images
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    with pytest.raises(UserError, match="holds a different pack .*images.*refusing to overwrite"):
        pack(other, dst, progress=False)
    other2 = make_imagefolder(tmp_path / "other2", classes=("ant", "bee", "dog"), n_train=8, n_val=3)
    with pytest.raises(UserError, match="other classes"):
        pack(other2, dst, progress=False)
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before  # nothing touched, no temp folder left
    meta = pack(src, dst, progress=False)
    assert meta.get("already_packed")


def test_incomplete_pack_of_the_same_source_is_packed_again(src, packed, tmp_path):
    dst = tmp_path / "dst"
    shutil.copytree(packed, dst)
    (dst / "val-000000.tar").unlink()
    with pytest.warns(UserWarning, match="incomplete"):
        meta = pack(src, dst, progress=False)
    assert not meta.get("already_packed") and open_pack(dst).counts["val"] == 9


def test_distributed_sampler_covers_each_index_once(packed):
    ds = PackedSplit(packed, "train")
    for epoch in range(2):
        seen = []
        for rank in range(2):
            sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
            sampler.set_epoch(epoch)
            loader = DataLoader(ds, batch_size=5, sampler=sampler, num_workers=2,
                                collate_fn=lambda batch: batch)
            for batch in loader:
                for data, target in batch:
                    seen.append((data, target))
        assert len(seen) == 24
        assert sorted(seen) == sorted(ds[i] for i in range(24))  # each sample exactly once
    pre = Preprocess.tutorial(64)
    streamed = ImageSet(stream_packed_split(packed, "val", pre, False, False))  # decoded in 2 workers
    batches = [x for x, _ in DataLoader(streamed, batch_size=4, num_workers=2)]
    assert torch.equal(torch.cat(batches), torch.stack(load_packed_split(packed, "val", pre, False, False).images))
    val = PackedSplit(packed, "val")
    shards = [Subset(val, range(rank, len(val), 2)) for rank in range(2)]  # tl's strided val shards
    assert sorted(x for s in shards for x in s) == sorted(val[i] for i in range(len(val)))


def test_decode_bytes_equals_decode(src, tmp_path):
    rng = np.random.default_rng(0)
    paths = [str(p) for p in sorted((src / "train").rglob("*.jpg"))[:3]]
    big = tmp_path / "big.jpg"
    Image.fromarray(rng.integers(0, 255, (700, 900, 3), dtype=np.uint8)).save(big, quality=85)  # uses draft
    palette = tmp_path / "p.png"
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).convert("P").save(palette)
    gray = tmp_path / "g.png"
    Image.fromarray(rng.integers(0, 255, (90, 60), dtype=np.uint8)).save(gray)
    for path in [*paths, str(big), str(palette), str(gray)]:
        data = Path(path).read_bytes()
        for size, train in ((64, True), (64, False), (224, True), (224, False)):
            pre = Preprocess.tutorial(size)
            got, want = decode_bytes(data, pre, train), decode(path, pre, train)
            assert got.dtype == torch.uint8 and torch.equal(got, want), (path, size, train)


def one_line_error(match: str, path) -> None:
    with pytest.raises(UserError) as e:
        open_pack(path)
    assert "\n" not in str(e.value) and match in str(e.value), str(e.value)


def test_damaged_packs_are_one_line_errors(packed, tmp_path):
    dst = tmp_path / "p"
    shutil.copytree(packed, dst)
    meta_file = dst / "tl-pack.json"
    good = meta_file.read_text()
    meta_file.write_text(good[:100])
    one_line_error(f"{meta_file} is damaged", dst)
    meta_file.write_text(json.dumps({"format": "something-else"}))
    one_line_error("not a tl pack description", dst)
    meta_file.write_text(json.dumps({**json.loads(good), "version": VERSION + 1}))
    one_line_error("newer than this tl reads", dst)
    meta = json.loads(good)
    meta["splits"]["train"]["count"] = 25
    meta_file.write_text(json.dumps(meta))
    one_line_error("count and class runs disagree", dst)
    meta_file.write_text(good)
    open_pack(dst)
    shard = dst / "train-000000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10240])
    one_line_error(f"shard {shard} has {len(data) - 10240} bytes", dst)
    shard.write_bytes(data)
    shard.write_bytes(bytes(len(data)))  # the right size, but no tar
    with pytest.raises(UserError, match=f"shard {shard} does not match the pack's offsets") as e:
        PackedSplit(dst, "train")[3]
    assert "\n" not in str(e.value)
    shard.unlink()
    one_line_error(f"shard {shard} is missing", dst)
    (dst / "val.json").unlink()
    one_line_error("train-000000.tar is missing", dst)
    one_line_error(f"{tmp_path} is not a tl pack", tmp_path)


def test_offsets_match_the_tar_headers(src, tmp_path):
    dst = tmp_path / "small"
    pack(src, dst, shard_size_mb=0.02, progress=False)  # several shards
    info = open_pack(dst)
    for split in ("train", "val"):
        table = np.load(dst / f"{split}-offsets.npy")
        assert table.dtype == np.int64 and table.shape == (info.counts[split], 3)
        want, i = [], 0
        for shard in info.shards[split]:
            with tarfile.open(shard["url"]) as tar:  # Python's own tar reader, independent of tl's
                images = [m for m in tar.getmembers() if not m.name.endswith(".cls")]
                crcs = [zlib.crc32(tar.extractfile(m).read()) for m in images]
            assert [m.name.split(".")[0] for m in images] == [f"{k:08d}" for k in range(i, i + shard["nsamples"])]
            want += [(m.offset_data, m.size, crc) for m, crc in zip(images, crcs)]
            i += shard["nsamples"]
        assert table.tolist() == [list(w) for w in want]


def test_reading_does_not_scan_a_shard(packed, monkeypatch):
    import wids.wids_mmtar

    def scan(*args, **kwargs):
        raise AssertionError("a shard was scanned")

    monkeypatch.setattr(wids.wids_mmtar.MMIndexedTar, "__init__", scan)
    monkeypatch.setattr(wids.wids.IndexedTarSamples, "__init__", scan)
    monkeypatch.setattr(tarfile, "open", scan)
    reads = []
    pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, offset: reads.append((n, offset)) or pread(fd, n, offset))
    table = np.load(packed / "train-offsets.npy")
    ds = PackedSplit(packed, "train")  # fresh: nothing open
    for i in (17, 3, 23, 0):
        ds[i]
    # One read per item: its image and the 512-byte tar header in front, nothing more.
    assert reads == [(512 + table[i, 1], table[i, 0] - 512) for i in (17, 3, 23, 0)]


def test_open_files_are_not_pickled(packed):
    ds = PackedSplit(packed, "val")
    first = ds[2]
    assert ds._files and ds._offsets is not None
    copy = pickle.loads(pickle.dumps(ds))  # what spawned DataLoader workers get
    assert not copy._files and copy._offsets is None
    assert copy[2] == first and copy[-1] == ds[8]
    ds.close()
    assert not ds._files and ds[2] == first  # opens again


def test_a_version_1_pack_is_refused_and_packed_again(src, packed, tmp_path):
    dst = tmp_path / "old"
    shutil.copytree(packed, dst)
    meta = json.loads((dst / "tl-pack.json").read_text())
    for split in ("train", "val"):  # what a version 1 pack held
        del meta["splits"][split]["offsets"]
        (dst / f"{split}-offsets.npy").unlink()
    (dst / "tl-pack.json").write_text(json.dumps({**meta, "version": 1}))
    one_line_error(f"old pack format version 1 (this tl reads {VERSION}: each image at a stored offset); pack the "
                   f"source again: python -m tl.pack {src.resolve()} {dst}", dst)
    other = make_imagefolder(tmp_path / "other", classes=("ant", "bee", "cat"), n_train=2, n_val=1)
    with pytest.raises(UserError, match="holds a different pack"):  # still never overwritten by another source
        pack(other, dst, progress=False)
    with pytest.warns(UserWarning, match=f"old format version 1; packing it again as version {VERSION}"):
        meta = pack(src, dst, progress=False)
    assert not meta.get("already_packed") and meta["version"] == VERSION
    assert sorted(p.name for p in dst.iterdir()) == PACK_FILES
    assert PackedSplit(dst, "val")[4] == PackedSplit(packed, "val")[4]


def read_error(ds, i, match: str) -> None:
    with pytest.raises(UserError) as e:
        ds[i]
    assert "\n" not in str(e.value) and match in str(e.value), str(e.value)


def test_changed_shards_and_offsets_are_one_line_errors(src, packed, tmp_path):
    dst = tmp_path / "p"
    shutil.copytree(packed, dst)
    shard, offsets = dst / "train-000000.tar", dst / "train-offsets.npy"
    data, table = shard.read_bytes(), np.load(offsets)
    shard.write_bytes(bytes(512) + data[:-512])  # shifted by a block: the same size, open_pack cannot tell
    read_error(PackedSplit(dst, "train"), 3, f"shard {shard} does not match the pack's offsets (sample 00000003, "
                                             f"byte {table[3, 0] - 512}: no tar header there (checksum))")
    read_error(PackedSplit(dst, "train"), 0, "pack the source again: python -m tl.pack")
    other = (dst / "val-000000.tar").read_bytes()
    shard.write_bytes((other * 9)[:len(data)])  # replaced by another tar of the same size
    read_error(PackedSplit(dst, "train"), 20, f"shard {shard} does not match the pack's offsets")
    shard.write_bytes(data)
    swapped = table.copy()
    swapped[[3, 4]] = table[[4, 3]]
    np.save(offsets, swapped)
    ds = PackedSplit(dst, "train")
    read_error(ds, 4, "names '00000003.jpg'")
    assert ds[5] == PackedSplit(packed, "train")[5]
    late = table.copy()
    late[5, 0] = len(data) + 512
    np.save(offsets, late)
    read_error(PackedSplit(dst, "train"), 5, f"{offsets} is damaged (sample 00000005 at bytes")
    np.save(offsets, table[:-1])
    one_line_error(f"{offsets} is damaged (int64 (23, 3) with 552 data bytes where int64 (24, 3) belongs)", dst)
    offsets.write_bytes(b"garbage")
    one_line_error(f"{offsets} is damaged (not an offsets table", dst)
    offsets.unlink()
    one_line_error(f"{offsets} is missing: the pack in {dst} is incomplete", dst)
    np.save(offsets, table)
    ds = PackedSplit(dst, "train")
    assert ds[23] == PackedSplit(packed, "train")[23]
    info = open_pack(dst)
    shard.write_bytes(data[:table[23, 0] + 10])  # truncated after the pack was opened
    read_error(ds, 23, "truncated")
    shard.unlink()
    read_error(PackedSplit(dst, "train", info), 1, f"shard {shard.absolute()} is missing")


def test_full_disk_leaves_dst_as_it_was(src, tmp_path, monkeypatch):
    def full(self, b):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tl.pack.HashingFile, "write", full)
    dst = tmp_path / "dst"
    with pytest.raises(UserError, match="the disk is full") as e:
        pack(src, dst, progress=False)
    assert "\n" not in str(e.value)
    assert not dst.exists()  # the folder it made is removed
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="the disk is full"):
        pack(src, dst, progress=False)
    assert [p.name for p in dst.iterdir()] == ["notes.txt"]  # no temp folder left


def test_stale_temp_folder_of_a_killed_pack_is_removed(src, tmp_path):
    dst = tmp_path / "dst"
    (dst / ".tl-pack-tmp-999999999").mkdir(parents=True)
    (dst / ".tl-pack-tmp-999999999" / "train-000000.tar").write_bytes(b"half")
    (dst / "train-000007.tar").write_bytes(b"left by a pack killed while renaming")
    pack(src, dst, progress=False)
    assert sorted(p.name for p in dst.iterdir()) == PACK_FILES


@pytest.mark.slow
def test_cli_exit_codes(src, tmp_path):
    dst = tmp_path / "out" / "set.pack"
    r = run_cli("-m", "tl.pack", str(src), str(dst), "--shard-size-mb", "0.05")
    assert r.returncode == 0, r.stderr
    assert "packed 24 train and 9 val images (3 classes) into" in r.stdout and "pack val" in r.stderr
    assert open_pack(dst).counts == {"train": 24, "val": 9}
    r = run_cli("-m", "tl.pack", str(src), str(dst))
    assert r.returncode == 0 and r.stdout.startswith("already packed:"), r.stderr
    r = run_cli("-m", "tl.pack", str(make_imagefolder(tmp_path / "other", n_train=1, n_val=1)), str(dst))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "holds a different pack" \
        in lines[0], r.stderr


def test_bad_src_and_dst_are_one_line_errors(src, tmp_path):
    (tmp_path / "file").write_text("x")
    for args, message in [
        ((tmp_path / "nope", tmp_path / "d"), "does not exist"),
        ((tmp_path, tmp_path / "d"), "has no train/ folder"),
        ((src, tmp_path / "file" / "d"), "cannot write to DST"),
        ((src, src / "train" / "packed"), "is inside SRC"),
        ((src, tmp_path / "file"), "is not a folder"),
    ]:
        with pytest.raises(UserError, match=message) as e:
            pack(*args, progress=False)
        assert "\n" not in str(e.value)
    assert not (src / "train" / "packed").exists()


def test_hymenoptera(hymenoptera, tmp_path):
    listing = list_images(hymenoptera)
    meta = pack(hymenoptera, tmp_path / "hym", progress=False)
    info = open_pack(tmp_path / "hym")
    # train/ants/imageNotFound.gif is no image file to tl.data.listing (.gif is not an ImageFolder extension).
    assert info.counts == {"train": 244, "val": 153} and info.classes == ["ants", "bees"]
    assert meta["splits"]["train"]["unreadable"] == [] and info.fingerprint == listing.fingerprint
    ds = PackedSplit(tmp_path / "hym", "val")
    assert ds.targets == [c for _, c in listing.val]
    for i in (0, 76, 152):
        assert ds[i][0] == Path(listing.val[i][0]).read_bytes()


def flip_a_byte(pack_dir: Path, split: str, i: int) -> str:
    """One byte inside sample i's image bytes inverted, as a bad disk or copy does; returns `shard#key`."""
    offset, size, _ = np.load(pack_dir / f"{split}-offsets.npy")[i].tolist()
    info = open_pack(pack_dir)
    shard = Path(PackedSplit(pack_dir, split, info).where(i).split("#")[0])
    data = bytearray(shard.read_bytes())
    data[offset + size // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    return f"{shard.name}#{i:08d}"


def test_a_flipped_byte_is_found_by_every_reader(src, packed, tmp_path):
    """Before checksums a flipped byte in a val JPEG trained silently on other pixels (exit 0, no word)."""
    dst = tmp_path / "p"
    shutil.copytree(packed, dst)
    intact = run_cli("-m", "tl.pack", "--verify", dst)
    assert intact.returncode == 0 and "every byte as packed" in intact.stdout, intact.stderr
    where = flip_a_byte(dst, "val", 4)
    with pytest.raises(UserError, match=f"the pack {dst} is damaged: 1 of 33 images fail their checksum "
                                        f"\\(the first: {where}\\); 1 of 2 shards differ from their md5"):
        tl.pack.verify(dst, progress=False)
    cli_error(run_cli("-m", "tl.pack", "--verify", dst), "is damaged", where, "pack the source again")
    with pytest.raises(DamagedSample, match=f"sample 00000004 of shard .*{where.split('#')[0]} fails its checksum"):
        PackedSplit(dst, "val").read(4)
    pre = Preprocess.tutorial(32)
    memory = load_packed_split(dst, "val", pre, False, main=False)  # skipped and counted, like an unreadable file
    assert len(memory.images) == 8 and memory.skipped == [str(dst.absolute() / where)]
    with pytest.raises(UserError, match="damaged image in the pack: sample 00000004 of shard .*--strict-images off"):
        load_packed_split(dst, "val", pre, False, main=False, strict=True)
    streamed = stream_packed_split(dst, "val", pre, False, main=False)
    assert torch.equal(streamed.images[3], memory.images[3])
    with pytest.raises(UserError, match="damaged image while streaming the pack: sample 00000004"):
        streamed.images[4]
    args = ["--data-dir", dst, "--epochs", "1", "--weights", "none", "--image-size", "32", "--batch-size", "8"]
    strict = run_cli("train.py", *args, "--strict-images", "on", "--output-dir", tmp_path / "s")
    cli_error(strict, "damaged image in the pack: sample 00000004 of shard", "fails its checksum")
    lenient = run_cli("train.py", *args, "--data-mode", "memory", "--output-dir", tmp_path / "o")
    assert lenient.returncode == 0 and f"skipping damaged image {dst.absolute() / where}" in lenient.stderr
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["skipped_images"] == [str(dst.absolute() / where)] and summary["num_val"] == 8
