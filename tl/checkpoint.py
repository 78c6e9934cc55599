"""Checkpoints: safetensors files with JSON metadata, written atomically (temp file + rename).

The metadata is one JSON document under the key "tl" (safetensors stores metadata in a hash map,
so several keys would come out in a different order each time and identical runs would not give
identical files). Two files per run: `best.safetensors` (the best epoch's weights; only the head for feature-extract)
and `state.safetensors` (everything needed to resume after the last completed epoch: the trained
weights, the optimizer's tensors, scheduler and progress as metadata). Nothing is pickled.
"""

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from tl.errors import UserError

FORMAT = "tl-checkpoint"
FORMAT_VERSION = 1
# What a checkpoint must agree on with the run or model that uses it.
IDENTITY = ("model", "mode", "classes", "base_weights")


def save(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write tensors (floats as float32) and metadata; a crash leaves the previous file intact."""
    path = Path(path)
    tensors = {k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in tensors.items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION} | metadata
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, tmp, metadata={"tl": json.dumps(meta, sort_keys=True)})
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def read_metadata(path: str | Path) -> dict:
    """The metadata of a tl checkpoint; a one-line UserError for anything else."""
    if not Path(path).is_file():
        raise UserError(f"checkpoint {path} does not exist; pass the best.safetensors or "
                        "state.safetensors of a tl run")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("tl", "{}"))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"checkpoint {path} is damaged or not a safetensors file ({e}); use an "
                        "intact copy or start the run again without --resume") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} is a safetensors file but not a tl checkpoint; pass one written "
                        "by tl (best.safetensors or state.safetensors)")
    if meta["format_version"] > FORMAT_VERSION:
        raise UserError(f"{path} has checkpoint format {meta['format_version']}, newer than this tl "
                        f"reads ({FORMAT_VERSION}); upgrade tl")
    return meta


def load(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    meta = read_metadata(path)
    try:
        return load_file(str(path)), meta
    except (SafetensorError, OSError) as e:
        raise UserError(f"checkpoint {path} is damaged ({e}); use an intact copy") from None


def check_matches(path, meta: dict, expected: dict) -> None:
    """Refuse a checkpoint made for another model, mode, class list or base weights."""
    for key in IDENTITY:
        have, want = meta[key], expected[key]
        if have != want:
            raise UserError(f"checkpoint {path} was made with {key} {have!r}, not {want!r}; use a "
                            f"checkpoint of this run's {key} or change --{key.replace('_', '-')}")


def save_state(path, model_tensors: dict, optimizer: torch.optim.Optimizer, scheduler,
               metadata: dict) -> None:
    """The full training state: optimizer tensors under optimizer.<param>.<name>, the rest as JSON."""
    opt = optimizer.state_dict()
    tensors = {f"model.{k}": v for k, v in model_tensors.items()}
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
    """Inverse of save_state: model tensors, optimizer state_dict, scheduler state_dict, metadata."""
    tensors, meta = load(path)
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
