"""A run built from its Config after every input is checked: data listed and read, model, optimizer, feature cache."""

import functools
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from torch.utils.data import DataLoader

from tl.core.config import POLICIES, Config
from tl.core.errors import UserError
from tl.data.augment import DeviceAugment
from tl.data.augment import collate as padded_batches
from tl.data.features import FeatureRows, backbone_features, feature_loaders
from tl.data.listing import ensure_data
from tl.data.loaders import ImageSet, check_workers_can_start, make_loaders
from tl.data.preprocess import Preprocess, center_view, train_transform
from tl.data.sources import DataSet, open_data
from tl.data.splits import Split, choose_data_mode, usable_cpus
from tl.model.lora import add_adapters, resolve_targets, summary
from tl.model.network import (
    build_model,
    check_input_size,
    layer_depths,
    preprocess_for,
    set_grad_checkpointing,
    weights_id,
)
from tl.runs import provenance, rundir
from tl.runs.checkpointer import Checkpointer, check_resumable
from tl.runs.checkpoints import Identity
from tl.train.ema import WeightEMA
from tl.train.optim import build_optimizer, build_scheduler, describe, param_groups
from tl.train.sharding import shard
from tl.train.targets import BatchMix, batch_mix, class_weights


def on_main(accelerator: Accelerator, fn):
    """fn() on the main process only, its result (or its one-line error) shared with every process:
    one process lists and checks what every process would read alike (a million files hit a cluster
    file system once per run, not once per rank)."""
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except UserError as e:
            error = str(e)
    shared = [result, error]
    broadcast_object_list(shared)
    if shared[1]:
        raise UserError(shared[1])
    return shared[0]


@dataclass(frozen=True)
class Setup:
    """Everything a run trains with, built whole by setup() from its Config after every input was checked."""
    identity: Identity
    data: DataSet  # the data set it trains on (listing.json.gz)
    model: torch.nn.Module
    net: torch.nn.Module  # what trains and what DDP wraps: the model, or only its head on cached features
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    groups: list[dict]  # the optimizer's parameter groups, described (config.json)
    train_set: torch.utils.data.Dataset
    sampler: torch.utils.data.DistributedSampler
    train_loader: DataLoader
    val_loader: DataLoader
    val_targets: torch.Tensor
    val_split: Split  # the val images (the final evaluation reads them again: --tta, --calibrate)
    open_test: Callable[[], Split] | None  # test/, read only at the end (evaluate_best)
    num_train: int
    skipped: list[str]
    shown: ImageSet  # what the model sees, before normalization (batch.png)
    device_augment: DeviceAugment | None  # crops, flips and normalizes batches on the device
    workers: int  # DataLoader workers of image loaders
    pre: Preprocess  # sizes, interpolation, mean and std of the model's input
    pre_source: str  # where pre comes from, for the start line
    frozen: bool  # the base does not train (feature-extract, lora): the model stays in eval mode
    cached: bool  # feature-extract on the feature cache: net is the head
    mixer: BatchMix | None  # --mixup/--cutmix on a device batch
    class_weight: torch.Tensor | None  # --class-weights auto, on the device
    ema: WeightEMA | None  # --ema
    record: dict  # config.json's reproduction keys (main process only)


