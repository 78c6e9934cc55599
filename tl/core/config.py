"""Every option of a run: one dataclass, its command line, and the checks on it."""

import argparse
import dataclasses
import difflib
import json
import math
import re
import types
from dataclasses import dataclass, field
from pathlib import Path

from tl.core.cli import Parser, Range
from tl.core.errors import UserError

MODES = ("finetune", "feature-extract", "lora")
# On --resume every option is honoured exactly or refused. These go into the run's Identity and
# must equal the saved run's (with the data's fingerprint, the classes and the resolved precision
# and process count); the others may change: the data may move, more epochs may follow, W&B and
# the worker count do not change the numbers.
IDENTITY = ("model", "mode", "weights", "image_size", "seed")
RECIPE = ("batch_size", "lr", "momentum", "step_size", "gamma", "train_size", "feature_cache", "compile", "augment",
          "val_split", "optimizer", "weight_decay", "schedule", "warmup_epochs", "label_smoothing", "freeze_epochs",
          "backbone_lr_scale", "preprocess")
# Recipe options newer than the checkpoint format: in a run's recipe only when not at their default, so
# a run that does not use them saves what it saved before, and a saved run without them resumes.
RECIPE_EXTRAS = ("random_erasing", "mixup", "cutmix", "ema", "class_weights", "sampler", "tta", "calibrate",
                 "accumulate", "grad_checkpointing", "layer_decay", "lora_rank", "lora_alpha", "lora_targets",
                 "shard_model")
LORA = ("lora_rank", "lora_alpha", "lora_targets")  # --mode lora's options: in a lora run's recipe always
POLICIES = ("randaugment", "trivialaugment", "autoaugment")  # --augment: torchvision v2's, in the loader

# The values each numeric option takes, checked by Config.validate (command line and config file alike).
POSITIVE = Range(0, above=True)
AT_LEAST_0 = Range(0)
RANGES = {
    "epochs": POSITIVE, "batch_size": POSITIVE, "step_size": POSITIVE,
    "lr": POSITIVE, "gamma": POSITIVE, "backbone_lr_scale": POSITIVE,
    "momentum": Range(0, 1, below=True, says="must be at least 0 and below 1 (the tutorial's is 0.9)"),
    "seed": Range(0, 2**32, below=True, says="must be from 0 to 2**32 - 1"),
    "image_size": Range(0, says="must be positive, or 0 for the --preprocess one's"),
    "train_size": Range(0, says="must be positive, or 0 for --image-size"),
    "save_every": Range(0, says="must be 0 (off) or a number of minutes"),
    "patience": Range(0, says="must be 0 (off) or a number of epochs"),
    "val_split": Range(0, 1, below=True, says="must be a fraction from 0 (off) to below 1, e.g. 0.2"),
    "weight_decay": AT_LEAST_0, "warmup_epochs": AT_LEAST_0, "freeze_epochs": AT_LEAST_0,
    "label_smoothing": Range(0, 1, below=True, says="must be at least 0 and below 1"),
    "random_erasing": Range(0, 1, says="is a probability from 0 (off) to 1"),
    "mixup": Range(0, says="is a Beta distribution's alpha: 0 (off) or more, e.g. 0.8"),
    "cutmix": Range(0, says="is a Beta distribution's alpha: 0 (off) or more, e.g. 0.8"),
    "ema": Range(0, 1, below=True, says="is a decay per step above 0 and below 1, e.g. 0.999, or 0 (off)"),
    "num_workers": Range(-1, says="must be 0 or more, or -1 for the default"),
    "accumulate": Range(1, says="must be 1 (off) or more micro-batches per optimizer step"),
    "layer_decay": Range(0, 1, above=True, says="must be above 0 and at most 1 (off), e.g. 0.75"),
    "lora_rank": Range(1, says="must be 1 or more (the adapters' inner dimension, e.g. 8 or 16)"),
    "lora_alpha": Range(0, above=True, says="must be above 0 (the adapters' scale is alpha / rank), e.g. 16"),
}
RESUME_FREE = ("data_dir", "data_zip", "data_file", "data_root", "data_mode", "save_every", "epochs", "strict_images",
               "precision", "output_dir",
               "resume", "overwrite", "wandb", "wandb_project", "wandb_entity", "wandb_name", "wandb_group",
               "wandb_log_model",
               "num_workers", "patience")
