"""Images to classify: files and folders named on a command line, or a run's val images of a data set."""

import warnings
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

from tl.errors import UserError
from tl.listing import list_images
from tl.preprocess import Preprocess
from tl.splits import Split, load_split


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
    files = image_files(paths)
    return load_split([(str(f), classes.index(f.parent.name) if f.parent.name in classes else -1)
                       for f in files], pre, False, False)


def val_images(data_dir: str, meta: dict) -> list[tuple[str, int]]:
    """The images a run on data_dir validated on: its val/ folder, or the part of train/ that the run's
    --val-split (recorded in the checkpoint) held out."""
    listing = list_images(Path(data_dir), warn=False, val_split=meta.get("recipe", {}).get("val_split", 0.0))
    if listing.classes != meta["classes"]:
        raise UserError(f"--val-of {data_dir} holds the classes {listing.classes}, the checkpoint {meta['classes']}; "
                        "pass the data set the run trained on")
    if meta.get("data") and listing.fingerprint != meta["data"]:
        warnings.warn(f"the files of {data_dir} differ from the run's: its val images may not be the run's",
                      stacklevel=2)
    return listing.val
