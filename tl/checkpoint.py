"""Checkpoints: safetensors files with JSON metadata, the run's identity, and the Checkpointer.

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

from tl import run as rundir
from tl.errors import UserError

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

    def differences(self, other: "Identity") -> list[str]:
        """Each option this identity has another value for than `other` (the one being checked)."""
        from tl.config import Config
        defaults = {f.name: f.default for f in dataclasses.fields(Config)}
        out = [f"{flag} ({getattr(other, key)!r}, not {getattr(self, key)!r})"
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
    rundir.write_atomic(Path(path), safetensors_bytes(tensors, metadata={"tl": json.dumps(meta, sort_keys=True)}))


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


def save_state(path, model_tensors: dict, optimizer: torch.optim.Optimizer, scheduler, metadata: dict,
               extra: dict[str, torch.Tensor] | None = None) -> None:
    """The full training state: optimizer tensors under optimizer.<param>.<name>, `extra` tensors
    (random generator states of a mid-epoch save) under extra.<name>, the rest as JSON."""
    opt = optimizer.state_dict()
    tensors = {f"model.{k}": v for k, v in model_tensors.items()} | {f"extra.{k}": v for k, v in (extra or {}).items()}
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
    (with the extra tensors under meta["extra"])."""
    tensors, meta = load(path)
    meta["extra"] = {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}
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


def _check_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """torch loads a momentum buffer of the wrong shape without a word and fails steps later."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if [len(g["params"]) for g in state["param_groups"]] != [len(g["params"]) for g in optimizer.param_groups]:
        raise ValueError("its optimizer has other parameter groups")
    for idx, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != params[int(idx)].shape:
                raise ValueError(f"optimizer.{idx}.{name} has shape {tuple(value.shape)}, the parameter "
                                 f"{tuple(params[int(idx)].shape)}")


class Checkpointer:
    """Owns what a resume needs: the trained tensors, optimizer, scheduler and Progress.

    Every process keeps the same Progress; only the main process (the one with a RunDir) writes.
    """

    def __init__(self, run: rundir.RunDir | None, identity: Identity, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler, best_meta: dict):
        self.run, self.identity, self.model = run, identity, model
        self.optimizer, self.scheduler, self.best_meta = optimizer, scheduler, best_meta
        self.frozen = identity.mode == "feature-extract"
        self.progress = Progress()
        self.extra: dict[str, torch.Tensor] = {}  # a mid-epoch state's generator states, per process

    def trained(self) -> dict[str, torch.Tensor]:
        """What this mode trains: every tensor, or only the head's."""
        state = self.model.state_dict()
        return {k: v for k, v in state.items() if k.startswith(self.identity.head + ".")} if self.frozen else state

    def check_resumable(self, path: Path, epochs: int) -> dict:
        """Before the slow work: the saved state is this run's, made with these options."""
        meta = read_metadata(path)
        if meta["format_version"] < FORMAT_VERSION:
            raise UserError(f"{path} was written by an older tl (checkpoint format {meta['format_version']}); "
                            "finish the run with that version, or start it again with --overwrite")
        differences = identity_of(path, meta).differences(self.identity)
        if differences:
            raise UserError(f"cannot resume {path.parent} exactly: this command changes " + "; ".join(differences)
                            + ". Resume with the run's values, or start a new run (--overwrite or another "
                            "--output-dir)")
        if meta.get("epoch", 0) > epochs:
            raise UserError(f"{path.parent} has already trained {meta['epoch']} epochs; pass --epochs "
                            f"{meta['epoch']} or more to continue it")
        return meta

    def restore(self, path: Path) -> Progress:
        """Load the saved state into the model, optimizer and scheduler; refuse damaged parts."""
        tensors, optimizer_state, scheduler_state, meta = load_state(path)
        try:
            expected = set(self.trained())
            if set(tensors) != expected:
                raise ValueError(f"it holds {len(tensors)} model tensors, this run trains {len(expected)}")
            self.model.load_state_dict(tensors, strict=not self.frozen)
            _check_optimizer_state(self.optimizer, optimizer_state)
            self.optimizer.load_state_dict(optimizer_state)
            if set(scheduler_state) != set(self.scheduler.state_dict()):
                raise ValueError("its scheduler state has other fields")
            self.scheduler.load_state_dict(scheduler_state)
            names = [f.name for f in dataclasses.fields(Progress)]
            self.progress = Progress(**{k: meta[k] for k in names})
            self.extra = meta["extra"]
            if len(self.progress.history) != self.progress.epoch:
                raise ValueError(f"it records {len(self.progress.history)} metrics rows for {self.progress.epoch} "
                                 "epochs")
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise UserError(f"{path} is damaged ({first.strip()}); restore an intact copy or start the run again "
                            "with --overwrite") from None
        best = path.with_name(rundir.BEST)
        # best is written before the state: a kill between the two leaves it one epoch ahead, and
        # redoing that epoch writes the same file again.
        if self.progress.best_epoch and read_metadata(best).get("epoch") not in (self.progress.best_epoch,
                                                                                 self.progress.epoch + 1):
            raise UserError(f"{best} is not the best epoch ({self.progress.best_epoch}) the state records; restore "
                            "it, or start the run again with --overwrite")
        return self.progress

    def end_epoch(self, row: dict, preds: list[int], confidence: list[float], correct: int,
                  wall_seconds: float) -> bool:
        """Record a finished epoch; the main process saves in the order a kill at any moment needs:
        the metrics row, then best, then the state that says the epoch is done (a resume drops rows
        and redoes work past the state). Returns whether the epoch is the best so far."""
        p = self.progress
        improved = row["val_acc"] > p.best_val_acc
        p.epoch, p.history, p.step, p.partial = row["epoch"], [*p.history, row], 0, []
        p.seconds = wall_seconds
        if improved:
            p.best_val_acc, p.best_epoch = row["val_acc"], row["epoch"]
            p.best_preds, p.best_confidence = preds, confidence
        if self.run is None:
            return improved
        self.run.check_lock()
        self.run.append_row(row)
        trained = self.trained()
        if improved:
            save(self.run.file(rundir.BEST), trained, self.identity.meta() | self.best_meta | {
                "epoch": p.epoch, "val_acc": p.best_val_acc, "val_correct": correct})
        save_state(self.run.file(rundir.STATE), trained, self.optimizer, self.scheduler,
                   self.identity.meta() | dataclasses.asdict(p))
        self.run.epoch_saved()
        return improved

    def save_step(self, step: int, partial: list[list[float]], generators: dict[str, torch.Tensor],
                  wall_seconds: float) -> None:
        """Inside an epoch (--save-every, or a stop signal): the state after `step` batches of the epoch
        after `progress.epoch`, with each process's running totals and generator states, so a resume
        continues at the next batch as if nothing had happened."""
        p = self.progress
        p.step, p.partial, p.seconds = step, partial, wall_seconds
        if self.run is None:
            return
        self.run.check_lock()
        save_state(self.run.file(rundir.STATE), self.trained(), self.optimizer, self.scheduler,
                   self.identity.meta() | dataclasses.asdict(p), generators)
        self.run.epoch_saved()