PRECISIONS = ("auto", "no", "bf16", "fp16")
WANDB_MODES = ("auto", "online", "offline", "disabled")
# What a run's config.json holds besides the options (tl.train.loop.train writes them): --config skips them.
RECORDED = ("classes", "base_weights", "head", "data", "recipe", "preprocessing", "mixed_precision", "num_processes",
            "device", "param_groups", "tl_version", "tl_commit", "versions", "data_files", "data_sample", "slurm")
# Where a run goes and whether it continues: said by each command, not kept in a file. A run's
# config.json records them (resume: true after a resume), and a re-run from it must not resume it.
ACTIONS = ("output_dir", "resume", "overwrite")


def _opt(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    mode: str = _opt("finetune", "finetune: train every layer; feature-extract: freeze the backbone, train only the "
                     "new final layer; lora: freeze the backbone, train low-rank adapters in its layers (peft's "
                     "LoRA, see --lora-rank; it wants a larger --lr, e.g. 0.01) and the new final layer",
                     choices=MODES)
    data_dir: str = _opt("data/hymenoptera_data", "an ImageFolder root holding train/ and val/ with the same "
                         "class folders (the tutorial's set is downloaded there if missing), or a packed set "
                         "(python -m tl.pack)")
    data_zip: str | None = _opt(None, "local zip of the data set, extracted next to --data-dir "
                                "when that is missing (for machines without internet)")
    data_file: str | None = _opt(None, "instead of --data-dir's class folders: a label file, a CSV with the columns "
                                 "path,label[,split] or a JSONL of such objects (split: train, val or test; without "
                                 "it pass --val-split); see docs/label-files.md")
    data_root: str | None = _opt(None, "the folder a --data-file's relative paths start from; default: the label "
                                 "file's folder")
    model: str = _opt("resnet18", "any torchvision classification model name, or timm/NAME for a timm model "
                      "(pip install -e '.[timm]'; NAME may carry a pretrained tag, e.g. timm/resnet18.a1_in1k)")
    weights: str = _opt("DEFAULT", "torchvision weights name (DEFAULT, IMAGENET1K_V1, ...), "
                        "'none' for random init, or a path to a local .pth/.safetensors state dict")
    epochs: int = _opt(25, "number of epochs")
    # Like --epochs it only decides whether more epochs run, never what an epoch computes: free on a resume.
    patience: int = _opt(0, "stop early when val accuracy has not improved for this many epochs (0: off); the "
                         "best epoch's weights are kept as always")
    batch_size: int = _opt(4, "images per batch on each process")
    lr: float = _opt(0.001, "learning rate (of the new head, see --backbone-lr-scale)")
    momentum: float = _opt(0.9, "SGD momentum (--optimizer sgd)")
    step_size: int = _opt(7, "StepLR: decay the learning rate every this many epochs")
    gamma: float = _opt(0.1, "StepLR: multiply the learning rate by this at each step")
    optimizer: str = _opt("sgd", "sgd (with --momentum: the tutorial's) or adamw (decoupled weight decay)",
                          choices=("sgd", "adamw"))
    weight_decay: float = _opt(0.0, "weight decay of the weights (not of biases and normalization parameters); "
                               "0: none, as the tutorial; AdamW recipes use about 0.05")
    schedule: str = _opt("step", "learning rate per epoch: step (StepLR with --step-size and --gamma: the "
                         "tutorial's) or cosine (from --lr down to 0 at the last of --epochs)",
                         choices=("step", "cosine"))
    warmup_epochs: int = _opt(0, "before the schedule, raise the learning rate linearly over this many epochs "
                              "(from 1/(N+1) of it)")
    label_smoothing: float = _opt(0.0, "cross-entropy label smoothing for training (timm uses 0.1); val loss "
                                  "stays plain")
    freeze_epochs: int = _opt(0, "finetune: for the first N epochs train only the new head, the backbone frozen "
                              "as in feature-extract (BatchNorm included), then train everything")
    backbone_lr_scale: float = _opt(1.0, "finetune: the pretrained layers' learning rate as a multiple of --lr "
                                    "(the new head's), e.g. 0.1")
    feature_cache: str = _opt("on", "feature-extract only: on computes the frozen backbone's features once "
                              "(train images in the val view, so without augmentation) and trains the head on "
                              "them; off runs the backbone on augmented images every epoch, as the tutorial",
                              choices=("on", "off"))
    val_split: float = _opt(0.0, "without a val/ folder: hold out this fraction of each class's train/ images as "
                            "val (0: off; at least one image a class), the same images for every --seed and "
                            "machine; python -m tl.predict --val-of DATA_DIR predicts them")
    strict_images: str = _opt("auto", "on: stop at the first unreadable image, naming it; off: skip such images "
                              "with a warning and count them in summary.json; auto: on for a --data-file (each of "
                              "its rows claims an image), off for class folders. --strict-images alone means on",
                              choices=("auto", "on", "off"), const="on")
    image_size: int = _opt(0, "crop size for training and validation; 0: the --preprocess one's (224 for tutorial). "
                           "Val resizes first, to size*256/224 (tutorial) or in the weights' own ratio")
    preprocess: str = _opt("tutorial", "tutorial: ImageNet mean/std, bilinear, val Resize(256)+CenterCrop(224); "
                           "weights: the pretrained weights' own (torchvision's weights.transforms(), timm's data "
                           "config): crop and resize sizes, interpolation, mean and std. A local --weights file "
                           "has them when named as torchvision downloads it, else ImageNet's are used, with a note",
                           choices=("tutorial", "weights"))
    train_size: int = _opt(0, "crop size for training only (RandomResizedCrop); 0: --image-size. Smaller "
                           "trains faster, about (train-size/image-size)^2 of the compute, and validation "
                           "stays at --image-size; check the accuracy (see docs/speed.md)")
    precision: str = _opt("auto", "mixed precision; auto: the accelerate config's choice, else "
                          "bf16 where the GPU or CPU supports it, else fp32", choices=PRECISIONS)
    augment: str = _opt("auto", "train augmentation: the tutorial's crop and flip, where they run: cpu (image by "
                        "image, in the loader), device (batched on the GPU: one roi_align crop-resize, same crop "
                        "distribution), auto (device on CUDA, else cpu); or crop, flip and then a policy of "
                        "torchvision's, image by image in the loader: randaugment, trivialaugment, autoaugment "
                        "(ImageNet's)", choices=("auto", "cpu", "device", *POLICIES))
    random_erasing: float = _opt(0.0, "after the crop, flip and policy, erase a random rectangle of each train image "
                                 "with this probability (torchvision's RandomErasing, filled with the mean color; "
                                 "timm uses 0.25); 0: off")
    mixup: float = _opt(0.0, "mix each train batch with itself rolled by one (torchvision's MixUp) with this Beta "
                        "alpha (timm uses 0.8), training on the mixed soft targets; 0: off. train_acc then counts "
                        "agreement with each image's larger share")
    cutmix: float = _opt(0.0, "paste a box of the rolled batch into each train image (torchvision's CutMix) with this "
                         "Beta alpha (timm uses 1.0); with --mixup as well, each batch takes one of the two at "
                         "random; 0: off")
    ema: float = _opt(0.0, "keep an exponential moving average of the trained weights with this decay per step "
                      "(e.g. 0.999), evaluated each epoch beside them; the best epoch keeps whichever scores higher "
                      "(best.safetensors says which); feature-extract averages only the head. 0: off")
    class_weights: str = _opt("none", "auto: weigh each class in the training loss by the inverse of its share of "
                              "the train images (N / (classes * count)); none: every image alike",
                              choices=("none", "auto"))
    sampler: str = _opt("shuffle", "shuffle: every train image once an epoch; balanced: as many draws, with "
                        "replacement, each class equally likely (the same order at any world size and on resume)",
                        choices=("shuffle", "balanced"))
    tta: str = _opt("none", "test-time augmentation of the final evaluation (the best epoch on val and test), "
                    "tl.predict and tl.export: flip averages the probabilities of each image and its mirror "
                    "image; crops those and of its four corner crops of 7/8 the side, resized back (6 views); "
                    "reported beside the plain figures", choices=("none", "flip", "crops"))
    calibrate: bool = _opt(False, "after training, fit a temperature to the best epoch's val logits (temperature "
                           "scaling); summary.json gets the expected calibration error before and after, "
                           "reliability.png the diagram, and tl.predict and tl.export output calibrated "
                           "probabilities")
    layer_decay: float = _opt(1.0, "finetune: layer-wise learning-rate decay, each layer's learning rate "
                              "--lr x D^(its depth below the head) (timm's --layer-decay; 1: off); layers from "
                              "timm's group_matcher, else a torchvision model's blocks in order")
    accumulate: int = _opt(1, "gradient accumulation: this many micro-batches of --batch-size per optimizer step "
                           "(an effective batch N times larger in the same memory; under DDP no all-reduce on the "
                           "first N-1); the learning-rate schedule counts epochs, as without")
    grad_checkpointing: bool = _opt(False, "activation checkpointing: keep only the blocks' inputs in the forward "
                                    "pass and recompute the rest in the backward pass (less memory, more time; the "
                                    "same loss and gradients); timm's set_grad_checkpointing, torch.utils.checkpoint "
                                    "over a torchvision model's blocks")
    shard_model: bool = _opt(False, "shard parameters, gradients and optimizer state over the processes (PyTorch's "
                             "FSDP2, a shard unit per block) instead of a whole copy on each (DDP): for models "
                             "larger than one device's memory; the training state is saved sharded (DCP) and "
                             "resumes at any number of processes (see docs/large-models.md)")
    lora_rank: int = _opt(8, "--mode lora: the adapters' rank r (each adapted layer's weight W gets W + "
                          "alpha/r * B A, with A r x in and B out x r)")
    lora_alpha: float = _opt(16.0, "--mode lora: the adapters' scale numerator alpha (scale alpha / rank)")
    lora_targets: str = _opt("", "--mode lora: the layers to adapt, comma-separated: a layer's name, its last parts "
                             "(qkv, attn.proj, conv2) or a regular expression over full names; default: every "
                             "linear and convolution layer (attention too) inside the model's blocks")
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
    wandb_group: str | None = _opt(None, "W&B group of the run (python -m tl.sweep puts a sweep's runs in one "
                                   "group named after it)")
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
        """The options besides the run's identity that change its numbers: a resume must keep them
        (and --epochs under the cosine schedule, which spans them)."""
        cosine = {"epochs": self.epochs} if self.schedule == "cosine" else {}
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        extras = {name: getattr(self, name) for name in RECIPE_EXTRAS
                  if getattr(self, name) != defaults[name] or (self.mode == "lora" and name in LORA)}
        return {name: getattr(self, name) for name in RECIPE} | cosine | extras

    def strict(self) -> bool:
        """Whether an unreadable image ends the run (--strict-images)."""
        return self.strict_images == "on" or (self.strict_images == "auto" and self.data_file is not None)

    def validate(self, named=None, given=frozenset()) -> "Config":
        """Every check of the options; named(option) says where a value came from ("--data-root", or
        "data_root in c.yaml" for a config file's), for the checks between options; given: the options the
        command line or a config file gave (not left at their defaults)."""
        named = named or (lambda name: "--" + name.replace("_", "-"))
        for f in dataclasses.fields(self):
            if f.type is float and not math.isfinite(getattr(self, f.name)):
                raise UserError(f"--{f.name.replace('_', '-')} must be a finite number, got {getattr(self, f.name)}")
        for name, allowed in RANGES.items():
            if not allowed.holds(getattr(self, name)):
                raise UserError(f"--{name.replace('_', '-')} {allowed.message(getattr(self, name))}")
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other; pass one of them")
        if self.output_dir is not None and not self.output_dir.strip():
            raise UserError("--output-dir is empty; pass a directory name, or leave it out for runs/<mode>-<time>")
        if self.resume and not self.output_dir:
            raise UserError("--resume needs --output-dir naming the run to continue")
        if self.mode == "feature-extract" and (self.freeze_epochs or self.backbone_lr_scale != 1 or
                                               self.layer_decay != 1):
            flag = "--freeze-epochs" if self.freeze_epochs else "--backbone-lr-scale" if self.backbone_lr_scale != 1 \
                else "--layer-decay"
            raise UserError(f"{flag} is for --mode finetune; feature-extract keeps the backbone frozen throughout")
        if self.mode == "lora" and self.freeze_epochs:
            raise UserError("--freeze-epochs is for --mode finetune; lora's adapters start as no change to the base "
                            "(their B is 0), so the first epochs already train the head on the base's features")
        if self.mode == "lora" and self.feature_cache == "on" and "feature_cache" in given:
            raise UserError("--feature-cache on: lora trains adapters inside the backbone, so its features change "
                            "every step and cannot be computed once; drop --feature-cache")
        if self.mode != "lora" and any(getattr(self, name) != Config.__dataclass_fields__[name].default
                                       for name in LORA):
            name = next(n for n in LORA if getattr(self, n) != Config.__dataclass_fields__[n].default)
            raise UserError(f"{named(name)} is for --mode lora; add --mode lora or drop it")
        if self.shard_model and self.mode == "feature-extract" and self.feature_cache == "on":
            raise UserError("--shard-model: feature-extract on the feature cache trains only the head, on features "
                            "computed once, and has nothing to shard; drop --shard-model, or add --feature-cache off")
        if self.shard_model and self.compile:
            raise UserError("--compile with --shard-model is not supported: tl shards the model itself and does not "
                            "compile a sharded one; drop --compile")
        if self.shard_model and self.ema:
            raise UserError("--ema keeps a whole copy of the model on each process, which --shard-model is there to "
                            "avoid; drop one of them")
        if self.schedule == "cosine" and self.warmup_epochs >= self.epochs:
            raise UserError(f"--warmup-epochs {self.warmup_epochs} leaves no epoch of the cosine schedule in "
                            f"--epochs {self.epochs}; warm up for fewer epochs")
        images = not (self.mode == "feature-extract" and self.feature_cache == "on")
        for name, on in (("--augment " + self.augment, self.augment in POLICIES),
                         ("--random-erasing", self.random_erasing > 0), ("--mixup", self.mixup > 0),
                         ("--cutmix", self.cutmix > 0)):
            if on and not images:
                raise UserError(f"{name} changes train images, but feature-extract with the feature cache trains on "
                                "features computed once from unaugmented images; add --feature-cache off")
        if self.random_erasing and self.augment == "device":
            raise UserError("--random-erasing works image by image in the loader; drop --augment device (or pass "
                            "--augment cpu)")
        if self.data_root and not self.data_file:
            raise UserError(f"{named('data_root')} is where a --data-file's paths start from; pass --data-file too, "
                            f"or drop {named('data_root')}")
        if self.data_file and (self.data_zip or self.data_dir != Config.data_dir):
            flag = named("data_zip" if self.data_zip else "data_dir")
            raise UserError(f"{flag} and {named('data_file')} both name the data set; pass one of them (a label "
                            "file's paths start from --data-root)")
        return self


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # a default only where it says something
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Duplicate(ValueError):
    def __init__(self, key, lines):
        super().__init__(key)
        self.key, self.lines = key, lines


def _json_pairs(text: str):
    """json.loads' object_pairs_hook: a key given twice in one object is a mistake, not the last one winning."""
    def hook(pairs):
        keys = [k for k, _ in pairs]
        for key in keys:
            if keys.count(key) > 1:
                lines = [text.count("\n", 0, m.start()) + 1 for m in re.finditer(rf'"{re.escape(key)}"\s*:', text)]
                raise _Duplicate(key, lines)
        return dict(pairs)
    return hook


def _yaml_loader():
    """yaml's SafeLoader, but meaning what was written: a key given twice is a mistake, and only true/false are
    booleans (YAML 1.2; YAML 1.1 also reads on/off/yes/no as booleans, so `strict_images: off` became false)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise _Duplicate(key, [seen[key], line])
                seen[key] = line
            return super().construct_mapping(node, deep)

    bool_tag = "tag:yaml.org,2002:bool"
    Loader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag != bool_tag]
                                      for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver(bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
    return Loader


def read_mapping(path: str, what: str = "--config") -> dict:
    """A YAML or JSON file holding one mapping (JSON first: YAML 1.1 would read JSON's 1e-05 as a string)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {what} {path} ({getattr(e, 'strerror', None) or e}); check the path") from None
    try:
        try:
            data = json.loads(text, object_pairs_hook=_json_pairs(text))
        except _Duplicate:
            raise
        except ValueError as e:
            if Path(path).suffix == ".json":
                raise UserError(f"{what} {path} is not valid JSON ({e}); fix it at that place") from None
            import yaml  # only for YAML files

            try:
                data = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 (a SafeLoader)
            except yaml.YAMLError as e:
                raise UserError(f"{what} {path} is not valid YAML or JSON ({' '.join(str(e).split())}); fix it at "
                                "that place") from None
    except _Duplicate as e:
        where = " and ".join(map(str, e.lines)) if len(e.lines) > 1 else "more than one line"
        raise UserError(f"{what} {path}: {e.key} is given twice (lines {where}); keep one") from None
    if data is None:  # an empty file
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} holds a {type(data).__name__}, not a mapping of option: value; write one "
                        "option a line, e.g. `epochs: 10`")
    return data


WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}  # for switches


def option_value(name: str, value, source: str):
    """A file's value for option `name`, checked as the command line checks a flag's; floats as floats."""
    f = {f.name: f for f in dataclasses.fields(Config)}[name]
    kind = f.type if f.type in (bool, int, float, str) else str  # `str | None`: a string or null
    if value is None and isinstance(f.type, types.UnionType):
        return None
    if "const" in f.metadata and isinstance(value, bool):  # a config.json from when it was a switch
        value = f.metadata["const"] if value else f.default
    elif kind is str and isinstance(value, bool) and {"on", "off"} <= set(f.metadata.get("choices", ())):
        value = "on" if value else "off"  # a word option written as a boolean
    if kind is bool and isinstance(value, str) and value.lower() in WORDS:  # a switch written as a word
        value = WORDS[value.lower()]
    if name == "lora_targets" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = ",".join(value)  # a YAML list of patterns: the flag's comma-separated ones
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {bool: isinstance(value, bool), int: number and isinstance(value, int), float: number,
          str: isinstance(value, str)}[kind]
    if not ok:
        what = {bool: "true or false", int: "a whole number", float: "a number",
                str: "a string" + (" or null" if f.default is None else "")}[kind]
        raise UserError(f"{source}: {name} must be {what}, got {value!r}; fix its value")
    choices = f.metadata.get("choices")
    if choices and isinstance(value, str) and value not in choices and value.lower() in choices:
        value = value.lower()  # `Off`, `ON`: YAML 1.1's spellings of its booleans, meant as the words
    if choices and value not in choices:
        raise UserError(f"{source}: {name} must be one of {', '.join(choices)}, got {value!r}; fix its value")
    return float(value) if kind is float else value


