"""Every option of a run: one dataclass, its command line, and the checks on it."""

import argparse
import dataclasses
from dataclasses import dataclass, field

from tl.errors import UserError
from tl.tracking import WANDB_MODES

MODES = ("finetune", "feature-extract")
# On --resume every option is honoured exactly or refused. These go into the run's Identity and
# must equal the saved run's (with the data's fingerprint, the classes and the resolved precision
# and process count); the others may change: the data may move, more epochs may follow, W&B and
# the worker count do not change the numbers.
IDENTITY = ("model", "mode", "weights", "image_size", "seed")
RECIPE = ("batch_size", "lr", "momentum", "step_size", "gamma", "train_size", "feature_cache", "compile", "augment")
RESUME_FREE = ("data_dir", "data_zip", "data_mode", "save_every", "epochs", "strict_images", "precision", "output_dir",
               "resume", "overwrite", "wandb", "wandb_project", "wandb_entity", "wandb_name", "wandb_log_model",
               "num_workers")
PRECISIONS = ("auto", "no", "bf16", "fp16")


def _opt(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    mode: str = _opt("finetune", "finetune: train every layer; feature-extract: freeze the "
                     "backbone, train only the new final layer", choices=MODES)
    data_dir: str = _opt("data/hymenoptera_data", "an ImageFolder root holding train/ and val/ with the same "
                         "class folders (the tutorial's set is downloaded there if missing), or a packed set "
                         "(python -m tl.pack)")
    data_zip: str | None = _opt(None, "local zip of the data set, extracted next to --data-dir "
                                "when that is missing (for machines without internet)")
    model: str = _opt("resnet18", "any torchvision classification model name")
    weights: str = _opt("DEFAULT", "torchvision weights name (DEFAULT, IMAGENET1K_V1, ...), "
                        "'none' for random init, or a path to a local .pth/.safetensors state dict")
    epochs: int = _opt(25, "number of epochs")
    batch_size: int = _opt(4, "images per batch on each process")
    lr: float = _opt(0.001, "SGD learning rate")
    momentum: float = _opt(0.9, "SGD momentum")
    step_size: int = _opt(7, "StepLR: decay the learning rate every this many epochs")
    gamma: float = _opt(0.1, "StepLR: multiply the learning rate by this at each step")
    feature_cache: str = _opt("on", "feature-extract only: on computes the frozen backbone's features once "
                              "(train images in the val view, so without augmentation) and trains the head on "
                              "them; off runs the backbone on augmented images every epoch, as the tutorial",
                              choices=("on", "off"))
    strict_images: bool = _opt(False, "stop at the first unreadable image instead of skipping it with a warning")
    image_size: int = _opt(224, "crop size for training and validation (val resizes to "
                           "size*256/224 first, as the tutorial does)")
    train_size: int = _opt(0, "crop size for training only (RandomResizedCrop); 0: --image-size. Smaller "
                           "trains faster, about (train-size/image-size)^2 of the compute, and validation "
                           "stays at --image-size; check the accuracy (see the README's Speed section)")
    precision: str = _opt("auto", "mixed precision; auto: the accelerate config's choice, else "
                          "bf16 where the GPU or CPU supports it, else fp32", choices=PRECISIONS)
    augment: str = _opt("auto", "where train images are cropped, flipped and normalized: cpu (image by image, in the "
                        "loader), device (batched on the GPU: one roi_align crop-resize, same crop distribution); "
                        "auto: device on CUDA, else cpu", choices=("auto", "cpu", "device"))
    save_every: float = _opt(0.0, "also save the training state inside an epoch every this many minutes (0: at "
                             "the end of each epoch only); a stop signal always saves at the step where it stops")
    compile: bool = _opt(False, "torch.compile what trains: on GPUs faster once compiled (a minute or so), on "
                         "CPUs rarely worth the wait; compiled kernels round differently, so a resume keeps the choice")
    output_dir: str | None = _opt(None, "where the run's files go; default: runs/<mode>-<time>")
    resume: bool = _opt(False, "continue the run in --output-dir from its last completed epoch")
    overwrite: bool = _opt(False, "start afresh in an --output-dir that holds another run; its files "
                           "are deleted once the new run has saved its first epoch")
    wandb: str = _opt("auto", "Weights & Biases: auto is online when W&B is configured (WANDB_API_KEY or "
                      "`wandb login`), else offline; WANDB_MODE also works", choices=WANDB_MODES)
    wandb_project: str = _opt("tl", "W&B project")
    wandb_entity: str | None = _opt(None, "W&B entity (user or team); default: your account's own")
    wandb_name: str | None = _opt(None, "W&B run name (default: the output dir's name)")
    wandb_log_model: bool = _opt(False, "upload best.safetensors to W&B as a model artifact")
    seed: int = _opt(0, "random seed: head init, data order and augmentation")
    data_mode: str = _opt("auto", "memory: decode every image once at start-up and keep it (fastest when it "
                          "fits); stream: check each file's signature at start-up, decode every epoch in DataLoader "
                          "workers, memory independent of the set's size; auto: memory while each process's copy fits "
                          "in half the available memory. Both give the same results",
                          choices=("auto", "memory", "stream"))
    num_workers: int = _opt(-1, "DataLoader worker processes; -1: none in memory mode, in stream mode the cores "
                            "this process may use shared among the node's processes; results do not depend on it")

    def recipe(self) -> dict:
        """The options besides the run's identity that change its numbers: a resume must keep them."""
        return {name: getattr(self, name) for name in RECIPE}

    def validate(self) -> "Config":
        for name in ("epochs", "batch_size", "step_size", "image_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got "
                                f"{getattr(self, name)}")
        for name in ("lr", "gamma"):
            if not getattr(self, name) > 0:
                raise UserError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other; pass one of them")
        if self.output_dir is not None and not self.output_dir.strip():
            raise UserError("--output-dir is empty; pass a directory name, or leave it out for runs/<mode>-<time>")
        if self.resume and not self.output_dir:
            raise UserError("--resume needs --output-dir naming the run to continue")
        if self.train_size < 0:
            raise UserError(f"--train-size must be positive, or 0 for --image-size, got {self.train_size}")
        if self.save_every < 0:
            raise UserError(f"--save-every must be 0 (off) or a number of minutes, got {self.save_every}")
        if self.num_workers < -1:
            raise UserError(f"--num-workers must be 0 or more, or -1 for the default, got {self.num_workers}")
        return self


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # a default only where it says something
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like every other user mistake
        raise UserError(f"{message} (see --help)")


def parse_args(argv=None) -> Config:
    parser = _Parser(description="Transfer learning for a torchvision classifier on an "
                     "ImageFolder data set.", formatter_class=_Formatter)
    for f in dataclasses.fields(Config):
        flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.type is bool:
            parser.add_argument(flag, action="store_true", help=help)
        else:
            kind = f.type if f.type in (int, float) else str
            parser.add_argument(flag, type=kind, default=f.default, help=help,
                                choices=f.metadata.get("choices"))
    return Config(**vars(parser.parse_args(argv))).validate()
