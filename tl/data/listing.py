"""The data set on disk: fetched or extracted when missing, its train/val/test images listed and fingerprinted."""

import hashlib
import json
import os
import stat
import tempfile
import unicodedata
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.datasets.utils import download_url, extract_archive

from tl.core.errors import UserError

HYMENOPTERA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"
DEFAULT_DATA_DIR = "data/hymenoptera_data"


def ensure_data(data_dir: str, data_zip: str | None = None) -> Path:
    """Return data_dir, first extracting data_zip or downloading the tutorial set if it is missing."""
    root = Path(data_dir)
    if root.is_dir():
        return root
    if data_zip is None and data_dir != DEFAULT_DATA_DIR:
        raise UserError(f"data dir {root} {'is a file, not a folder' if root.exists() else 'does not exist'}; pass "
                        "--data-dir pointing to an ImageFolder root with train/ and val/, or --data-zip with a zip "
                        "of it")
    if data_zip is not None and not Path(data_zip).is_file():
        raise UserError(f"data zip {data_zip} does not exist; pass --data-zip with the path of a "
                        "zip file, e.g. hymenoptera_data.zip")
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {root.parent} for the data set ({e.strerror}); pass a --data-dir in a "
                        "writable location") from None
    # Unpack into a temporary folder and rename at the end: an interrupted download or a second
    # process doing the same never leaves a half-written data dir behind.
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".tl-download-") as tmp:
        if data_zip is None:
            try:
                download_url(HYMENOPTERA_URL, tmp)
            except OSError as e:  # URLError, timeouts, refused connections are all OSErrors
                raise UserError(f"could not download {HYMENOPTERA_URL} ({e}); on a machine without "
                                "internet pass --data-zip /path/to/hymenoptera_data.zip "
                                "(make train-cpu DATA_ZIP=...) or --data-dir with an extracted copy"
                                ) from None
            data_zip = str(Path(tmp) / Path(HYMENOPTERA_URL).name)
        check_zip(data_zip)
        extract_archive(data_zip, tmp)
        extracted = Path(tmp) / root.name
        if not extracted.is_dir():
            raise UserError(f"the zip holds no top-level folder {root.name}/; pass --data-dir with "
                            "the folder's real name or a zip whose top folder matches it")
        if not root.exists():
            extracted.rename(root)
    return root


def check_zip(path: str) -> None:
    """Refuse a damaged zip (CRC of every member) or one whose entries would land outside the target."""
    try:
        with zipfile.ZipFile(path) as z:
            unsafe = [n for n in z.namelist() if n.startswith(("/", "\\")) or ".." in Path(n).parts]
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{path} is not a readable zip ({e}); download it again or pass --data-dir with an "
                        "extracted copy") from None
    if unsafe:
        raise UserError(f"{path} has entries that point outside the folder it is extracted to ({unsafe[0]}); "
                        "refusing to extract it; use a zip from a trusted source")
    if bad:
        raise UserError(f"{path} is damaged: {bad} fails its checksum; download it again")


@dataclass
class Listing:
    """The images of train/, val/ and an optional test/, and a cheap identity of the set."""
    classes: list[str]
    train: list[tuple[str, int]]  # (path, class index), sorted like ImageFolder's samples
    val: list[tuple[str, int]]
    fingerprint: str  # "sha256:<hex>" over (split, class, relative path, byte size) of every image
    test: list[tuple[str, int]] = field(default_factory=list)  # empty without a test/ folder


def class_folders(split_dir: Path) -> list[str]:
    # Hidden folders are tools' leftovers (Jupyter's .ipynb_checkpoints), never classes; a class
    # folder may be a link to a folder elsewhere (data on another disk).
    return sorted(e.name for e in os.scandir(split_dir) if not e.name.startswith(".") and e.is_dir())


