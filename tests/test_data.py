"""Data: fetching, scanning, decoding and sharding, and the one-line errors for bad data dirs."""

import hashlib
import json
import os
import re
import shutil
import signal
import threading
import time
import warnings
import zipfile

import pytest
import torch
from conftest import make_imagefolder, one_line_error, run_cli
from PIL import Image
from torchvision.datasets import ImageFolder

import tl.data.loaders
import tl.data.preprocess
import tl.data.splits
from tl.core.errors import UserError
from tl.data.listing import ensure_data, list_images
from tl.data.loaders import ImageSet, make_loaders
from tl.data.preprocess import Preprocess, to_input, train_transform
from tl.data.splits import Split, load_split


def test_local_zip_is_extracted_next_to_the_data_dir(tmp_path):
    src = make_imagefolder(tmp_path / "src" / "bugs", n_train=2, n_val=1)
    archive = tmp_path / "bugs.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in src.rglob("*.jpg"):
            z.write(f, f.relative_to(src.parent))
    root = ensure_data(str(tmp_path / "data" / "bugs"), str(archive))
    assert sorted(p.name for p in (root / "train").iterdir()) == ["blue", "red"]
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["bugs"]  # no temp folder left behind
    assert ensure_data(str(root), str(archive)) == root  # present: nothing to do


def test_decoding_matches_the_tutorial_shapes(tiny_data):
    listing = list_images(tiny_data)
    val = load_split(listing.val, Preprocess.tutorial(64), False, False)
    train = load_split(listing.train, Preprocess.tutorial(64), True, False)
    assert listing.classes == ["blue", "red"] and val.targets == [0] * 6 + [1] * 6
    assert all(x.shape == (3, 64, 64) and x.dtype == torch.uint8 for x in val.images)
    assert all(min(x.shape[1:]) == 80 for x in train.images)  # kept whole: under the 2x cap
    loader, _, _ = make_loaders(ImageSet(train, train_transform(Preprocess.tutorial(64))), ImageSet(val), 5, 0, 0, 0, 1)
    x, y = next(iter(loader))
    assert x.shape == (5, 3, 64, 64) and x.dtype == torch.uint8 and y.shape == (5,)
    assert ImageSet(train, train_transform(Preprocess.tutorial(40)))[0][0].shape == (3, 40, 40)  # --train-size


def test_shards_cover_every_image_once(tiny_data):
    listing = list_images(tiny_data)
    val = load_split(listing.val, Preprocess.tutorial(32), False, False)
    train = load_split(listing.train, Preprocess.tutorial(32), True, False)
    seen_val, seen_train = [], []
    for rank in range(5):
        train_loader, sampler, val_loader = make_loaders(ImageSet(train), ImageSet(val), 4, 0, 0, rank, 5)
        seen_val += list(val_loader.dataset.indices)
        sampler.set_epoch(3)
        seen_train += list(sampler)
    assert sorted(seen_val) == list(range(12))
    # Every process takes 5 images (the same number of steps); the one repeat is marked, so each image
    # trains and counts once.
    assert sorted(i for i in seen_train if i >= 0) == list(range(24)) and len(seen_train) == 25
    repeats = [-1 - i for i in seen_train if i < 0]
    assert len(repeats) == 1 and 0 <= repeats[0] < 24
    x, y = ImageSet(train)[-1 - repeats[0]]
    assert y == tl.data.loaders.PAD and torch.equal(x, ImageSet(train)[repeats[0]][0])


def test_unreadable_images_are_skipped_with_a_warning(tmp_path):
    root = make_imagefolder(tmp_path / "d", n_train=3, n_val=2)
    (root / "train" / "red" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "train" / "red" / "gray.png").write_bytes(b"")
    Image.new("L", (50, 40), 128).save(root / "train" / "blue" / "gray.png")
    listing = list_images(root)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        train = load_split(listing.train, Preprocess.tutorial(32), True, True)
    assert len(train.images) == 7 and len(train.skipped) == 2
    assert all(x.shape[0] == 3 for x in train.images)  # grayscale converted to RGB
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # other processes than the main one stay quiet
        assert load_split(listing.train, Preprocess.tutorial(32), True, False).skipped == train.skipped