def file_options(data: dict, source: str) -> dict:
    """The options of a config file's mapping, checked: keys are Config's names (`batch_size` or
    `batch-size`). A run's config.json (it holds the RECORDED keys) works as it is: those keys and its
    ACTIONS are skipped, so training from it starts a new run."""
    names = [f.name for f in dataclasses.fields(Config)]
    run_record = any(str(k) in RECORDED for k in data)
    out, given = {}, {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in RECORDED:
            continue
        if name not in names:
            near = difflib.get_close_matches(name, names, n=1)
            hint = f"did you mean {near[0]}? " if near else ""
            raise UserError(f"{source}: unknown option {key!r}; {hint}keys are train.py's options without the "
                            "leading -- (see --help)")
        if name in given:
            raise UserError(f"{source}: {name} is given twice ({given[name]!r} and {key!r}); keep one")
        given[name] = key
        if name in ACTIONS and run_record:
            continue
        if name in ("resume", "overwrite") and value is True:
            raise UserError(f"{source}: {key}: true is not taken from a file (it is what one command does to one "
                            f"--output-dir); pass --{name} on the command line")
        out[name] = option_value(name, value, source)
    if out.get("data_file") and (out.get("data_zip") or out.get("data_dir") not in (None, Config.data_dir)):
        other = "data_zip" if out.get("data_zip") else "data_dir"
        raise UserError(f"{source}: {other} and data_file both name the data set; keep one (a label file's paths "
                        "start from data_root)")
    return out


DATA_SOURCE = ("data_dir", "data_zip", "data_file", "data_root")  # the options that name the data set


def given_flags(parser: argparse.ArgumentParser, argv) -> set[str]:
    """The options a command line gives (by dest): argparse leaves alone what a namespace already holds."""
    unset = object()
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    parsed = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(dests, unset)))
    return {d for d in dests if getattr(parsed, d) is not unset}


