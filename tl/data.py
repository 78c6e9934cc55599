"""Data: fetch and list the ImageFolder set, decode it (once into memory, or every epoch when
streaming), shard it per process.

Decoding gives uint8 tensors: val images resized and center-cropped (deterministic), train images
at most 2x the crop size on their shorter side, so each epoch's RandomResizedCrop+flip is a cheap
tensor op; normalization happens on the device. `memory` keeps every decoded image (hymenoptera:
about 150 MB a process); `stream` decodes in DataLoader workers every epoch, the same pixels.
"""

import dataclasses
import functools
import hashlib
import json
import os
import stat
import struct
import tempfile
import unicodedata
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.datasets.utils import download_url, extract_archive
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from tl.errors import UserError

HYMENOPTERA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"
DEFAULT_DATA_DIR = "data/hymenoptera_data"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = {m.value: m for m in (v2.InterpolationMode.BILINEAR, v2.InterpolationMode.BICUBIC,
                                       v2.InterpolationMode.NEAREST)}


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes model input: val resizes its shorter side to `resize` and center-crops
    `crop`; train takes a RandomResizedCrop of `train_crop`; both normalize by mean and std. The
    tutorial's (tutorial()) or the pretrained weights' own (tl.model.preprocess_for)."""
    crop: int = 224
    resize: int = 256
    train_crop: int = 224
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def tutorial(cls, crop: int = 224, train_crop: int = 0) -> "Preprocess":
        """Resize(crop*256/224) + CenterCrop(crop), bilinear, ImageNet statistics: the tutorial's."""
        return cls(crop, round(crop * 256 / 224), train_crop or crop)

    @classmethod
    def from_meta(cls, meta: dict) -> "Preprocess":
        """A checkpoint's (tl.checkpoint.Identity): its `preprocessing`, or the tutorial's at its image_size
        for runs saved before tl recorded one."""
        saved = meta.get("preprocessing") or {}
        if not saved:
            return cls.tutorial(meta["image_size"], meta.get("recipe", {}).get("train_size", 0))
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})

    def meta(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @property
    def mode(self) -> v2.InterpolationMode:
        return INTERPOLATIONS[self.interpolation]


TUTORIAL = Preprocess()  # at 224 px


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
    """A decoded split as a Dataset. The transform's randomness comes from (seed, epoch, index) alone,
    so image i's crop and flip at epoch e are the same with 0 or N workers, in any worker order, and
    after a resume; call set_epoch before each epoch's pass."""

    def __init__(self, split: Split, transform=None, seed: int = 0):
        self.split, self.transform, self.seed, self.epoch = split, transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.split.images)

    def __getitem__(self, i):
        if i < 0:  # ShardSampler's repeat of image -1 - i: the same pixels, a label the loss ignores
            return self[-1 - i][0], PAD
        x = self.split.images[i]
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):  # the caller's RNG stays as it was
                # The CPU generator only: torch.manual_seed would also reseed (and leave reseeded) the GPUs'.
                torch.default_generator.manual_seed(item_seed(self.seed, self.epoch, int(i)))
                x = self.transform(x)
        return x, self.split.targets[i]


def item_seed(seed: int, epoch: int, i: int) -> int:
    """A 64-bit seed for one image at one epoch; hashed, so nearby (seed, epoch, i) never share streams."""
    return int.from_bytes(hashlib.sha256(f"{seed} {epoch} {i}".encode()).digest()[:8], "little")


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
    # The same file in two splits, by identity: a link or a hard link to a train image counts.
    train_files = {key: path for path, _, key, _ in found["train"]}
    for split in [s for s in found if s != "train"]:
        shared = [(path, train_files[key]) for path, _, key, _ in found[split] if key in train_files]
        if warn and shared:
            warnings.warn(f"{len(shared)} {split} images are also train images (e.g. {shared[0][0]} is "
                          f"{shared[0][1]}); {split} accuracy will be optimistic", stacklevel=2)
    # A split-out val counts as val: the split is part of the set's identity. No test/, no test rows.
    rows = [(split, *row) for split, files in found.items() for *_, row in files]
    digest = hashlib.sha256(json.dumps(sorted(rows)).encode()).hexdigest()
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