def setup(cfg: Config, accelerator: Accelerator, run: rundir.RunDir | None, out: Path,
          resuming: bool) -> tuple[Setup, Checkpointer]:
    """Fast checks first (data listing, weights, the saved state), then the slow work (decoding)."""
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    data = open_data_set(cfg, accelerator, out)
    listing = data.listing
    frozen = cfg.mode != "finetune"  # the base stays as it is (lora: but for its adapters)
    cache = cfg.mode == "feature-extract" and cfg.feature_cache == "on"
    if frozen and cfg.weights.lower() == "none" and main:
        trains = "a head and adapters" if cfg.mode == "lora" else "a head"
        warnings.warn(f"{cfg.mode} with --weights none trains {trains} on a frozen random backbone, which "
                      "learns little; pass pretrained weights or use --mode finetune", stacklevel=1)
    set_seed(cfg.seed)  # the same new head on every process, and on resume
    with accelerator.local_main_process_first():  # one weights download per node
        model, head_name = build_model(cfg.model, cfg.weights, len(listing.classes), cfg.mode)
    pre, pre_source = preprocess_for(cfg.preprocess, cfg.model, cfg.weights, model, cfg.image_size, cfg.train_size)
    if pre_source.startswith("note:") and main:
        print(pre_source)
    check_input_size(model, cfg.model, pre)
    if cfg.mode == "lora":
        targets = resolve_targets(model, head_name, cfg.lora_targets)
        add_adapters(model, head_name, targets, cfg.lora_rank, cfg.lora_alpha)
        if main:
            trains = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f"lora: rank {cfg.lora_rank} adapters on {len(targets)} layers ({summary(dict.fromkeys(targets))}),"
                  f" {trains:,} of {sum(p.numel() for p in model.parameters()):,} parameters train")
            if cfg.optimizer == "sgd" and cfg.lr <= 0.001:
                print(f"note: the adapters start as no change and learn slowly at --lr {cfg.lr:g}; about 10x more "
                      "did best on hymenoptera (docs/large-models.md, 'Which to use when')")
    if cfg.grad_checkpointing:
        if cache:
            raise UserError("--grad-checkpointing saves memory in the backward pass through the backbone; "
                            "feature-extract on the feature cache has none: drop one of them")
        set_grad_checkpointing(model, cfg.model, head_name)
    sharded = cfg.shard_model and world > 1
    if cfg.shard_model and not sharded and main:
        warnings.warn("--shard-model with one process shards nothing: it trains as without it (its training state "
                      "is still saved sharded, so a run can go on at any number of processes)", stacklevel=1)
    if sharded:  # before the optimizer: the parameters become sharded ones
        units = shard(model, head_name, accelerator)
        accelerator.print(f"--shard-model: {units} shard units (FSDP2) over {world} processes, each holding "
                          f"about 1/{world} of the parameters, gradients and optimizer state")
    # A policy or erasing works image by image in the loader: there, the crop and flip do too.
    augment = cfg.augment if cfg.augment != "auto" else \
        "device" if accelerator.device.type == "cuda" and not cfg.random_erasing else "cpu"
    recipe = cfg.recipe() | {"train_size": pre.train_crop, "precision": accelerator.mixed_precision, "processes": world,
                             "augment": augment}
    identity = Identity(model=cfg.model, mode=cfg.mode, classes=listing.classes,
                        base_weights=weights_id(cfg.weights, cfg.model), weights=cfg.weights, head=head_name,
                        image_size=pre.crop, seed=cfg.seed, data=listing.fingerprint, recipe=recipe,
                        preprocessing=pre.meta())
    net = model.get_submodule(head_name) if cache else model
    depths = layer_depths(model, head_name) if cfg.layer_decay != 1 else None
    groups = param_groups(net, model.get_submodule(head_name), cfg, depths)
    if depths and main:
        rates = [g["lr"] for g in groups if not g["name"].startswith("head")]
        print(f"layer decay {cfg.layer_decay:g}: {depths[1]} layers below the head, learning rates from "
              f"{cfg.lr:.2g} (head) down to {min(rates):.2g} (the input's); every group in config.json")
    optimizer = build_optimizer(groups, cfg)
    scheduler = build_scheduler(optimizer, cfg)  # not prepared: Accelerate would step it once per process
    if resuming:  # before the slow decoding: a resume that cannot be exact is refused now
        saved = check_resumable(out / rundir.STATE, identity, cfg.epochs, data)["recipe"].get("processes")
        if saved != world and main:  # --shard-model: DCP reshards the state
            print(f"resuming at {world} process(es) a run saved by {saved}: the state is resharded; the epochs "
                  f"from here see other batches than at {saved} (not bit-exact)")

    node_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    mode, why = choose_data_mode(cfg.data_mode, listing, pre, node_processes)
    workers = cfg.num_workers if cfg.num_workers >= 0 else \
        0 if mode == "memory" else max(1, usable_cpus() // node_processes)
    accelerator.print(f"data: {mode} ({why}), {workers} DataLoader worker(s) per process")
    check_workers_can_start(workers, ", or pass --num-workers 0")
    # Train images are kept big enough for both the train crop and the feature cache's center view.
    strict = cfg.strict()
    train_split = read_split(accelerator, data, "train", mode, pre, True, strict)
    val_split = read_split(accelerator, data, "val", mode, pre, False, strict)
    cached = net is not model
    on_device = augment == "device" and not cached
    device_augment = (DeviceAugment(pre.train_crop, accelerator.device, cfg.seed, rank, mean=pre.mean, std=pre.std)
                      if on_device else None)
    # On the device: the loader only pads each batch's uint8 images; crops come in one batched kernel.
    policy = cfg.augment if cfg.augment in POLICIES else None
    train_set = ImageSet(train_split, None if on_device else train_transform(pre, policy, cfg.random_erasing),
                         seed=cfg.seed)
    val_set = ImageSet(val_split)
    val_targets = torch.tensor(val_split.targets)
    train_loader, sampler, val_loader = make_loaders(train_set, val_set, cfg.batch_size, workers, cfg.seed, rank,
                                                     world, not frozen, padded_batches if on_device else None,
                                                     cfg.sampler == "balanced")
    if not sharded:
        model = model.to(memory_format=torch.channels_last)
    shown = train_set
    if cached:  # a frozen backbone always gives the same features: compute them once
        t0 = time.perf_counter()
        model.to(accelerator.device).eval()
        shown = ImageSet(train_split, lambda x: center_view(x, pre))
        parts = backbone_features(model, head_name, {"train": shown, "val": val_set}, val_loader.batch_size,
                                  accelerator, out / rundir.FEATURES, workers, pre)
        train_set = FeatureRows(parts["train"], torch.tensor(train_split.targets))
        own_val = FeatureRows([parts["val"][rank]], val_targets[rank::world])  # what this process evaluates
        train_loader, sampler, val_loader = feature_loaders(train_set, own_val, cfg.batch_size, val_loader.batch_size,
                                                            cfg.seed, accelerator, cfg.sampler == "balanced")
        accelerator.print(f"feature cache: backbone features of {len(shown)} train (center view, no augmentation) "
                          f"and {len(val_split.images)} val images in {time.perf_counter() - t0:.1f}s, "
                          + (f"on {accelerator.device}" if train_loader.dataset.device.type == "cuda"
                             else f"memory-mapped from {out / rundir.FEATURES}"))
    classes = len(listing.classes)
    ema = WeightEMA(model, head_name, cfg.mode, cfg.ema, accelerator.device) if cfg.ema else None
    setup = Setup(
        identity=identity, data=data, model=model, net=net, optimizer=optimizer, scheduler=scheduler,
        train_set=train_set, sampler=sampler, train_loader=train_loader, val_loader=val_loader,
        val_targets=val_targets, shown=shown,
        device_augment=device_augment, num_train=len(train_split.images),
        skipped=train_split.skipped + val_split.skipped, frozen=frozen, cached=cached, groups=describe(groups),
        open_test=functools.partial(read_split, accelerator, data, "test", mode, pre, False, strict)
        if listing.test else None,  # read at the end: its images are not held through training
        workers=workers, record=provenance.record(listing, data.pack) if main else {}, pre=pre,
        pre_source=pre_source, val_split=val_split, mixer=batch_mix(cfg.mixup, cfg.cutmix, classes, cfg.seed, rank),
        class_weight=class_weights(train_split.targets, classes).to(accelerator.device)
        if cfg.class_weights == "auto" else None,
        ema=ema)
    best_meta = {"mixed_precision": accelerator.mixed_precision, "eval_batch_size": val_loader.batch_size}
    return setup, Checkpointer(run, identity, model, optimizer, scheduler, best_meta, ema, cfg.shard_model, out)


def open_data_set(cfg: Config, accelerator: Accelerator, out: Path) -> DataSet:
    """The run's data set (tl.data.sources.open_data): a label file, class folders or a pack, listed by the
    main process for all (a million files hit a cluster file system once per run, not once per rank)."""
    if cfg.data_file:
        return on_main(accelerator, lambda: open_data(cfg.data_file, cfg.data_root, cfg.val_split, label_file=True,
                                                      called=f"--data-file {cfg.data_file}"))
    with accelerator.local_main_process_first():  # one download per node
        root = ensure_data(cfg.data_dir, cfg.data_zip)
    if root.resolve() == out.resolve() or root.resolve() in out.resolve().parents:
        raise UserError(f"--output-dir {out} is inside --data-dir {root}: the run's pictures would become images "
                        "of the next run; pass an --output-dir outside the data set")
    return on_main(accelerator, lambda: open_data(root, val_split=cfg.val_split, label_file=False,
                                                  called=f"--data-dir {cfg.data_dir}"))


def read_split(accelerator: Accelerator, data: DataSet, split: str, mode: str, pre: Preprocess, train: bool,
               strict: bool) -> Split:
    """One split: decoded into memory by every process, or checked for streaming by the main process for all
    (a pack needs no check: tl.pack checked every image)."""
    if mode == "stream" and not data.pack:
        return on_main(accelerator, lambda: data.split(split, pre, train, True, True, strict))
    return data.split(split, pre, train, mode == "stream", accelerator.is_main_process, strict)
