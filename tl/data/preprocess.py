"""How an image becomes model input: the Preprocess recipe, decoding a file, the train and val views, normalizing.

Decoding gives uint8 tensors: val images resized and center-cropped (deterministic), train images
at most 2x the crop size on their shorter side, so each epoch's RandomResizedCrop+flip is a cheap
tensor op; normalization happens on the device.
"""

import dataclasses
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = {m.value: m for m in (v2.InterpolationMode.BILINEAR, v2.InterpolationMode.BICUBIC,
                                       v2.InterpolationMode.NEAREST)}


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes model input: val resizes its shorter side to `resize` and center-crops
    `crop`; train takes a RandomResizedCrop of `train_crop`; both normalize by mean and std. The
    tutorial's (tutorial()) or the pretrained weights' own (tl.model.network.preprocess_for)."""
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
        """A checkpoint's (tl.runs.checkpoints.Identity): its `preprocessing`, or the tutorial's at its image_size
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


POLICIES = {"randaugment": v2.RandAugment, "trivialaugment": v2.TrivialAugmentWide, "autoaugment": v2.AutoAugment}


def to_pil(image: torch.Tensor) -> Image.Image:
    """A uint8 CHW tensor as a PIL RGB image: its three planes merged in C (to_pil_image's CHW->HWC
    transpose costs six times as long)."""
    h, w = image.shape[-2:]
    planes = image.contiguous().numpy()
    return Image.merge("RGB", [Image.frombuffer("L", (w, h), planes[c], "raw", "L", 0, 1) for c in range(3)])


def train_transform(pre: Preprocess, policy: str | None = None, erasing: float = 0.0):
    """The tutorial's RandomResizedCrop + flip on a uint8 image; then, as timm orders them, an
    augmentation policy (POLICIES, ImageNet's for AutoAugment) and RandomErasing with the mean color
    (zero once normalized). All of it in the loader's workers; the policy runs on PIL's kernels, at
    half the cost of its tensor ones at 224 px (bench/levers.py)."""
    steps = [v2.RandomResizedCrop(pre.train_crop, interpolation=pre.mode, antialias=True), v2.RandomHorizontalFlip()]
    if policy:
        steps += [v2.Lambda(to_pil), POLICIES[policy](), v2.PILToTensor()]  # torchvision's own defaults
    if erasing:
        steps.append(v2.RandomErasing(erasing, value=[round(255 * m) for m in pre.mean]))
    return v2.Compose(steps)


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
