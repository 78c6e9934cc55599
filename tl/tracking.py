"""Run records: config.json, metrics.jsonl (a line per epoch), summary.json, mirrored to W&B.

Only the main process makes a Tracker. W&B runs online when it is configured (WANDB_API_KEY or a
`wandb login`), offline otherwise; an online start that fails (no network) falls back to offline,
so a run never hangs or fails because of W&B.
"""

import json
import netrc
import os
import secrets
from pathlib import Path

WANDB_MODES = ("auto", "online", "offline", "disabled")


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


class Tracker:
    def __init__(self, output_dir: Path, config: dict, mode: str, project: str, entity: str | None,
                 name: str | None, resume: bool):
        self.dir, self.run = output_dir, None
        mode = wandb_mode(mode)
        if mode == "disabled":
            return
        import wandb  # only when used: it takes a second to import

        kwargs = dict(project=project, entity=entity, name=name or output_dir.name, config=config,
                      dir=str(output_dir), id=self._run_id(resume), resume="allow",
                      settings=wandb.Settings(console="off", x_disable_stats=True, save_code=False,
                                              init_timeout=20, silent=True))
        try:
            self.run = wandb.init(mode=mode, **kwargs)
        except Exception as e:  # network down, bad key, service error: keep training, log offline
            if mode != "online":
                raise
            print(f"W&B: could not start online ({type(e).__name__}: {e}); logging offline instead")
            # A failed start can keep its run id reserved in the W&B service: use a fresh one.
            self.run = wandb.init(mode="offline", **kwargs | {"id": self._run_id(resume=False)})

    def _run_id(self, resume: bool) -> str:
        """One W&B run per output dir, so a resumed run continues its history."""
        path = self.dir / "wandb_run_id"
        if resume and path.exists():
            return path.read_text().strip()
        run_id = secrets.token_hex(4)
        path.write_text(run_id + "\n")
        return run_id

    def write_json(self, name: str, obj: dict) -> None:
        tmp = self.dir / f".{name}.tmp"
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        tmp.replace(self.dir / name)

    def log_epoch(self, metrics: dict) -> None:
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.run:
            self.run.log(metrics, step=metrics["epoch"])

    def epochs(self) -> list[dict]:
        path = self.dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def keep_epochs(self, last: int) -> None:
        """Drop rows after epoch `last`: a resumed run redoes the epoch a kill cut short."""
        rows = [r for r in self.epochs() if r["epoch"] <= last]
        (self.dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def finish(self, summary: dict, pictures: dict[str, Path], targets: list[int], preds: list[int],
               classes: list[str], checkpoint: Path | None) -> None:
        """summary.json, and to W&B: the summary, the pictures, the confusion matrix, the checkpoint."""
        self.write_json("summary.json", summary)
        if not self.run:
            return
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
        self.run.finish()
        if offline:
            print(f"W&B: offline run in {run_dir}; upload it with `wandb sync {run_dir}` (or make wandb-sync)")
