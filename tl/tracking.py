"""Run records: config.json, metrics.jsonl (one line per epoch) and summary.json."""

import json
from pathlib import Path


class RunLog:
    def __init__(self, output_dir: Path):
        self.dir = output_dir

    def write_json(self, name: str, obj: dict) -> None:
        tmp = self.dir / f".{name}.tmp"
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        tmp.replace(self.dir / name)

    def log_epoch(self, metrics: dict) -> None:
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")

    def keep_epochs(self, last: int) -> None:
        """Drop rows after epoch `last`: a resumed run redoes the epoch a kill cut short."""
        path = self.dir / "metrics.jsonl"
        if path.exists():
            rows = [r for r in path.read_text().splitlines() if json.loads(r)["epoch"] <= last]
            path.write_text("".join(r + "\n" for r in rows))
