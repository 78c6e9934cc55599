"""The Checkpointer: saves a run's epochs into its run directory in a kill-safe order, and restores them on a resume."""

import dataclasses
from pathlib import Path

import torch

from tl.core.errors import UserError
from tl.model.network import trained_part
from tl.runs import provenance, rundir
from tl.runs.checkpoints import (
    FORMAT_VERSION,
    Identity,
    Progress,
    identity_of,
    load_state,
    read_metadata,
    save,
    save_state,
)
from tl.runs.shards import full_state, load_shards, remove_other_shards, save_shards


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


def check_resumable(path: Path, identity: Identity, epochs: int, data=None) -> dict:
    """Before the slow work: the saved state is this run's (identity), made with these options and on the
    same data set (data: its tl.data.sources.DataSet, whose changes are then said in words)."""
    meta = read_metadata(path)
    if meta["format_version"] < FORMAT_VERSION:
        raise UserError(f"{path} was written by an older tl (checkpoint format {meta['format_version']}); "
                        "finish the run with that version, or start it again with --overwrite")
    saved = identity_of(path, meta)
    ours, theirs = identity.recipe.get("processes"), saved.recipe.get("processes")
    if identity.recipe.get("shard_model") and saved.recipe.get("shard_model") and ours != theirs:
        # DCP reshards the state to any number of processes; the data's shards change with it (not bit-exact)
        if meta.get("step"):
            raise UserError(f"{path.parent} was stopped inside epoch {meta['epoch'] + 1} by {theirs} processes; "
                            f"resume it with {theirs} (a run goes on at another number of processes only from the "
                            "end of an epoch)")
        saved = dataclasses.replace(saved, recipe=saved.recipe | {"processes": ours})
    changes = {}
    if data is not None and saved.data != identity.data:
        changes["data"] = provenance.data_changes(path.with_name(rundir.LISTING), data)
    if data is not None and data.label_file:
        changes["classes"] = f"the classes of {data.called} ({identity.classes!r}, not {saved.classes!r})"
    differences = saved.differences(identity, changes)
    if differences:
        raise UserError(f"cannot resume {path.parent} exactly: this command changes " + "; ".join(differences)
                        + ". Resume with the run's values, or start a new run (--overwrite or another "
                        "--output-dir)")
    if meta.get("epoch", 0) > epochs:
        raise UserError(f"{path.parent} has already trained {meta['epoch']} epochs; pass --epochs "
                        f"{meta['epoch']} or more to continue it")
    return meta


class Checkpointer:
    """Owns what a resume needs: the trained tensors, optimizer, scheduler and Progress.

    Every process keeps the same Progress; only the main process (the one with a RunDir) writes, but for
    --shard-model (sharded: tl.runs.shards), where every process writes its shards of the training state and
    takes part in gathering the best epoch's weights.
    """

    def __init__(self, run: rundir.RunDir | None, identity: Identity, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler, best_meta: dict, ema=None, sharded: bool = False,
                 out: Path | None = None):
        self.run, self.identity, self.model = run, identity, model  # run: None on every process but the main one
        self.sharded, self.out = sharded, out  # out: the run directory, on every process
        self.optimizer, self.scheduler = optimizer, scheduler
        self.best_meta = best_meta  # written into best.safetensors besides the identity: how the run evaluated
        self.ema = ema  # --ema: a tl.train.ema.WeightEMA, saved beside the weights
        self.progress = Progress()
        self.extra: dict[str, torch.Tensor] = {}  # a mid-epoch state's generator states, per process

    def trained(self) -> dict[str, torch.Tensor]:
        """What this mode trains (tl.model.network.trained_part): every tensor, the head's, or the head's and
        the adapters'."""
        return self.keep(full_state(self.model))  # sharded: gathered (every process calls), {} but on the main one

    def keep(self, state: dict) -> dict:
        return trained_part(state, self.identity.mode, self.identity.head)

    def averaged(self) -> dict[str, torch.Tensor] | None:
        return self.ema.state_dict() if self.ema else None

    def restore(self, path: Path) -> Progress:
        """Load the saved state into the model, optimizer and scheduler; refuse damaged parts."""
        tensors, optimizer_state, scheduler_state, meta = load_state(path)
        strict = self.identity.mode == "finetune"
        try:
            if meta.get("shards"):  # every process its own shards, resharded to this run's processes
                load_shards(path.parent / meta["shards"], self.model, self.optimizer, self.keep, strict)
            else:
                expected = set(self.keep(self.model.state_dict()))
                if set(tensors) != expected:
                    raise ValueError(f"it holds {len(tensors)} model tensors, this run trains {len(expected)}")
                self.model.load_state_dict(tensors, strict=strict)
                _check_optimizer_state(self.optimizer, optimizer_state)
                self.optimizer.load_state_dict(optimizer_state)
            if self.ema:
                self.ema.load_state_dict(meta["averaged"])
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
        from_ema = row.get("ema_val_acc", -1.0) > row["val_acc"]  # --ema: the averaged weights scored higher
        score = row["ema_val_acc"] if from_ema else row["val_acc"]
        improved = score > p.best_val_acc
        p.epoch, p.history, p.step, p.partial = row["epoch"], [*p.history, row], 0, []
        p.seconds = wall_seconds
        if improved:
            p.best_val_acc, p.best_epoch = score, row["epoch"]
            p.best_preds, p.best_confidence = preds, confidence
        trained = self.trained() if improved or not self.sharded else {}  # sharded: gathered, by every process
        shards = self.save_shards(p.epoch, 0)
        if self.run is None:
            return improved
        self.run.check_lock()
        self.run.append_row(row)
        if improved:
            which = {"weights_from": "ema" if from_ema else "model"} if self.ema else {}
            save(self.run.file(rundir.BEST), self.ema.trained() if from_ema else trained,
                 self.identity.meta() | self.best_meta | {"epoch": p.epoch, "val_acc": p.best_val_acc,
                                                          "val_correct": correct} | which)
        self.save_state(trained, shards, {})
        return improved

    def save_shards(self, epoch: int, step: int) -> str | None:
        """--shard-model: every process writes its shards of the training state (tl.runs.shards); their folder's
        name, which the state file then names. None for a run that is not sharded."""
        if not self.sharded:
            return None
        name = f"shards-{epoch}-{step}"
        save_shards(self.out, self.run is not None, self.model, self.optimizer, self.keep, name)
        return name

    def save_state(self, trained: dict, shards: str | None, generators: dict) -> None:
        """The main process: state.safetensors (the trained tensors and the optimizer's, or the name of the
        shards folder holding them), then, sharded, the folders it no longer names."""
        meta = self.identity.meta() | dataclasses.asdict(self.progress) | ({"shards": shards} if shards else {})
        save_state(self.run.file(rundir.STATE), {} if shards else trained, None if shards else self.optimizer,
                   self.scheduler, meta, generators, self.averaged())
        if shards:
            remove_other_shards(self.run.path, shards)
        self.run.epoch_saved()

    def save_step(self, step: int, partial: list[list[float]], generators: dict[str, torch.Tensor],
                  wall_seconds: float) -> None:
        """Inside an epoch (--save-every, or a stop signal): the state after `step` batches of the epoch
        after `progress.epoch`, with each process's running totals and generator states, so a resume
        continues at the next batch as if nothing had happened."""
        p = self.progress
        p.step, p.partial, p.seconds = step, partial, wall_seconds
        shards = self.save_shards(p.epoch + 1, step)
        if self.run is None:
            return
        self.run.check_lock()
        self.save_state({} if shards else self.trained(), shards, generators)