def parse_args(argv=None) -> Config:
    parser = Parser(description="Transfer learning for a torchvision classifier on an "
                    "ImageFolder data set.", formatter_class=_Formatter)
    parser.add_argument("--config", metavar="FILE", help="take options from a YAML or JSON file (keys as the "
                        "options' names, e.g. batch_size: 8); flags given as well override it. A run's config.json "
                        "trains that run again as a new run: its output_dir, resume and overwrite are left out")
    for f in dataclasses.fields(Config):
        flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.type is bool:
            parser.add_argument(flag, action="store_true", help=help)
        elif "const" in f.metadata:  # the flag alone means const (it was a switch before it took a value)
            parser.add_argument(flag, nargs="?", const=f.metadata["const"], default=f.default, help=help,
                                choices=f.metadata.get("choices"))
        else:
            kind = f.type if f.type in (int, float) else str
            parser.add_argument(flag, type=kind, default=f.default, help=help,
                                choices=f.metadata.get("choices"))
    args = parser.parse_args(argv)
    config, from_file, given = args.config, {}, given_flags(parser, argv)
    if config:  # the file's values become the defaults, so the flags given override them
        from_file = file_options(read_mapping(config), config)
        if given & {"data_dir", "data_zip", "data_file"}:  # a flag's data set replaces the file's
            from_file = {k: v for k, v in from_file.items() if k not in DATA_SOURCE}
        parser.set_defaults(**from_file)
        args = parser.parse_args(argv)
        from_file = set(from_file) - given
    options = vars(args)
    del options["config"]  # where the options came from is not one of them (config.json holds the options)
    return Config(**options).validate(lambda name: f"{name} in {config}" if name in from_file else
                                      "--" + name.replace("_", "-"), given | set(from_file))
