"""Data: fetching, scanning, decoding and sharding, and the one-line errors for bad data dirs."""

import shutil
import zipfile

import pytest
import torch
from conftest import make_imagefolder, run_cli
from PIL import Image

from tl.data import ImageSet, ensure_data, find_classes, load_split, make_loaders, train_transform
from tl.errors import UserError


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
    classes, folders = find_classes(tiny_data)
    val = load_split(folders["val"].samples, 64, train=False, show_progress=False)
    train = load_split(folders["train"].samples, 64, train=True, show_progress=False)
    assert classes == ["blue", "red"] and val.targets == [0] * 6 + [1] * 6
    assert all(x.shape == (3, 64, 64) and x.dtype == torch.uint8 for x in val.images)
    assert all(min(x.shape[1:]) == 80 for x in train.images)  # kept whole: under the 2x cap
    loader, _, _ = make_loaders(ImageSet(train, train_transform(64)), ImageSet(val), 5, 0, 0, 0, 1)
    x, y = next(iter(loader))
    assert x.shape == (5, 3, 64, 64) and x.dtype == torch.uint8 and y.shape == (5,)
    assert ImageSet(train, train_transform(40))[0][0].shape == (3, 40, 40)  # --train-size


def test_shards_cover_every_image_once(tiny_data):
    _, folders = find_classes(tiny_data)
    val = load_split(folders["val"].samples, 32, train=False, show_progress=False)
    train = load_split(folders["train"].samples, 32, train=True, show_progress=False)
    seen_val, seen_train = [], []
    for rank in range(5):
        train_loader, sampler, val_loader = make_loaders(ImageSet(train), ImageSet(val), 4, 0, 0, rank, 5)
        seen_val += list(val_loader.dataset.indices)
        sampler.set_epoch(3)
        seen_train += list(sampler)
    assert sorted(seen_val) == list(range(12))
    assert set(seen_train) == set(range(24)) and len(seen_train) == 25  # sampler pads 24 -> 25


def test_unreadable_images_are_skipped_with_a_warning(tmp_path):
    root = make_imagefolder(tmp_path / "d", n_train=3, n_val=2)
    (root / "train" / "red" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "train" / "red" / "gray.png").write_bytes(b"")
    Image.new("L", (50, 40), 128).save(root / "train" / "blue" / "gray.png")
    _, folders = find_classes(root)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        train = load_split(folders["train"].samples, 32, train=True, show_progress=False)
    assert len(train.images) == 7 and len(train.skipped) == 2
    assert all(x.shape[0] == 3 for x in train.images)  # grayscale converted to RGB


@pytest.mark.parametrize("breakage, message", [
    ("no-val", "has no val/ folder"),
    ("class-mismatch", "different class folders"),
    ("empty-class", "Found no valid file for the classes red"),
])
def test_bad_data_dirs_are_one_line_errors(tmp_path, breakage, message):
    root = make_imagefolder(tmp_path / "d", n_train=2, n_val=1)
    if breakage == "no-val":
        shutil.rmtree(root / "val")
    elif breakage == "class-mismatch":
        (root / "val" / "red").rename(root / "val" / "green")
    else:
        for f in (root / "train" / "red").iterdir():
            f.unlink()
    with pytest.raises(UserError, match=message):
        find_classes(root)


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