@pytest.mark.parametrize("breakage, message", [
    ("no-val", "has no val/ folder"),
    ("class-mismatch", "different class folders"),
    ("empty-class", r"class folder\(s\) with no images in .*: train/red \(images end in .jpg"),
    ("one-class", r"holds only one class folder \(red\); a classifier needs at least 2"),
    ("no-class", "holds no class folders"),
])
def test_bad_data_dirs_are_one_line_errors(tmp_path, breakage, message):
    root = make_imagefolder(tmp_path / "d", n_train=2, n_val=1)
    if breakage == "no-val":
        shutil.rmtree(root / "val")
    elif breakage == "class-mismatch":
        (root / "val" / "red").rename(root / "val" / "green")
    elif breakage == "empty-class":
        for f in (root / "train" / "red").iterdir():
            f.unlink()
        (root / "train" / "red" / "notes.txt").write_text("not an image")
    else:
        for split in ("train", "val"):
            shutil.rmtree(root / split / "blue")
            if breakage == "no-class":
                shutil.rmtree(root / split / "red")
    with pytest.raises(UserError, match=message):
        list_images(root)


def quiet_listing(root):
    """list_images with warnings as a list of their messages."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        listing = list_images(root)
    return listing, [str(w.message) for w in caught]


def test_listing_is_imagefolders_on_a_clean_set(tiny_data):
    listing, warned = quiet_listing(tiny_data)
    for split in ("train", "val"):
        folder = ImageFolder(tiny_data / split)
        assert getattr(listing, split) == folder.samples and listing.classes == folder.classes
    assert warned == [] and re.fullmatch("sha256:[0-9a-f]{64}", listing.fingerprint)


def test_hidden_folders_and_files_are_ignored(tmp_path):
    root = make_imagefolder(tmp_path / "d", n_train=3, n_val=2)
    for split in ("train", "val"):  # what Jupyter leaves behind; ImageFolder makes it a class
        (root / split / ".ipynb_checkpoints").mkdir()
        shutil.copy(root / split / "red" / "000.jpg", root / split / ".ipynb_checkpoints")
    shutil.copy(root / "train" / "red" / "000.jpg", root / "train" / "red" / "._000.jpg")  # macOS metadata
    (root / "train" / "blue" / ".thumbs").mkdir()
    shutil.copy(root / "train" / "blue" / "000.jpg", root / "train" / "blue" / ".thumbs")
    listing, warned = quiet_listing(root)
    assert listing.classes == ["blue", "red"] and warned == []
    assert len(listing.train) == 6 and len(listing.val) == 4


def test_linked_folders_inside_a_class_are_not_followed(tmp_path):
    root = make_imagefolder(tmp_path / "d", n_train=3, n_val=2)
    (root / "train" / "red").rename(tmp_path / "other-disk")  # a class folder may be a link, though
    (root / "train" / "red").symlink_to(tmp_path / "other-disk", target_is_directory=True)
    (root / "train" / "red" / "more").symlink_to(root / "train" / "blue")  # would label blue images red
    (root / "train" / "blue" / "loop").symlink_to("..")  # would add every train image again, as blue
    listing, warned = quiet_listing(root)
    assert [c for _, c in listing.train] == [0] * 3 + [1] * 3
    assert all("more" not in p and "loop" not in p for p, _ in listing.train)
    assert len(warned) == 1 and warned[0].startswith("skipping 2 linked folder(s) inside class folders (e.g. ")


def test_only_regular_files_are_images(tmp_path):
    root = make_imagefolder(tmp_path / "d", n_train=3, n_val=2)
    os.mkfifo(root / "train" / "red" / "x.jpg")  # open() on it would wait for a writer forever
    (root / "train" / "blue" / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    (root / "val" / "red" / "linked.jpg").symlink_to(root / "val" / "blue" / "000.jpg")  # a good image
    listing, warned = quiet_listing(root)
    paths = [p for p, _ in listing.train + listing.val]
    assert len(listing.train) == 6 and len(listing.val) == 5 and str(root / "val" / "red" / "linked.jpg") in paths
    assert warned == [f"skipping 2 image name(s) that are not regular files (e.g. {root}/train/blue/gone.jpg: "
                      "a broken link); replace them with the image files"]
    # and start-up does not block
    assert len(load_split(listing.train, Preprocess.tutorial(32), True, False).images) == 6


def test_val_images_that_are_train_images_are_reported(tmp_path):
    root = make_imagefolder(tmp_path / "d", n_train=3, n_val=2)
    (root / "val" / "red" / "dup.jpg").symlink_to(root / "train" / "red" / "001.jpg")
    os.link(root / "train" / "blue" / "002.jpg", root / "val" / "blue" / "hard.jpg")
    listing, warned = quiet_listing(root)
    assert len(listing.val) == 6
    assert warned == [f"2 val images are also train images (e.g. {root}/val/blue/hard.jpg is "
                      f"{root}/train/blue/002.jpg); val accuracy will be optimistic"]


def test_only_the_main_process_warns_about_the_listing(tmp_path):
    root = make_imagefolder(tmp_path / "d", n_train=3, n_val=2)
    os.mkfifo(root / "train" / "red" / "x.jpg")
    (root / "train" / "red" / "more").symlink_to(root / "train" / "blue")
    (root / "val" / "red" / "dup.jpg").symlink_to(root / "train" / "red" / "001.jpg")
    assert len(quiet_listing(root)[1]) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(list_images(root, warn=False).train) == 6


def test_fingerprint_follows_names_sizes_and_classes_only(tmp_path, monkeypatch):
    a = make_imagefolder(tmp_path / "a" / "set", n_train=3, n_val=2)
    b = make_imagefolder(tmp_path / "b" / "copy", n_train=3, n_val=2)  # the same set elsewhere
    fingerprint = list_images(a).fingerprint
    assert list_images(b).fingerprint == fingerprint
    os.utime(a / "train" / "red" / "000.jpg", (0, 0))  # times are not part of it
    monkeypatch.setattr("builtins.open", None)  # and nothing is read
    assert list_images(a).fingerprint == fingerprint
    monkeypatch.undo()
    seen = {fingerprint}
    red, blue = a / "train" / "red", a / "train" / "blue"
    for change in (lambda: shutil.copy(red / "000.jpg", red / "new.jpg"),  # added
                   lambda: (red / "new.jpg").rename(red / "renamed.jpg"),
                   lambda: (red / "renamed.jpg").rename(blue / "renamed.jpg"),  # moved to another class
                   lambda: (blue / "renamed.jpg").open("ab").write(b"\0"),  # resized
                   lambda: (blue / "renamed.jpg").unlink()):  # removed: back to the start
        change()
        seen.add(list_images(a).fingerprint)
    assert len(seen) == 5 and list_images(a).fingerprint == fingerprint


def test_fingerprint_of_a_set_without_test_is_what_it_always_was(tmp_path):
    root = make_imagefolder(tmp_path / "set", n_train=3, n_val=2)
    # The format runs saved before test/ and --val-split existed: their resumes must still match.
    rows = sorted([split, c, f.name, f.stat().st_size] for split in ("train", "val") for c in ("blue", "red")
                  for f in (root / split / c).iterdir())
    old = "sha256:" + hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    assert list_images(root).fingerprint == old
    make_imagefolder(tmp_path / "other", n_train=0, n_val=2, seed=1)
    shutil.move(tmp_path / "other" / "val", root / "test")
    listing = list_images(root)
    assert listing.fingerprint != old and len(listing.test) == 4 and len(listing.val) == 4
    assert listing.test == [(str(root / "test" / c / f"{i:03d}.jpg"), k) for k, c in enumerate(("blue", "red"))
                            for i in range(2)]
    (root / "test" / "green").mkdir()
    (root / "test" / "green" / "x.jpg").write_bytes((root / "test" / "red" / "000.jpg").read_bytes())
    with pytest.raises(UserError, match=r"train/ and test/ hold different class folders"):
        list_images(root)


def held_out(root, fraction):
    """What --val-split should hold out, from its definition: per class, the round(fraction * n) (at
    least one) files whose sha256 of "class/name" comes first."""
    chosen = set()
    for c in sorted(os.listdir(root / "train")):
        names = sorted(os.listdir(root / "train" / c), key=lambda n: hashlib.sha256(f"{c}/{n}".encode()).hexdigest())
        chosen |= {str(root / "train" / c / n) for n in names[:max(1, round(fraction * len(names)))]}
    return chosen


def test_val_split_holds_out_a_stratified_deterministic_part_of_train(tmp_path):
    root = make_imagefolder(tmp_path / "a" / "set", classes=("blue", "red", "green"), n_train=10, n_val=1)
    with pytest.raises(UserError, match="has a val/ folder; drop --val-split"):
        list_images(root, val_split=0.2)
    shutil.rmtree(root / "val")
    with pytest.raises(UserError, match="no val/ folder.*--val-split 0.2"):
        list_images(root)
    listing = list_images(root, val_split=0.2)
    val, train = {p for p, _ in listing.val}, {p for p, _ in listing.train}
    assert val == held_out(root, 0.2) and len(val) == 6 and not val & train
    assert len(train) == 24 and train | val == {str(f) for f in (root / "train").rglob("*.jpg")}
    assert all(listing.classes[c] == os.path.basename(os.path.dirname(p)) for p, c in listing.val + listing.train)
    assert [p for p, _ in listing.val] == sorted(val, key=lambda p: (listing.classes.index(p.split(os.sep)[-2]), p))
    # The same files elsewhere: the same split and fingerprint; another fraction: another identity.
    copy = tmp_path / "b" / "copy"
    shutil.copytree(root, copy)
    moved = list_images(copy, val_split=0.2)
    assert [os.path.relpath(p, copy) for p, _ in moved.val] == [os.path.relpath(p, root) for p, _ in listing.val]
    assert moved.fingerprint == listing.fingerprint != list_images(root, val_split=0.3).fingerprint
    assert {p for p, _ in list_images(root, val_split=0.01).val} == held_out(root, 0.01)  # one image per class
    for f in list((root / "train" / "red").iterdir())[1:]:
        f.unlink()
    with pytest.raises(UserError, match=r"leaves no train image of class red \(1 image"):
        list_images(root, val_split=0.2)


class Stop(Exception):
    pass


def blocked_decodes(monkeypatch):
    """Decoding on two threads that blocks until `release` is set (bad.jpg fails at once). Returns the paths
    whose decoding started, those that finished, and release: a caller that returned while nothing has
    finished did not wait for the decodes under way, whatever the machine's speed."""
    started, finished, release = [], [], threading.Event()

    def blocked_decode(path, pre, train):
        started.append(path)
        if path == "bad.jpg":
            raise OSError("cannot identify image file")
        release.wait(30)
        finished.append(path)
        return torch.zeros(3, 8, 8, dtype=torch.uint8)

    monkeypatch.setattr(tl.data.splits, "decode", blocked_decode)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    return started, finished, release


