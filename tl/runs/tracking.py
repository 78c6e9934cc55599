"""Weights & Biases: the run's config, each epoch's metrics, the pictures, the summary.

Only the main process makes a Tracker. W&B runs online when it is configured (WANDB_API_KEY or a
`wandb login`), offline otherwise; an online start that fails (no network) falls back to offline.
W&B never changes the outcome of training: any W&B error becomes one warning and logging stops.
"""

import contextlib
import netrc
import os
import re
import secrets
import sys
import warnings
from pathlib import Path

from tl.core.files import write_atomic
from tl.runs import rundir

OFFLINE_TIMEOUT = 90.0  # s: the least an offline start (after a failed online one) may take


def wandb_mode(requested: str) -> str:
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return {"dryrun": "offline", "run": "online"}.get(os.environ["WANDB_MODE"], os.environ["WANDB_MODE"])
    try:
        logged_in = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        logged_in = False
    return "online" if os.environ.get("WANDB_API_KEY") or logged_in else "offline"


def end_service() -> None:
    """After a W&B failure (its service killed, say): close W&B's connection now, quietly, or its exit
    hook fails the same way and prints a traceback as the process ends."""
    with contextlib.suppress(Exception):
        import wandb

        wandb.teardown()


def wandb_command() -> str:
    """`wandb` as the user can type it: the environment's own, which need not be on PATH."""
    exe = Path(sys.executable).parent / "wandb"
    return str(exe) if exe.exists() else "wandb"


def first_line(e: Exception) -> str:
    """An exception's message as one line of tl's output (W&B's can run over several)."""
    return str(e).strip().splitlines()[0] if str(e).strip() else ""


def init_timeout() -> float:
    """Seconds an online start may take before tl logs offline: W&B's own WANDB_INIT_TIMEOUT, else 20."""
    try:
        return float(os.environ.get("WANDB_INIT_TIMEOUT", 20))
    except ValueError:
        return 20.0


class Tracker:
    def __init__(self, run: rundir.RunDir, config: dict, mode: str, project: str, entity: str | None,
                 name: str | None, resume: bool, group: str | None = None):
        self.dir, self.run = run.path, None
        mode = wandb_mode(mode)
        if mode == "disabled":
            return
        try:
            import wandb  # only when used: it takes a second to import

            def settings(timeout: float):
                return wandb.Settings(console="off", x_disable_stats=True, save_code=False, init_timeout=timeout,
                                      silent=True)

            kwargs = dict(project=project, entity=entity, name=name or self.dir.name, group=group, config=config,
                          dir=str(self.dir), id=self._run_id(resume), resume="allow")
            try:
                self.run = wandb.init(mode=mode, settings=settings(init_timeout()), **kwargs)
            except Exception as e:  # network down, bad key, service error: log offline
                if mode != "online":
                    raise
                print(f"W&B: could not start online ({type(e).__name__}: {first_line(e)}); logging offline instead")
                # A failed start can keep its run id reserved in the W&B service: use a fresh one. The timeout
                # was the network's: offline needs only the local service, which a busy node can make slow.
                self.run = wandb.init(mode="offline", settings=settings(max(init_timeout(), OFFLINE_TIMEOUT)),
                                      **kwargs | {"id": self._run_id(resume=False)})
        except Exception as e:
            self._give_up("start", e)

    def _give_up(self, what: str, e: Exception) -> None:
        warnings.warn(f"W&B: could not {what} ({type(e).__name__}: {first_line(e)}); training goes on without W&B",
                      stacklevel=2)
        self.run = None
        end_service()

    def _run_id(self, resume: bool) -> str:
        """One W&B run per output dir, so a resumed run continues its history."""
        path = self.dir / rundir.WANDB_ID
        if resume and path.exists():
            saved = path.read_text().strip()
            if re.fullmatch(r"[a-z0-9]{1,64}", saved):
                return saved
        run_id = secrets.token_hex(4)
        write_atomic(path, (run_id + "\n").encode())
        return run_id

    def log_epoch(self, metrics: dict) -> None:
        if self.run:
            try:
                self.run.log(metrics, step=metrics["epoch"])
            except Exception as e:
                self._give_up("log an epoch", e)

    def finish(self, summary: dict, pictures: dict[str, Path], targets: list[int], preds: list[int],
               classes: list[str], checkpoint: Path | None) -> None:
        """To W&B: the summary, the pictures, the confusion matrix, the checkpoint."""
        if not self.run:
            return
        try:
            import wandb

            self.run.summary.update({k: v for k, v in summary.items() if k != "skipped_images"})
            step = summary["epochs"]
            self.run.log({name: wandb.Image(str(path)) for name, path in pictures.items()}, step=step)
            self.run.log({"confusion_matrix": wandb.plot.confusion_matrix(y_true=targets, preds=preds,
                                                                          class_names=classes)}, step=step)
            if checkpoint:
                artifact = wandb.Artifact(f"{self.run.id}-best", type="model", metadata=summary)
                artifact.add_file(str(checkpoint), name=checkpoint.name, policy="immutable")
                self.run.log_artifact(artifact, aliases=["best"])
            offline = self.run.settings.mode == "offline"
            run_dir = Path(self.run.dir).parent
            self.close()
            if offline:
                print(f"W&B: offline run in {run_dir}; upload it with `{wandb_command()} sync {run_dir}` "
                      "(or make wandb-sync)")
        except Exception as e:
            self._give_up("finish", e)

    def close(self, exit_code: int = 0) -> None:
        """End the W&B run (every exit path calls this; it is a no-op once finished)."""
        run, self.run = self.run, None
        if run:
            try:
                run.finish(exit_code=exit_code)
            except Exception as e:
                warnings.warn(f"W&B: could not finish the run ({type(e).__name__}: {e})", stacklevel=2)
                end_service()
