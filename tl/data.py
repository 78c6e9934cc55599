"""Data: fetch the ImageFolder set, decode every image once into memory, shard it per process.

Images are decoded a single time and kept as uint8 tensors: val images already resized and
center-cropped (deterministic), train images at most 2x the crop size on their shorter side so
each epoch's RandomResizedCrop+flip is a cheap tensor op. Normalization happens on the device.
This suits data sets that fit in RAM (hymenoptera: about 60 MB); see the README for larger ones.
"""

import os
import tempfile
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.utils import download_url, extract_archive
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from tl.errors import UserError

HYMENOPTERA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"
DEFAULT_DATA_DIR = "data/hymenoptera_data"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def ensure_data(data_dir: str, data_zip: str | None = None) -> Path:
    """Return data_dir, first extracting data_zip or downloading the tutorial set if it is missing."""
    root = Path(data_dir)
    if root.is_dir():
        return root
    if data_zip is None and data_dir != DEFAULT_DATA_DIR:
        raise UserError(f"data dir {root} does not exist; pass --data-dir pointing to an ImageFolder "
                        "root with train/ and val/, or --data-zip with a zip of it")
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
class Split:
    """One split decoded into memory: uint8 CHW images, integer labels, the files it skipped."""
    images: list[torch.Tensor]
    targets: list[int]
    paths: list[str]
    skipped: list[str] = field(default_factory=list)


class ImageSet(Dataset):
    def __init__(self, split: Split, transform=None):
        self.split, self.transform = split, transform

    def __len__(self):
        return len(self.split.images)

    def __getitem__(self, i):
        x = self.split.images[i]
        return (self.transform(x) if self.transform else x), self.split.targets[i]


def find_classes(root: Path) -> tuple[list[str], dict[str, ImageFolder]]:
    """Scan train/ and val/ and check they hold the same, non-empty class folders."""
    folders = {}
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(f"{root} has no {split}/ folder; an ImageFolder root needs train/ and "
                            "val/, each with one sub-folder per class")
        try:
            folders[split] = ImageFolder(root / split)
        except FileNotFoundError as e:  # ImageFolder's message for no class dirs or an empty one
            raise UserError(f"{root / split}: {e}; put at least one image in every class folder or remove "
                            "the empty ones") from None
    train, val = folders["train"].classes, folders["val"].classes
    if train != val:
        raise UserError(f"train/ and val/ hold different class folders (train: {train}, "
                        f"val: {val}); give both the same class folders")
    return train, folders


def decode(path: str, image_size: int, train: bool) -> torch.Tensor:
    """Decode one file to uint8 RGB: val as the tutorial's Resize+CenterCrop, train shrunk to at
    most 2x the crop on its shorter side."""
    with Image.open(path) as img:
        side = 2 * round(image_size * 256 / 224)  # JPEG: decode big photos at a reduced scale, no smaller
        img.draft("RGB", (side, side))
        img = img.convert("RGB")
        if train:
            return TF.pil_to_tensor(TF.resize(img, 2 * image_size) if min(img.size) > 2 * image_size else img)
        return TF.pil_to_tensor(center_view(img, image_size))


def center_view(img, image_size: int):
    """The tutorial's deterministic view: Resize(size*256/224) then CenterCrop(size)."""
    return TF.center_crop(TF.resize(img, round(image_size * 256 / 224)), image_size)


def _decode_or_error(args):
    try:
        return decode(*args)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return e


def load_split(samples: list[tuple[str, int]], image_size: int, train: bool, show_progress: bool,
               strict: bool = False) -> Split:
    """Decode (path, label) pairs, e.g. an ImageFolder's .samples; unreadable files are skipped
    with a warning, or with strict, end the run."""
    split = Split([], [], [])
    # Threads: PIL releases the GIL while decoding and resizing.
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        decoded = pool.map(_decode_or_error, [(path, image_size, train) for path, _ in samples])
        for (path, target), img in tqdm(zip(samples, decoded), total=len(samples), leave=False,
                                        desc=f"decode {'train' if train else 'val'}", disable=not show_progress):
            if isinstance(img, Exception) and strict:
                raise UserError(f"unreadable image {path} ({img}); remove or replace it, or drop "
                                "--strict-images to skip such files")
            if isinstance(img, Exception):
                warnings.warn(f"skipping unreadable image {path}: {img}", stacklevel=1)
                split.skipped.append(path)
            else:
                split.images.append(img)
                split.targets.append(target)
                split.paths.append(path)
    if not split.images:
        raise UserError(f"none of the {len(samples)} files is a readable image "
                        f"({samples[0][0] if samples else 'no files'}, ...); check the files")
    return split


def train_transform(image_size: int):
    return v2.Compose([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()])


def make_loaders(train_set: Dataset, val_set: Dataset, batch_size: int, num_workers: int, seed: int,
                 rank: int, world: int, batchnorm_training: bool = False):
    """Train: shuffled and sharded by DistributedSampler (call set_epoch every epoch). Val: a
    strided shard per process with no padding, so every image is counted exactly once."""
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    # BatchNorm cannot train on a batch of one image: then leave out the odd one (a different one each epoch).
    drop_last = batchnorm_training and len(sampler) % batch_size == 1 and len(sampler) > 1
    train_loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                              drop_last=drop_last, persistent_workers=num_workers > 0,
                              pin_memory=torch.cuda.is_available())
    val_loader = DataLoader(Subset(val_set, range(rank, len(val_set), world)), batch_size=max(batch_size, 32))
    return train_loader, sampler, val_loader


def to_input(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch -> model input on the device: uint8 NCHW images become normalized float, channels_last
    for faster convolutions; anything else (cached features) is moved as it is."""
    if x.dtype != torch.uint8:
        return x.to(device, non_blocking=True)
    x = x.to(device, non_blocking=True).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)