def drained(started, finished, release) -> int:
    """Let the decodes under way finish; how many ever started."""
    release.set()
    for _ in range(3000):
        if len(finished) == len([p for p in started if p != "bad.jpg"]):
            break
        time.sleep(0.01)
    return len(started)


def test_a_stop_signal_while_decoding_returns_at_once(monkeypatch):
    started, finished, release = blocked_decodes(monkeypatch)
    real = tl.data.splits.decode

    def decode(path, pre, train):  # the signal comes while the first decodes are under way (and blocked)
        if path == "1.jpg":
            os.kill(os.getpid(), signal.SIGALRM)
        return real(path, pre, train)

    def handler(signum, frame):  # as the loop's stop handler may do during start-up
        raise Stop

    monkeypatch.setattr(tl.data.splits, "decode", decode)
    previous = signal.signal(signal.SIGALRM, handler)
    try:
        with pytest.raises(Stop):
            load_split([(f"{i}.jpg", 0) for i in range(200)], Preprocess.tutorial(8), True, False)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert finished == []  # returned while its decodes were still blocked: it did not wait for them
    assert drained(started, finished, release) < 20  # and none started after the stop


def test_a_strict_error_does_not_wait_for_the_rest(monkeypatch):
    started, finished, release = blocked_decodes(monkeypatch)
    with pytest.raises(UserError, match="unreadable image bad.jpg"):
        load_split([("bad.jpg", 0)] + [(f"{i}.jpg", 0) for i in range(200)], Preprocess.tutorial(8), True, False,
                   strict=True)
    assert finished == []
    assert drained(started, finished, release) < 20


