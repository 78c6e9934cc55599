"""A sharded model's state (--shard-model, tl.train.sharding): gathered whole for best.safetensors, and the
training state saved and loaded by every process with torch.distributed.checkpoint (DCP), each process writing
its own shards, none gathering the model.

The training state of a sharded run is a folder `shards-<epoch>-<step>/` of DCP files (one `__<rank>_0.distcp`
per process and `.metadata`) beside `state.safetensors`, which names it and holds the rest (progress,
scheduler, generator states). A save writes `shards.tmp/`, renames it, then writes `state.safetensors`: a kill
at any moment leaves the state file naming a complete folder. DCP reshards on load, so a state saved by N
processes loads at any number, one included (no process group: DCP's no_dist mode).
"""

import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule

from tl.core.errors import UserError

TMP = "shards.tmp"
ONE_PROCESS = "torch.distributed is disabled, unavailable or uninitialized"  # DCP's note when there is no group


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on the main process's CPU (gathered once; every process must call it), {} on the
    others; a model that is not sharded gives its own state_dict()."""
    if not is_sharded(model):
        return model.state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, tensors: dict[str, torch.Tensor], strict: bool) -> None:
    """Whole tensors (a best.safetensors every process reads) into the model, sharded or not."""
    if not is_sharded(model):
        model.load_state_dict(tensors, strict=strict)
        return
    set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=strict))


def _states(model: nn.Module, optimizer: torch.optim.Optimizer, keep) -> tuple[dict, dict]:
    """The model's (the trained part: keep(state) -> dict) and the optimizer's state dicts, by parameter name."""
    model_state, optimizer_state = get_state_dict(model, optimizer, options=StateDictOptions(strict=False))
    return keep(model_state), optimizer_state


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_shards(run_path: Path, main: bool, model: nn.Module, optimizer: torch.optim.Optimizer, keep,
                name: str) -> None:
    """Every process writes its shards of the trained tensors and the optimizer state into run_path/shards.tmp,
    then the main process renames it to `name` (replacing a folder of that name: the same epoch saved again)."""
    tmp = run_path / TMP
    if main and tmp.exists():
        shutil.rmtree(tmp)  # a save a kill cut short
    _barrier()
    if dist.is_initialized():  # DCP keeps one copy of a tensor every process has (buffers): make it the main one's,
        for buffer in model.buffers():  # which every process's next training forward starts from anyway
            dist.broadcast(buffer, 0)
    model_state, optimizer_state = _states(model, optimizer, keep)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ONE_PROCESS)  # DCP without a process group: one process, as meant
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)
    if main:
        final = run_path / name
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)


def remove_other_shards(run_path: Path, keep: str) -> None:
    """The main process, once state.safetensors names `keep`: the folders no state names any more."""
    for old in run_path.glob("shards-*"):
        if old.name != keep and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def load_shards(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, keep, strict: bool) -> None:
    """The trained tensors and the optimizer state from a shards folder, resharded to this run's processes."""
    if not (folder / ".metadata").is_file():
        raise UserError(f"{folder} (the sharded training state) is missing or incomplete; restore it, or start "
                        "the run again with --overwrite")
    model_state, optimizer_state = _states(model, optimizer, keep)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ONE_PROCESS)
            dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException (a BaseException) wraps OSError & co
        failures = getattr(e, "failures", {}) or {}
        cause = next(iter(failures.values()), e)
        cause = cause[0] if isinstance(cause, tuple) else cause  # (exception, its stack)
        first = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}"
        raise UserError(f"{folder} (the sharded training state) is damaged or missing a process's file ({first[:200]})"
                        "; restore it, or start the run again with --overwrite") from None
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(strict=strict))
