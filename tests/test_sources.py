"""tl.data.sources: one way to open a data set (class folders, a label file, a pack) for every command."""

import pytest
import torch
from conftest import FAST, make_imagefolder, one_line_error, run_cli

from tl.core.config import parse_args
from tl.core.errors import UserError
from tl.data.preprocess import Preprocess
from tl.data.sources import open_data, open_run_data
from tl.pack import pack
from tl.predict import predict
from tl.train.loop import train


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    """One generated set as class folders, as a label file of the same files, and as a pack."""
    tmp = tmp_path_factory.mktemp("sources")
    folder = make_imagefolder(tmp / "d", n_train=8, n_val=5, size=48)
    listing = open_data(folder).listing
    rows = [f"{path},{listing.classes[c]},{split}" for split in ("train", "val")
            for path, c in getattr(listing, split)]
    (tmp / "labels.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    pack(folder, tmp / "pack", progress=False)
    return {"folder": folder, "label file": tmp / "labels.csv", "pack": tmp / "pack"}


def test_every_kind_opens_to_the_same_images(kinds):
    pre = Preprocess.tutorial(32)
    opened = {kind: open_data(path) for kind, path in kinds.items()}
    assert [d.label_file for d in opened.values()] == [False, True, False]
    assert opened["pack"].pack is not None and opened["folder"].pack is None
    assert opened["pack"].listing.fingerprint == opened["folder"].listing.fingerprint  # a pack records its source's
    val = {kind: d.split("val", pre, stream=False) for kind, d in opened.items()}
    for kind in ("label file", "pack"):
        assert opened[kind].listing.classes == ["blue", "red"]
        assert [len(opened[kind].listing.train), len(opened[kind].listing.val)] == [16, 10]
        assert val[kind].targets == val["folder"].targets
        assert all(torch.equal(a, b) for a, b in zip(val[kind].images, val["folder"].images, strict=True))
    streamed = opened["pack"].split("val", pre)  # decoded when indexed
    assert torch.equal(streamed.images[3], val["folder"].images[3])


@pytest.mark.parametrize("kind", ["folder", "label file", "pack"])
def test_another_runs_data_is_refused_with_the_flag_to_pass(kinds, kind):
    with pytest.raises(UserError, match=r"--val-of X holds the classes \[blue, red\], the run \[ant, bee\]; "
                                        r"pass --val-of the data"):
        open_run_data(kinds[kind], {"classes": ["ant", "bee"]}, called="--val-of X",
                      fix="pass --val-of the data set the run trained on")
    with pytest.warns(UserWarning, match="differ from the run's"):
        open_run_data(kinds[kind], {"classes": ["blue", "red"], "data": "sha256:other"})


def test_a_runs_val_images_are_the_same_from_each_kind(kinds, tmp_path, base_weights):
    """tl.predict --val-of reads the run's val images from its folder, its label file or its pack alike."""
    out = tmp_path / "run"
    train(parse_args(["--data-dir", str(kinds["folder"]), "--epochs", "1", "--weights", str(base_weights),
                      "--output-dir", str(out), "--wandb", "disabled", *FAST]))
    results = {kind: predict(out / "best.safetensors", [], val_of=str(path)) for kind, path in kinds.items()}
    assert [len(r["predictions"]) for r in results.values()] == [10, 10, 10]
    assert len({r["accuracy"] for r in results.values()}) == 1
    assert results["folder"]["predictions"] == results["label file"]["predictions"] == results["pack"]["predictions"]


def test_a_pack_is_not_packed_again(kinds, tmp_path):
    one_line_error(run_cli("-m", "tl.pack", str(kinds["pack"]), str(tmp_path / "again")), "is a pack already",
                   "pass the ImageFolder or label file it was packed from")