def random_split(n=12):
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 48, 56), dtype=torch.uint8, generator=g) for _ in range(n)]
    return Split(images, [i % 2 for i in range(n)], [f"{i}.jpg" for i in range(n)])


def test_augmentation_is_the_same_with_any_worker_count():
    def epochs(workers):
        images = ImageSet(random_split(), train_transform(Preprocess.tutorial(32)), seed=3)
        loader, sampler, _ = make_loaders(images, ImageSet(random_split()), 4, workers, 0, 0, 1)
        assert not loader.persistent_workers  # fresh workers see each epoch's set_epoch
        out = []
        for epoch in (1, 2):
            sampler.set_epoch(epoch)
            images.set_epoch(epoch)
            out.append(torch.cat([x for x, _ in loader]))
        return out

    serial, parallel = epochs(0), epochs(2)
    assert all(torch.equal(s, p) for s, p in zip(serial, parallel))
    assert not torch.equal(serial[0], serial[1])


def test_augmentation_depends_on_seed_epoch_and_index_only(monkeypatch):
    images = ImageSet(random_split(), train_transform(Preprocess.tutorial(32)), seed=3)
    state = torch.get_rng_state()
    monkeypatch.setattr(torch.cuda, "manual_seed_all", None)  # a GPU's RNG is not touched either
    images.set_epoch(1)
    first = images[0][0]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left as it was
    torch.default_generator.manual_seed(1234)  # whatever the global RNG holds (a resumed run, a worker)
    assert torch.equal(images[0][0], first)
    images.set_epoch(2)
    assert not torch.equal(images[0][0], first)
    images.set_epoch(1)
    assert torch.equal(images[0][0], first)
    other_seed = ImageSet(random_split(), train_transform(Preprocess.tutorial(32)), seed=4)
    assert not torch.equal(other_seed.__getitem__(0)[0], first)