def decode(path: str, pre: Preprocess, train: bool) -> torch.Tensor:
    """Decode one file to uint8 RGB: val as center_view, train shrunk to at most 2x the larger of the
    train and val crops on its shorter side (the feature cache takes its center view of them)."""
    with Image.open(path) as img:
        keep = max(pre.crop, pre.train_crop)
        side = 2 * (max(pre.resize, round(keep * 256 / 224)) if train else pre.resize)
        img.draft("RGB", (side, side))  # JPEG: decode big photos at a reduced scale, no smaller than this
        img = img.convert("RGB")
        if train:
            return TF.pil_to_tensor(TF.resize(img, 2 * keep) if min(img.size) > 2 * keep else img)
        return TF.pil_to_tensor(center_view(img, pre))


def center_view(img, pre: Preprocess):
    """The deterministic view (val, test, the feature cache): Resize(pre.resize) then CenterCrop(pre.crop)."""
    return TF.center_crop(TF.resize(img, pre.resize, interpolation=pre.mode, antialias=True), pre.crop)


def _decode_or_error(path: str, pre: Preprocess, train: bool):
    try:
        return decode(path, pre, train)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return e


def _read_all(samples: list[tuple[str, int]], read, verb: str, train: bool, main: bool, strict: bool,
              threads: bool = True) -> Split:
    """read(path) for every (path, label), in threads (PIL releases the GIL; without `threads` when a
    read is too short to pay for a thread hand-off), kept in order: a result,
    or the exception that makes a file unreadable: skipped with a warning, or with strict, the end of
    the run. Only the main process shows progress and warnings."""
    split = Split([], [], [])
    pool = ThreadPoolExecutor(max_workers=usable_cpus())
    try:
        results = (pool.map if threads else map)(read, [path for path, _ in samples])
        for (path, target), result in tqdm(zip(samples, results), total=len(samples), leave=False,
                                           desc=f"{verb} {'train' if train else 'val'}", disable=not main):
            if isinstance(result, Exception) and strict:
                raise UserError(f"unreadable image {path} ({result}); remove or replace it, or drop "
                                "--strict-images to skip such files")
            if isinstance(result, Exception):
                if main:
                    warnings.warn(f"skipping unreadable image {path}: {result}", stacklevel=1)
                split.skipped.append(path)
            else:
                split.images.append(result)
                split.targets.append(target)
                split.paths.append(path)
    except BaseException:
        # A stop signal (its handler raises here) or an error: drop the queued work at once
        # instead of waiting for the whole set.
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    if not split.images:
        raise UserError(f"none of the {len(samples)} files is a readable image "
                        f"({samples[0][0] if samples else 'no files'}, ...); check the files")
    return split


def load_split(samples: list[tuple[str, int]], pre: Preprocess, train: bool, main: bool,
               strict: bool = False) -> Split:
    """Decode (path, label) pairs, e.g. a Listing's train, into memory; unreadable files are skipped
    with a warning, or with strict, end the run."""
    return _read_all(samples, lambda path: _decode_or_error(path, pre, train), "decode", train, main, strict)


class LazyImages:
    """A split's images decoded on access (in DataLoader workers): memory does not grow with the set.
    Decoding is tl.data.decode, exactly as the memory path's, so both give the same pixels."""

    def __init__(self, paths: list[str], pre: Preprocess, train: bool):
        self.paths, self.pre, self.train = paths, pre, train

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return decode(self.paths[i], self.pre, self.train)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise UserError(f"unreadable image {self.paths[i]} while streaming ({e}); replace it or remove it and "
                            "start the run afresh (a resume refuses a changed data set); --data-mode memory and "
                            "python -m tl.pack decode every image before training and skip such files") from None


