"""Checkpoints: safetensors files with JSON metadata, the run's identity and its progress.

The metadata is one JSON document under the key "tl" (safetensors stores metadata in a hash map,
so several keys would come out in a different order each time and identical runs would not give
identical files). Two files per run: `best.safetensors` (the best epoch's weights; only the head
for feature-extract) and `state.safetensors` (everything needed to resume after the last
completed epoch: the trained weights, the optimizer's tensors, scheduler, progress and every
epoch's metrics row as metadata). Nothing is pickled.
"""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from safetensors.torch import save as safetensors_bytes

from tl.core.config import Config
from tl.core.errors import UserError
from tl.core.files import write_atomic

FORMAT = "tl-checkpoint"
FORMAT_VERSION = 2  # 2: data fingerprint, recipe and metrics history; tl.predict still reads 1


@dataclass
class Identity:
    """What a run is. Checkpoint metadata, resume checks and tl.predict all read this one object."""
    model: str
    mode: str
    classes: list[str]
    base_weights: str  # a torchvision weights name, timm:ARCH.TAG, "none", or sha256:<hex> of a local file
    weights: str  # the --weights value as given: names the local file in messages
    head: str
    image_size: int
    seed: int
    data: str = ""  # the data set's fingerprint
    recipe: dict = field(default_factory=dict)  # every option that changes the numbers
    preprocessing: dict = field(default_factory=dict)  # --preprocess resolved (Preprocess.meta()); {}: tutorial's

    # How a user changes each part; parts not listed here (weights, head) follow from others.
    OPTIONS = {"model": "--model", "mode": "--mode", "classes": "the class folders of --data-dir",
               "base_weights": "--weights", "image_size": "--image-size", "seed": "--seed",
               "data": "the files of --data-dir"}

    def meta(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_meta(cls, meta: dict) -> "Identity":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in meta.items() if k in names} | {"weights": meta.get("weights", "")})

    def differences(self, other: "Identity", changes: dict[str, str] | None = None) -> list[str]:
        """Each option this identity has another value for than `other` (the one being checked); `changes`
        describes a key's change in words instead of its two values (the data set's rows)."""
        defaults = {f.name: f.default for f in dataclasses.fields(Config)}
        changes = changes or {}
        out = [changes.get(key) or f"{flag} ({getattr(other, key)!r}, not {getattr(self, key)!r})"
               for key, flag in self.OPTIONS.items() if getattr(self, key) != getattr(other, key)]
        # An option newer than a saved run was that option's default in it.
        mine, theirs = ({k: r.get(k, defaults.get(k)) for k in set(self.recipe) | set(other.recipe)}
                        for r in (self.recipe, other.recipe))
        for key in sorted(mine):
            if mine[key] != theirs[key]:
                flag = "the number of processes" if key == "processes" else "--" + key.replace("_", "-")
                out.append(f"{flag} ({theirs[key]!r}, not {mine[key]!r})")
        return out


@dataclass
class Progress:
    """Where a run stands after its last completed epoch."""
    epoch: int = 0
    best_val_acc: float = -1.0
    best_epoch: int = 0
    best_preds: list[int] = field(default_factory=list)  # the best epoch's class for every val image
    best_confidence: list[float] = field(default_factory=list)  # and its probability
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)  # every epoch's metrics row
    step: int = 0  # batches of epoch `epoch + 1` done when saved mid-epoch, else 0
    partial: list[list[float]] = field(default_factory=list)  # each process's running loss sum, correct, images


def save(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write tensors (floats as float32) and metadata; a crash leaves the previous file intact."""
    tensors = {k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in tensors.items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION} | metadata
    write_atomic(Path(path), safetensors_bytes(tensors, metadata={"tl": json.dumps(meta, sort_keys=True)}))


def read_metadata(path: str | Path) -> dict:
    """The metadata of a tl checkpoint; a one-line UserError for anything else."""
    if not Path(path).is_file():
        what = "is a folder" if Path(path).is_dir() else "does not exist"
        raise UserError(f"checkpoint {path} {what}; pass the best.safetensors or state.safetensors of a tl run")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("tl", "{}"))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"checkpoint {path} is damaged or not a safetensors file ({e}); use an "
                        "intact copy or start the run again with --overwrite") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path} is a safetensors file but not a tl checkpoint; pass one written "
                        "by tl (best.safetensors or state.safetensors)")
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > FORMAT_VERSION:
        raise UserError(f"{path} has checkpoint format {meta.get('format_version')!r}, newer than this tl "
                        f"reads ({FORMAT_VERSION}); upgrade tl")
    return meta


def load(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    meta = read_metadata(path)
    try:
        return load_file(str(path)), meta
    except (SafetensorError, OSError) as e:
        raise UserError(f"checkpoint {path} is damaged ({e}); use an intact copy") from None


def identity_of(path, meta: dict) -> Identity:
    try:
        return Identity.from_meta(meta)
    except TypeError:
        raise UserError(f"checkpoint {path} lacks part of its identity (model, mode, classes, base weights); "
                        "it is damaged: use an intact copy") from None


def save_state(path, model_tensors: dict, optimizer: torch.optim.Optimizer | None, scheduler, metadata: dict,
               extra: dict[str, torch.Tensor] | None = None, averaged: dict[str, torch.Tensor] | None = None) -> None:
    """The full training state: optimizer tensors under optimizer.<param>.<name>, `extra` tensors
    (random generator states of a mid-epoch save) under extra.<name>, `averaged` (--ema's state)
    under averaged.<name>, the rest as JSON. optimizer None (--shard-model): the model's and the optimizer's
    tensors are in the shards folder metadata["shards"] names (tl.runs.shards)."""
    opt = optimizer.state_dict() if optimizer else {"state": {}, "param_groups": []}
    tensors = {f"{part}.{k}": v for part, group in (("model", model_tensors), ("extra", extra), ("averaged", averaged))
               for k, v in (group or {}).items()}
    scalars = {}
    for idx, state in opt["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    save(path, tensors, metadata | {"optimizer_groups": opt["param_groups"], "optimizer_scalars": scalars,
                                    "scheduler": scheduler.state_dict()})


def load_state(path) -> tuple[dict, dict, dict, dict]:
    """Inverse of save_state: model tensors, optimizer state_dict, scheduler state_dict, metadata
    (with the extra tensors under meta["extra"], the averaged ones under meta["averaged"])."""
    tensors, meta = load(path)
    for part in ("extra", "averaged"):
        meta[part] = {k.removeprefix(part + "."): v for k, v in tensors.items() if k.startswith(part + ".")}
    if meta.get("shards"):  # the model's and optimizer's tensors are in the shards folder
        return {}, None, meta.get("scheduler"), meta
    try:
        model = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value
        for key, value in meta["optimizer_scalars"].items():
            idx, name = key.split(".", 1)
            state.setdefault(int(idx), {})[name] = value
        optimizer = {"state": state, "param_groups": meta["optimizer_groups"]}
        return model, optimizer, meta["scheduler"], meta
    except (KeyError, ValueError, AttributeError) as e:
        raise UserError(f"{path} is incomplete ({type(e).__name__}: {e}); restore an intact copy or start "
                        "the run again with --overwrite") from None