def test_normalization_constants_are_built_once_per_device(monkeypatch):
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    first = to_input(x, torch.device("cpu"))
    calls = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: calls.append(a) or real(*a, **k))
    again = [to_input(x, torch.device("cpu")) for _ in range(3)]
    assert calls == [] and all(torch.equal(first, y) for y in again)
    mean = real(tl.data.preprocess.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = real(tl.data.preprocess.IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(first, (x.float() / 255 - mean) / std)
    assert first.is_contiguous(memory_format=torch.channels_last)


def test_missing_data_dir_from_the_command_line(tmp_path):
    proc = run_cli("train.py", "--data-dir", str(tmp_path / "nope"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line, no traceback
    assert "does not exist" in proc.stderr and "--data-dir" in proc.stderr


def test_unreachable_download_says_how_to_work_offline(tmp_path):
    # A proxy on a closed local port makes the real download fail fast, as an offline node does.
    env = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    proc = run_cli("train.py", "--output-dir", str(tmp_path / "out"), env=env,
                   cwd=tmp_path)  # cwd has no data/hymenoptera_data, so the default is fetched
    assert proc.returncode == 2, proc.stderr
    assert "could not download https://download.pytorch.org/tutorial/hymenoptera_data.zip" in proc.stderr
    assert "--data-zip" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "data" / "hymenoptera_data").exists()


def test_stream_start_up_check_reads_signatures(tmp_path):
    """Stream mode's start-up check: what PIL would open passes (whatever the extension says), what is not
    an image is skipped and listed; only a few bytes of each file are read."""
    root = make_imagefolder(tmp_path / "d", n_train=2, n_val=1)
    blue = root / "train" / "blue"
    Image.new("RGB", (9, 7)).save(blue / "really-a-gif.jpg", format="GIF")
    Image.new("RGB", (9, 7)).save(blue / "x.png")
    for name, data in (("empty.jpg", b""), ("tiny.jpg", b"\xff"), ("page.jpg", b"<html>404</html>")):
        (blue / name).write_bytes(data)
    listing = list_images(root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        split = tl.data.splits.stream_split(listing.train, Preprocess.tutorial(32), True, main=True)
    assert sorted(os.path.basename(p) for p in split.skipped) == ["empty.jpg", "page.jpg", "tiny.jpg"]
    assert len(caught) == 3 and any("an empty file" in str(w.message) for w in caught)
    assert len(split.targets) == len(split.images) == 6
    assert split.images[split.paths.index(str(blue / "really-a-gif.jpg"))].shape == (3, 7, 9)


def test_a_tmpdir_too_long_for_the_workers_sockets_is_one_line_error(tmp_path, tiny_data):
    """Under such a TMPDIR a DataLoader worker cannot bind the socket it hands batches over with and the
    loader waits forever (seen: a test hung until its timeout). tl refuses before training; 0 workers run."""
    long = tmp_path / ("t" * 80)
    long.mkdir()
    argv = ["train.py", "--data-dir", str(tiny_data), "--epochs", "1", "--weights", "none", "--wandb", "disabled",
            "--image-size", "32", "--batch-size", "8"]
    proc = run_cli(*argv, "--output-dir", str(tmp_path / "a"), "--num-workers", "1", env={"TMPDIR": str(long)})
    one_line_error(proc, f"TMPDIR {long} is too long", "export TMPDIR=/tmp", "--num-workers 0")
    assert not (tmp_path / "a" / "state.safetensors").exists()
    proc = run_cli(*argv, "--output-dir", str(tmp_path / "b"), "--num-workers", "0", env={"TMPDIR": str(long)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    tl.data.loaders.check_workers_can_start(1)  # this test's own TMPDIR is short enough