def _signature_or_error(path: str):
    """Stream mode's start-up check of one file, a few microseconds: its first bytes name a format
    Pillow reads (Pillow's own signature tests). Damage past them stops the run when a worker meets it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # never blocks, even on a FIFO swapped in since the listing
        try:
            head = os.read(fd, 16)
        finally:
            os.close(fd)
    except OSError as e:
        return e
    if not head:
        return ValueError("an empty file")
    for accept in _signatures():
        try:
            if accept(head):
                return True
        except (struct.error, IndexError, ValueError):  # a signature test that needs more bytes than a tiny file has
            pass
    return ValueError(f"its first bytes {head[:8]!r} match no image format")


@functools.cache
def _signatures() -> list:
    Image.init()
    ids = sorted(Image.ID, key=lambda i: i not in ("JPEG", "PNG"))  # the usual ones first
    return [Image.OPEN[i][1] for i in ids if Image.OPEN[i][1]]


def stream_split(samples: list[tuple[str, int]], pre: Preprocess, train: bool, main: bool,
                 strict: bool = False) -> Split:
    """Like load_split, but only each file's signature is checked now; the pixels are decoded every
    epoch by whoever indexes the split (DataLoader workers)."""
    checked = _read_all(samples, _signature_or_error, "check", train, main, strict, threads=False)
    checked.images = LazyImages(checked.paths, pre, train)
    return checked


def decoded_bytes(listing: Listing, pre: Preprocess) -> int:
    """An upper bound on the memory path's decoded pixels: train images with the shorter side at
    2x the crop (4:3), val and test at the crop."""
    side = 2 * max(pre.crop, pre.train_crop)
    return len(listing.train) * side * side * 4 // 3 * 3 + (len(listing.val) + len(listing.test)) * pre.crop ** 2 * 3


def available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def choose_data_mode(requested: str, listing: Listing, pre: Preprocess, processes_on_node: int) -> tuple[str, str]:
    """memory (decode once, keep it: fastest when it fits) or stream (decode every epoch in workers);
    auto picks memory while every process's copy fits in half the available memory. Returns the
    mode and why, for the run to say."""
    need, free = decoded_bytes(listing, pre), available_memory()
    why = (f"at most {need / 2**30:.2f} GiB of decoded images per process, {processes_on_node} process(es) on "
           f"this node, {free / 2**30:.1f} GiB available")
    if requested != "auto":
        return requested, f"--data-mode {requested}; {why}"
    return ("memory" if need * processes_on_node <= free // 2 else "stream"), f"auto: {why}"


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what SLURM or taskset lets this process use
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def train_transform(pre: Preprocess):
    return v2.Compose([v2.RandomResizedCrop(pre.train_crop, interpolation=pre.mode, antialias=True),
                       v2.RandomHorizontalFlip()])


PAD = -100  # the label of a repeated image: F.cross_entropy's default ignore_index, never counted


class ShardSampler(DistributedSampler):
    """DistributedSampler (shuffled, every process the same number of images, so the same number of
    steps) whose padding is marked: a repeated image comes as index -1 - i, which datasets return
    with the PAD label, so an epoch trains on and counts each image exactly once at any world size."""

    def __iter__(self):
        n, world = len(self.dataset), self.num_replicas
        return iter(i if self.rank + k * world < n else -1 - i for k, i in enumerate(super().__iter__()))


def make_loaders(train_set: Dataset, val_set: Dataset, batch_size: int, num_workers: int, seed: int,
                 rank: int, world: int, batchnorm_training: bool = False, collate_fn=None):
    """Train: shuffled and sharded by DistributedSampler (call set_epoch on it and on an ImageSet
    every epoch). Val: a strided shard per process with no padding, so every image counts once."""
    sampler = ShardSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    # BatchNorm cannot train on a batch of one image: then leave out the odd one (a different one each epoch).
    drop_last = batchnorm_training and len(sampler) % batch_size == 1 and len(sampler) > 1
    # No persistent workers: fresh ones each epoch get the dataset's new epoch (set_epoch).
    train_loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                              drop_last=drop_last, pin_memory=torch.cuda.is_available(), collate_fn=collate_fn)
    return train_loader, sampler, eval_loader(val_set, max(batch_size, 32), num_workers, rank, world)


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, rank: int, world: int) -> DataLoader:
    """This process's strided shard of a set to evaluate (tl.eval.gather_in_order): no padding."""
    return DataLoader(Subset(dataset, range(rank, len(dataset), world)), batch_size=batch_size,
                      num_workers=num_workers)


def skip_batches(loader: DataLoader, sampler, batches: int) -> DataLoader:
    """The same epoch's loader without its first `batches` batches (a resume inside an epoch): the
    sampler's order for the epoch and the per-image seeds make the rest exactly what it would be."""
    indices = list(sampler)[batches * loader.batch_size:]
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=indices, num_workers=loader.num_workers,
                      drop_last=loader.drop_last, pin_memory=loader.pin_memory, collate_fn=loader.collate_fn)


def to_input(x: torch.Tensor, device: torch.device, pre: Preprocess = TUTORIAL) -> torch.Tensor:
    """A batch -> model input on the device: uint8 NCHW images become float normalized by pre's mean
    and std, channels_last for faster convolutions; anything else (cached features) is moved as it is."""
    if x.dtype != torch.uint8:
        return x.to(device, non_blocking=True)
    key = (torch.device(device), pre.mean, pre.std)
    if key not in _NORMALIZE:  # once per device: two host-to-device copies per batch add up
        _NORMALIZE[key] = tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (pre.mean, pre.std))
    mean, std = _NORMALIZE[key]
    x = x.to(device, non_blocking=True).float().div_(255)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


_NORMALIZE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
