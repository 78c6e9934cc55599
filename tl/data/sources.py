"""Images to classify: files and folders named on a command line, a run's val images of a data set, or a
pack's split; decoded one at a time (Source.read), so a set of any size streams."""

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS

from tl.core.errors import UserError
from tl.data import labels
from tl.data.listing import list_images
from tl.data.packs import PackedSplit, decode_bytes, is_pack
from tl.data.preprocess import Preprocess, decode
from tl.data.splits import Split, load_split


def image_files(paths: list[str]) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMG_EXTENSIONS)
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"{p} does not exist; pass image files or folders of images")
    if not files:
        raise UserError(f"no images ({', '.join(IMG_EXTENSIONS)}) in {' '.join(paths)}")
    return files


def read_images(paths: list[str], classes: list[str], pre: Preprocess) -> Split:
    """The images as tl evaluates them; the parent folder names the true class when it is one of
    `classes` (a val/ folder), else the label is -1."""
    return load_split(labelled(image_files(paths), classes), pre, False, False)


def val_images(data: str, meta: dict, data_root: str | None = None) -> list[tuple[str, int]]:
    """The images a run on `data` (a data dir, or a label file with its data_root) validated on: its val
    images, or the part of train that the run's --val-split (recorded in the checkpoint) held out."""
    val_split = meta.get("recipe", {}).get("val_split", 0.0)
    listing = (labels.list_label_file(data, data_root, val_split, warn=False) if labels.is_label_file(data)
               else list_images(Path(data), warn=False, val_split=val_split))
    if listing.classes != meta["classes"]:
        raise UserError(f"--val-of {data} holds the classes {listing.classes}, the checkpoint {meta['classes']}; "
                        "pass the data set the run trained on")
    if meta.get("data") and listing.fingerprint != meta["data"]:
        warnings.warn(f"the files of {data} differ from the run's: its val images may not be the run's",
                      stacklevel=2)
    return listing.val


def run_data(config: dict) -> tuple[str, str | None]:
    """The data a run's config.json names: its --data-file and --data-root, or its --data-dir and None."""
    if config.get("data_file"):
        return config["data_file"], config.get("data_root")
    return config["data_dir"], None


def labelled(files, classes: list[str]) -> list[tuple[str, int]]:
    """(path, label): the parent folder names the class when it is one of `classes`, else -1."""
    return [(str(f), classes.index(Path(f).parent.name) if Path(f).parent.name in classes else -1) for f in files]


@dataclass
class Source:
    """Images to classify in a fixed order: `names` (file paths, or a pack's `DIR/val-000000.tar#KEY`),
    `labels` (class indices of the checkpoint, -1 where unknown); read(i) decodes image i's center view.
    Nothing is decoded up front: tl.predict's DataLoader workers call read."""
    names: list[str]
    labels: list[int]
    pack: object = None  # a tl.data.packs.PackedSplit, whose names these are

    @classmethod
    def of_samples(cls, samples: list[tuple[str, int]]) -> "Source":
        return cls([path for path, _ in samples], [label for _, label in samples])

    @property
    def labelled(self) -> bool:
        return bool(self.labels) and min(self.labels) >= 0

    def read(self, i: int, pre: Preprocess) -> torch.Tensor:
        """Image i as tl evaluates it; raises one of tl.data.splits.UNREADABLE for a file that is no image."""
        if self.pack is None:
            return decode(self.names[i], pre, False)
        return decode_bytes(self.pack.read(i), pre, False)

    def read_name(self, name: str, pre: Preprocess) -> torch.Tensor:
        """The image a name of this source stands for (--png reads the few it shows back from the output)."""
        if self.pack is None:
            return decode(name, pre, False)
        return self.read(int(name.rsplit("#", 1)[1]), pre)  # the key is the sample's index


def pack_source(path: str, split: str, classes: list[str]) -> Source:
    """A pack's split; its classes map to the checkpoint's by name (-1 for a class the model lacks)."""
    ds = PackedSplit(path, split)
    index = [classes.index(c) if c in classes else -1 for c in ds.info.classes]
    return Source(ds.info.names(split), [index[t] for t in ds.targets], ds)


def open_source(paths: list[str], val_of: str | None, meta: dict, split: str | None = None,
                data_file: str | None = None, data_root: str | None = None) -> Source:
    """What tl.predict classifies: image files and folders, a pack folder (its `split`, default val), a label
    file's rows (of `split`, default all), or --val-of's images (a data dir or a run's label file); exactly one
    of them (tl.predict checks that before it loads the model)."""
    if data_root and not (data_file or (val_of and labels.is_label_file(val_of))):
        raise UserError("--data-root is where a label file's paths start from; pass --data-file (or --val-of a "
                        "label file) too, or drop --data-root")
    if data_file:
        return Source.of_samples(labels.samples_for_predict(data_file, meta["classes"], data_root, split))
    if val_of:
        return Source.of_samples(val_images(val_of, meta, data_root))
    packs = [p for p in paths if is_pack(p)]
    if packs and len(paths) > 1:
        raise UserError(f"{packs[0]} is a pack: pass it alone (one pack, or image files and folders)")
    if packs and split == "test":
        raise UserError(f"{packs[0]} is a pack, which holds train and val only; pass --split train or val")
    if packs:
        return pack_source(packs[0], split or "val", meta["classes"])
    if split:
        raise UserError(f"--split {split} picks the rows of a pack or a label file; drop it for image files and "
                        "folders")
    return Source.of_samples(labelled(image_files(paths), meta["classes"]))
