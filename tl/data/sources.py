"""Where images come from. A data set (class folders, a label file or a pack) opened one way for every
command: open_data lists it and reads its splits, open_run_data also checks it is the one a run trained
on. A Source: images to classify (files and folders, a pack's split, a label file's rows, a run's val
images), decoded one at a time (Source.read), so a set of any size streams."""

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS

from tl.core.errors import UserError
from tl.data import labels, packs
from tl.data.listing import Listing, list_images
from tl.data.packs import PackedSplit, PackInfo, decode_bytes
from tl.data.preprocess import Preprocess, decode
from tl.data.splits import Split, load_split, stream_split


def image_files(paths: list[str]) -> list[Path]:
    """The image files named and found in the folders named, each once (a file also inside a folder named
    keeps its first place), in order."""
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
    seen, once = set(), []
    for f in files:
        real = f.resolve()
        if real not in seen:
            seen.add(real)
            once.append(f)
    return once


def read_images(paths: list[str], classes: list[str], pre: Preprocess) -> Split:
    """The images as tl evaluates them; the parent folder names the true class when it is one of
    `classes` (a val/ folder), else the label is -1."""
    return load_split(labelled(image_files(paths), classes), pre, False, False)


def short_list(names: list[str], limit: int = 5) -> str:
    """A list of class names for an error line: at most `limit` of them, and how many in all."""
    shown = ", ".join(names[:limit])
    return f"[{shown}]" if len(names) <= limit else f"[{shown}, ...] ({len(names)})"


@dataclass(frozen=True)
class DataSet:
    """A data set as every command reads it (open_data): class folders, a label file or a pack, listed once.
    `called` is how messages name it ("--data-dir DIR"), `fix` what they tell the user to pass instead."""
    path: Path
    listing: Listing
    pack: PackInfo | None = None
    data_root: str | None = None  # where a label file's relative paths start
    label_file: bool = False
    called: str = ""
    fix: str = "pass the data set the run trained on"

    @property
    def base(self) -> Path:
        """Where the listing's paths start: the folder or pack, or where a label file's paths start from."""
        return labels.base_dir(self.path, self.data_root) if self.label_file else self.path

    def naming(self):
        """name(path): what messages call an image (a label file's file:line, else its path)."""
        return labels.naming(self.path, self.data_root) if self.label_file else str

    def check_run(self, meta: dict) -> "DataSet":
        """The data set a run (its checkpoint's metadata) trained on: the same classes (else an error), the
        same files (else a warning: its val images may not be the run's)."""
        if self.listing.classes != meta["classes"]:
            raise UserError(f"{self.called} holds the classes {short_list(self.listing.classes)}, the run "
                            f"{short_list(meta['classes'])}; {self.fix}")
        if meta.get("data") and self.listing.fingerprint != meta["data"]:
            warnings.warn(f"the images of {self.path} differ from the run's: its val images may not be the run's",
                          stacklevel=2)
        return self

    def split(self, name: str, pre: Preprocess, train: bool = False, stream: bool = True, main: bool = True,
              strict: bool = False) -> Split:
        """One split read for a model: checked now and decoded when indexed (stream), or decoded into memory."""
        if self.pack:
            read = packs.stream_packed_split if stream else packs.load_packed_split
            return read(self.path, name, pre, train, main, strict, self.pack)
        read = stream_split if stream else load_split
        return read(getattr(self.listing, name), pre, train, main, strict, self.naming())


def open_data(path, data_root: str | None = None, val_split: float = 0.0, warn: bool = True,
              label_file: bool | None = None, called: str | None = None,
              fix: str = "pass the data set the run trained on") -> DataSet:
    """The one way tl opens a data set: a label file (label_file, or by its suffix), a pack (python -m tl.pack)
    or an ImageFolder (train/, val/, an optional test/), listed as training lists it. val_split: the part of
    train/ a run held out as val (a run's checkpoint records it)."""
    path = Path(path)
    called = called or str(path)
    if label_file or (label_file is None and labels.is_label_file(path)):
        return DataSet(path, labels.list_label_file(path, data_root, val_split, warn), None, data_root, True,
                       called, fix)
    if packs.is_pack(path):
        if val_split:
            raise UserError(f"--val-split holds out part of train/, but {path} is a pack, which holds its own val "
                            "split; drop --val-split, or pass the ImageFolder itself")
        info = packs.open_pack(path)
        return DataSet(path, info.listing(), info, called=called, fix=fix)
    return DataSet(path, list_images(path, warn=warn, val_split=val_split), called=called, fix=fix)


def is_data_set(path) -> bool:
    """Whether open_data would read `path` as a data set rather than refuse it."""
    return labels.is_label_file(path) or packs.is_pack(path) or (Path(path) / "train").is_dir()


def open_run_data(path, meta: dict, data_root: str | None = None, called: str | None = None,
                  fix: str = "pass the data set the run trained on") -> DataSet:
    """The data set a run trained on, opened as the run opened it (its --val-split from the checkpoint) and
    checked against the run's classes and files: its val split is the images the run validated on."""
    val_split = meta.get("recipe", {}).get("val_split", 0.0)
    return open_data(path, data_root, val_split, warn=False, called=called, fix=fix).check_run(meta)


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


def pack_source(data: DataSet, split: str, classes: list[str]) -> Source:
    """A pack's split; its classes map to the checkpoint's by name (-1 for a class the model lacks)."""
    ds = PackedSplit(data.path, split, data.pack)
    index = [classes.index(c) if c in classes else -1 for c in data.pack.classes]
    return Source(data.pack.names(split), [index[t] for t in ds.targets], ds)


def open_source(paths: list[str], val_of: str | None, meta: dict, split: str | None = None,
                data_file: str | None = None, data_root: str | None = None) -> Source:
    """What tl.predict classifies: image files and folders, a pack folder (its `split`, default val), a label
    file's rows (of `split`, default all), or --val-of's images (the val images of a run's data set: a data dir,
    pack or label file); exactly one of them (tl.predict checks that before it loads the model)."""
    if data_root and not (data_file or (val_of and labels.is_label_file(val_of))):
        raise UserError("--data-root is where a label file's paths start from; pass --data-file (or --val-of a "
                        "label file) too, or drop --data-root")
    if data_file:
        return Source.of_samples(labels.samples_for_predict(data_file, meta["classes"], data_root, split))
    if val_of:
        data = open_run_data(val_of, meta, data_root, f"--val-of {val_of}", "pass --val-of the data set the run "
                             "trained on")
        return pack_source(data, "val", meta["classes"]) if data.pack else Source.of_samples(data.listing.val)
    found = [p for p in paths if packs.is_pack(p)]
    if found and len(paths) > 1:
        raise UserError(f"{found[0]} is a pack: pass it alone (one pack, or image files and folders)")
    if found and split == "test":
        raise UserError(f"{found[0]} is a pack, which holds train and val only; pass --split train or val")
    if found:
        return pack_source(open_data(found[0]), split or "val", meta["classes"])
    if split:
        raise UserError(f"--split {split} picks the rows of a pack or a label file; drop it for image files and "
                        "folders")
    return Source.of_samples(labelled(image_files(paths), meta["classes"]))