def list_images(root: Path, warn: bool = True, val_split: float = 0.0) -> Listing:
    """Scan train/, val/ and test/ when present: the same class folders (at least 2), each holding
    at least one image. With val_split there is no val/: val is that fraction of train/ (split_val).

    Inside a class folder, links to folders are not followed and only regular files count; both
    are skipped with a warning (with warn, which only the main process passes). Reads no file.
    """
    if val_split and (root / "val").is_dir():
        raise UserError(f"--val-split {val_split} takes val images from train/, but {root} has a val/ folder; "
                        "drop --val-split to validate on val/, or remove val/")
    splits = ("train", "val") if not val_split else ("train",)
    splits += ("test",) if (root / "test").is_dir() else ()  # optional: evaluated once, at the end
    names = {}
    for split in splits:
        if not (root / split).is_dir():
            raise UserError(f"{root} has no {split}/ folder; an ImageFolder root needs train/ and "
                            "val/, each with one sub-folder per class"
                            + ("; or pass --val-split 0.2 to hold out part of train/" if split == "val" else ""))
        names[split] = class_folders(root / split)
    classes = names["train"]
    if len(classes) < 2:
        held = f"only one class folder ({classes[0]})" if classes else "no class folders"
        raise UserError(f"{root / 'train'} holds {held}; a classifier needs at least 2, one sub-folder "
                        "per class in both train/ and val/")
    for split in splits[1:]:
        if classes != names[split]:
            raise UserError(f"train/ and {split}/ hold different class folders (train: {classes}, "
                            f"{split}: {names[split]}); give both the same class folders")
    found = {split: [] for split in splits}  # (path, class, file identity, fingerprint row)
    links, odd, empty = [], [], []  # skipped folder links and files
    for split in splits:
        for c, name in enumerate(classes):
            class_dir = os.path.join(root, split, name)
            files = _scan_class(class_dir, links, odd)
            if not files:
                empty.append(f"{split}/{name}")
            for dirpath, fname, st in sorted(files, key=lambda f: (f[0], f[1])):  # ImageFolder's order
                path = dirpath + os.sep + fname
                rel = unicodedata.normalize("NFC", path[len(class_dir) + 1:].replace(os.sep, "/"))
                found[split].append((path, c, (st.st_dev, st.st_ino), (name, rel, st.st_size)))
    if warn and links:
        warnings.warn(f"skipping {len(links)} linked folder(s) inside class folders (e.g. {links[0]}): "
                      "links to folders are not followed there; copy the folder in instead", stacklevel=2)
    if warn and odd:
        warnings.warn(f"skipping {len(odd)} image name(s) that are not regular files (e.g. {odd[0]}: "
                      f"{file_kind(odd[0])}); replace them with the image files", stacklevel=2)
    if empty:
        raise UserError(f"class folder(s) with no images in {root}: {', '.join(empty)} (images end in "
                        f"{', '.join(IMG_EXTENSIONS)}); put at least one image in every class folder or "
                        "remove the empty ones")
    if val_split:
        found["train"], found["val"] = split_val(found["train"], val_split, classes)
    return assemble(classes, found, warn)


def assemble(classes: list[str], found: dict[str, list], warn: bool, tag: list | None = None) -> Listing:
    """A Listing from each split's (path, class, file identity, fingerprint row), in order: a warning for a
    file (by identity: a link or a hard link counts) that is in train and another split; the fingerprint
    over every split's rows (tag: what else it covers, e.g. that they come from a label file)."""
    train_files = {key: path for path, _, key, _ in found["train"]}
    for split in [s for s in found if s != "train"]:
        shared = [(path, train_files[key]) for path, _, key, _ in found[split] if key in train_files]
        if warn and shared:
            warnings.warn(f"{len(shared)} {split} images are also train images (e.g. {shared[0][0]} is "
                          f"{shared[0][1]}); {split} accuracy will be optimistic", stacklevel=3)
    # A split-out val counts as val: the split is part of the set's identity. No test/, no test rows.
    rows = sorted((split, *row) for split, files in found.items() for *_, row in files)
    digest = hashlib.sha256(json.dumps([*(tag or []), *rows]).encode()).hexdigest()
    return Listing(classes, *([(path, c) for path, c, *_ in found[s]] for s in ("train", "val")),
                   fingerprint=f"sha256:{digest}", test=[(path, c) for path, c, *_ in found.get("test", [])])


def split_val(train: list, fraction: float, classes: list[str]) -> tuple[list, list]:
    """Hold out `fraction` of each class (rounded, at least one image) from train as val, the same on
    every machine and for every seed: the files whose sha256 of "class/relative path" comes first.
    Items are list_images' (path, class, file identity, (class, relative path, size)); both parts
    keep train's order."""
    def rank(item):
        name, rel, _ = item[3]
        return hashlib.sha256(f"{name}/{rel}".encode()).hexdigest()

    held = set()
    for c, name in enumerate(classes):
        items = [item for item in train if item[1] == c]
        n = max(1, round(fraction * len(items)))
        if n >= len(items):
            raise UserError(f"--val-split {fraction} leaves no train image of class {name} ({len(items)} image(s) "
                            "in train/): put more images in it, or give the data set a val/ folder")
        held.update(item[0] for item in sorted(items, key=rank)[:n])
    return [i for i in train if i[0] not in held], [i for i in train if i[0] in held]


def _scan_class(class_dir: str, links: list, odd: list) -> list:
    """(folder, name, stat) of every image file under class_dir, as os.walk(followlinks=False) finds
    them; links to folders go to `links`, names that are not regular files to `odd`. One scandir and
    one stat per file: this is most of a stream start-up on a million files."""
    files, stack = [], [class_dir]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as entries:
            for e in entries:
                if e.name.startswith("."):
                    continue
                if e.is_dir():
                    # Not followed: a link to a sibling class mislabels its images, one to .. repeats them.
                    (links if e.is_symlink() else stack).append(e.path)
                    continue
                if not has_file_allowed_extension(e.name, IMG_EXTENSIONS):
                    continue
                try:
                    st = e.stat()
                except OSError:  # a broken link
                    st = None
                # A FIFO, socket or device named x.jpg would block start-up forever on open().
                if st is None or not stat.S_ISREG(st.st_mode):
                    odd.append(e.path)
                else:
                    files.append((folder, e.name, st))
    return files


def file_kind(path: str) -> str:
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        return "a broken link" if os.path.islink(path) else e.strerror
    return ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISBLK(mode) or stat.S_ISCHR(mode) else "not a regular file")
