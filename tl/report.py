"""Compare runs: python -m tl.report RUN_OR_SWEEP_DIR... [--out DIR]; what one got wrong: RUN --errors

One row per run: the options whose values differ across the runs, best val accuracy and its epoch,
test accuracy when a summary has one, epochs, wall time, train images/s; plus, for runs that differ
only by seed, a row with the mean and sample std. Printed, and written as report.md, report.csv and
report.png (val accuracy per epoch, one line per run, a seed group in one colour).

A run dir is a folder holding config.json, metrics.jsonl or summary.json; any other folder is a sweep,
whose immediate sub-folders that are run dirs are taken (in natural order: s2 before s10).

python -m tl.report RUN --errors [--split val|test] [--top N]: what one run's model got wrong (tl.inference.mistakes).
"""

import csv
import dataclasses
import io
import json
import math
import re
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from tl.core.cli import Parser, number
from tl.core.errors import UserError, run_cli
from tl.core.files import output_folder, write_atomic
from tl.core.stop import writing
from tl.runs import rundir

REPORT_MD, REPORT_CSV, REPORT_PNG = "report.md", "report.csv", "report.png"
# Options that never change a run's numbers or speed, or that every run has its own value of.
NOISE = {"output_dir", "resume", "overwrite", "data_zip", "wandb", "wandb_project", "wandb_entity", "wandb_name",
         "wandb_group", "wandb_log_model", "slurm", "recipe", "classes", "head", "param_groups",
         "preprocessing"}  # these repeat others (preprocessing: of --preprocess, --image-size, --model)
CELL = 40  # characters of an option's value in the printed and markdown tables (report.csv has all)
CACHED = "*"  # marks the train speed of a feature-extract run on the feature cache


@dataclass(frozen=True)
class Run:
    path: Path
    name: str = ""
    config: dict | None = None
    rows: list[dict] = field(default_factory=list)  # metrics.jsonl, one per epoch
    summary: dict | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.summary is not None

    def best(self) -> tuple[float | None, int | None]:
        if self.summary and _number(self.summary.get("best_val_acc")):
            return self.summary["best_val_acc"], self.summary.get("best_epoch")
        best = max(self.rows, key=lambda r: r["val_acc"], default=None)  # max() keeps the first of equals
        return (best["val_acc"], best["epoch"]) if best else (None, None)

    def epochs(self) -> int:
        if self.summary and isinstance(self.summary.get("epochs"), int):
            return self.summary["epochs"]
        return max((r["epoch"] for r in self.rows), default=0)

    def wall_s(self) -> float | None:
        """The summary's total (start-up and pictures included); else the epochs' own times so far."""
        if self.summary and isinstance(self.summary.get("total_seconds"), (int, float)):
            return self.summary["total_seconds"]
        times = [r["seconds"] for r in self.rows if isinstance(r.get("seconds"), (int, float))]
        return sum(times) if times else None

    def images_per_s(self) -> float | None:
        """Train images over training time, the first epoch left out when there are more: it holds the
        warm-up (cudnn's search, torch.compile, first-touch allocations) that later epochs do not pay."""
        timed = [r for r in self.rows if _number(r.get("train_images")) and _number(r.get("train_images_per_s"))]
        timed = timed[1:] if len(timed) > 1 else timed
        seconds = sum(r["train_images"] / r["train_images_per_s"] for r in timed if r["train_images_per_s"] > 0)
        if seconds > 0:
            return sum(r["train_images"] for r in timed) / seconds
        return (self.summary or {}).get("train_images_per_s")

    def test_acc(self) -> float | None:
        value = (self.summary or {}).get("test_acc")
        return value if _number(value) else None

    def status(self) -> str:
        state = "done" if self.done else "incomplete"
        return "; ".join([state, *self.problems])


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _natural(path: Path):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def is_run_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in (rundir.CONFIG, rundir.METRICS, rundir.SUMMARY))


def find_runs(paths: list[str]) -> tuple[list[Path], bool]:
    """The run dirs the arguments name, and whether the only argument was a sweep."""
    runs = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise UserError(f"{p} is not a folder; pass run dirs or folders of run dirs")
        runs += [p] if is_run_dir(p) else sorted((d for d in p.iterdir() if d.is_dir() and is_run_dir(d)),
                                                  key=_natural)
    if not runs:
        raise UserError(f"no run dirs (folders holding {rundir.CONFIG}, {rundir.METRICS} or {rundir.SUMMARY}) in "
                        f"{' '.join(paths)}; pass run dirs or folders of them")
    return runs, len(paths) == 1 and not is_run_dir(Path(paths[0]))


def _read_json(run_dir: Path, name: str, problems: list[str]) -> dict | None:
    path = run_dir / name
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
        return value
    except (OSError, ValueError) as e:
        problems.append(f"{name} unreadable")
        warnings.warn(f"{path} is unreadable ({e}); the run is shown without it", stacklevel=2)
        return None


def read_run(path: Path) -> Run:
    """What a run dir holds; a missing or damaged file becomes a problem noted on the run, never an error."""
    problems = []
    config = _read_json(path, rundir.CONFIG, problems)
    if not (path / rundir.CONFIG).is_file():
        problems.append(f"no {rundir.CONFIG}")
        warnings.warn(f"{path} has no {rundir.CONFIG}; its options are unknown", stacklevel=2)
    summary = _read_json(path, rundir.SUMMARY, problems)
    bad, by_epoch, metrics = 0, {}, path / rundir.METRICS
    try:  # undecodable bytes become bad lines, below
        lines = metrics.read_text(errors="replace").splitlines() if metrics.is_file() else []
    except OSError as e:
        lines = []
        problems.append(f"{rundir.METRICS} unreadable")
        warnings.warn(f"{metrics} is unreadable ({e.strerror or e})", stacklevel=2)
    lines = [line for line in lines if line.strip()]
    for line in lines:
        try:
            row = json.loads(line)
            if not (isinstance(row, dict) and isinstance(row.get("epoch"), int) and _number(row.get("val_acc"))):
                raise ValueError
        except ValueError:  # a kill mid-append leaves half a line; anything else is damage
            bad += 1
            continue
        by_epoch[row["epoch"]] = row  # a later row of the same epoch replaces an earlier one
    if bad:
        problems.append(f"{bad} bad line{'s' * (bad > 1)} in {rundir.METRICS}")
        warnings.warn(f"{metrics}: left out {bad} of {len(lines)} lines, not metrics rows",
                      stacklevel=2)
    return Run(path, path.name, config, [by_epoch[e] for e in sorted(by_epoch)], summary, problems)


def _unique_names(runs: list[Run]) -> list[Run]:
    """Dir names, or longer paths where two runs share one (s0 of two sweeps)."""
    names = [r.path.name for r in runs]
    return [dataclasses.replace(r, name=f"{r.path.parent.name}/{r.path.name}") if names.count(r.path.name) > 1
            else r for r in runs]


def differing_options(runs: list[Run]) -> list[str]:
    """Config keys whose values are not the same across the runs with a config (in config order)."""
    configs = [r.config for r in runs if r.config is not None]
    keys = list(dict.fromkeys(k for c in configs for k in c if k not in NOISE))
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]


def show(value) -> str:
    """An option's value for a table cell: hashes shortened, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, str) and value.startswith("sha256:"):
        return value[:19]
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= CELL else text[:CELL - 3] + "..."


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def cached_features(config: dict | None) -> bool:
    """Whether a run trained its head on the feature cache: its train images/s is the head's alone."""
    config = config or {}
    return config.get("mode") == "feature-extract" and config.get("feature_cache", "on") == "on"


def build_rows(runs: list[Run]) -> tuple[list[str], list[dict]]:
    """The differing options and the report's rows: runs grouped by every differing option but the seed,
    each group of two or more followed by its mean row (over its finished runs)."""
    options = differing_options(runs)
    by_group: dict[str, list[Run]] = {}
    for r in runs:  # a run without a config is a group of its own
        key = json.dumps([r.config.get(k) for k in options if k != "seed"]) if r.config is not None else str(r.path)
        by_group.setdefault(key, []).append(r)
    rows = []
    for group, members in enumerate(by_group.values()):
        for r in members:
            best, epoch = r.best()
            rows.append({"run": r.name, "kind": "run", "group": group, "status": r.status(),
                         "options": {k: (r.config or {}).get(k) for k in options},
                         "best_val_acc": best, "best_epoch": epoch, "test_acc": r.test_acc(),
                         "epochs_done": r.epochs(), "planned": (r.config or {}).get("epochs"), "wall_s": r.wall_s(),
                         "train_images_per_s": r.images_per_s(), "path": str(r.path), "curve": r.rows,
                         "done": r.done, "cached_features": cached_features(r.config)})
        if len(members) < 2:
            continue
        finished = [row for row in rows[-len(members):] if row["done"] and row["best_val_acc"] is not None]
        val, val_std = _mean_std([row["best_val_acc"] for row in finished])
        test, test_std = _mean_std([row["test_acc"] for row in finished if row["test_acc"] is not None])
        left_out = len(members) - len(finished)
        label = f"mean ± std (n={len(finished)}" + (f", {left_out} incomplete left out)" if left_out else ")")
        seeds = sorted({m.config.get("seed") for m in members},  # numbers in order: 2 before 10
                       key=lambda s: (not isinstance(s, int), s if isinstance(s, int) else 0, str(s)))
        rows.append({"run": label, "kind": "mean", "group": group, "status": "", "n": len(finished),
                     "options": {k: ",".join(map(str, seeds)) if k == "seed" else members[0].config.get(k)
                                 for k in options},
                     "best_val_acc": val, "best_val_acc_std": val_std, "test_acc": test, "test_acc_std": test_std})
    return options, rows


def _acc(value, std=None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def table(options: list[str], rows: list[dict]) -> tuple[list[str], list[list[str]], list[bool]]:
    """Header, cells and which columns are numbers (right-aligned)."""
    tests = any(r.get("test_acc") is not None for r in rows)
    header = ["run", *options, "status", "best val acc", "best epoch", *(["test acc"] * tests), "epochs done", "wall s",
              "train img/s"]
    numeric = [False] * (1 + len(options) + 1) + [True] * (len(header) - len(options) - 2)
    cells = []
    for r in rows:
        if r["kind"] == "mean":
            tail = ["", "", ""]
            epoch = ""
        else:
            done, planned = r["epochs_done"], r["planned"]
            epochs = str(done) if r["done"] or planned is None else f"{done}/{planned}"
            speed = "-" if r["train_images_per_s"] is None else \
                f"{r['train_images_per_s']:.1f}{CACHED if r['cached_features'] else ''}"
            tail = [epochs, f"{r['wall_s']:.1f}" if r["wall_s"] is not None else "-", speed]
            epoch = show(r["best_epoch"])
        cells.append([r["run"], *(show(r["options"][k]) for k in options), r["status"],
                      _acc(r["best_val_acc"], r.get("best_val_acc_std")), epoch,
                      *([_acc(r["test_acc"], r.get("test_acc_std"))] * tests), *tail])
    return header, cells, numeric


def text_table(header, cells, numeric) -> str:
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)).rstrip()
             for row in [header, *cells]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def markdown_table(header, cells, numeric) -> str:
    def line(row):
        return "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"
    return "\n".join([line(header), "|" + "|".join("---:" if n else "---" for n in numeric) + "|",
                      *map(line, cells)]) + "\n"


def csv_text(options: list[str], rows: list[dict]) -> str:
    """Plain numbers, unformatted: a row per run and per mean, the std and n in their own columns."""
    tests = any(r.get("test_acc") is not None for r in rows)
    fields = ["run", "kind", "status", *options, "best_val_acc", "best_val_acc_std", "best_epoch",
              *(["test_acc", "test_acc_std"] * tests), "n", "epochs_done", "wall_s", "train_images_per_s", "path"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if v is None else v for k, v in r.items()} |
                        {k: "" if v is None else v if isinstance(v, (int, float, str)) else json.dumps(v)
                         for k, v in r["options"].items()})
    return out.getvalue()


def save_picture(options: list[str], rows: list[dict], path: Path) -> None:
    """Val accuracy per epoch, one line per run; a group's runs (seeds) share a colour, differ in marker."""
    import matplotlib.pyplot as plt  # here: tl.runs.pictures imports torch, which the rest does not need

    from tl.runs.pictures import DPI, _save, short

    runs = [r for r in rows if r["kind"] == "run"]
    colors = plt.get_cmap("tab10" if len({r["group"] for r in runs}) <= 10 else "tab20").colors
    markers, seen = "osD^vP*Xph", {}
    fig, ax = plt.subplots(figsize=(11, 5), dpi=DPI)
    others = [k for k in options if k != "seed"]
    for r in runs:
        k = seen.setdefault(r["group"], [])
        k.append(r)
        label = short(r["run"], 28)
        if others and len(k) == 1:  # the group's options once, on its first run
            label += " (" + ", ".join(f"{o}={show(r['options'][o])}" for o in others) + ")"
        ax.plot([e["epoch"] for e in r["curve"]], [e["val_acc"] for e in r["curve"]],
                marker=markers[(len(k) - 1) % len(markers)], markersize=4, color=colors[r["group"] % len(colors)],
                linestyle="-" if r["done"] else "--", label=short(label, 60) if len(runs) <= 30 else None)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val accuracy")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    incomplete = sum(not r["done"] for r in runs)
    ax.set_title(f"val accuracy per epoch, {len(runs)} run{'s' * (len(runs) > 1)}"
                 + (f" ({incomplete} incomplete, dashed)" if incomplete else ""))
    if runs and len(runs) <= 30:  # beyond, a legend would hide the plot: the colours still tell the groups
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8 if len(runs) <= 15 else 6, frameon=False)
    fig.tight_layout(pad=0.5)
    _save(fig, path)


def report(paths: list[str], out: str | None = None) -> dict:
    """Read the runs, print the table, write report.md, report.csv and report.png; returns what it wrote."""
    dirs, sweep = find_runs(paths)
    # The default: the sweep given alone, else here. Never a run dir: its files are the run's own.
    target = Path(out) if out else Path(paths[0]) if sweep else Path.cwd()
    if is_run_dir(target):
        raise UserError(f"{target} is a run dir; pass --out another folder for the report")
    output_folder(target)
    runs = _unique_names([read_run(d) for d in dirs])
    options, rows = build_rows(runs)
    header, cells, numeric = table(options, rows)
    note = "" if not any(r.get("cached_features") for r in rows) else \
        (f"{CACHED} the feature cache: the head alone on backbone features computed once, not comparable with a "
         "full model's train img/s\n")
    print(text_table(header, cells, numeric) + note, end="")
    with writing():  # the three files belong together: a stop signal waits for them
        write_report(target, runs, options, rows, header, cells, numeric, note)
    print(f"wrote {REPORT_MD}, {REPORT_CSV}, {REPORT_PNG} in {target}")
    return {"options": options, "rows": rows, "header": header, "cells": cells, "out": target}


def write_report(target: Path, runs: list[Run], options, rows, header, cells, numeric, note: str) -> None:
    write_atomic(target / REPORT_MD, (f"# Runs compared\n\n{len(runs)} run{'s' * (len(runs) > 1)}: "
                                      + ", ".join(f"`{r.path}`" for r in runs) + "\n\n"
                                      + markdown_table(header, cells, numeric) + ("\n" + note if note else ""))
                                     .encode())
    write_atomic(target / REPORT_CSV, csv_text(options, rows).encode())
    save_picture(options, rows, target / REPORT_PNG)


ERRORS_ONLY = ("split", "top", "weights", "data_dir")  # options of --errors alone


def main(argv=None):
    parser = Parser(prog="python -m tl.report", description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="+", metavar="RUN_OR_SWEEP_DIR",
                        help="run dirs, or folders whose sub-folders are run dirs; with --errors, one run dir")
    parser.add_argument("--out", help="where report.md, report.csv and report.png go; default: the sweep dir "
                        "when one is given alone, else the current dir (never a run dir); with --errors, where "
                        "errors.html, errors.png and errors.json go (default: the run dir)")
    errors = parser.add_argument_group("what one run got wrong")
    errors.add_argument("--errors", action="store_true", help="evaluate the run's best.safetensors on its val (or "
                        "test) images: the highest-loss images, the most-confused class pairs, per-class accuracy "
                        "worst first; writes errors.html, errors.png, errors.json")
    errors.add_argument("--split", choices=("val", "test"), help="the images to evaluate (default val; test: "
                        "the data set's test/ folder)")
    errors.add_argument("--top", type=number(int, 1, 1000), help="how many highest-loss images to show (default 16; "
                        "errors.png shows the first 16)")
    errors.add_argument("--weights", help="the base weights file a feature-extract or lora run used, when it was a "
                        "local file (torchvision weights are found by name)")
    errors.add_argument("--data-dir", help="where the run's data set is now (default: config.json's data_dir)")

    def go():
        args = parser.parse_args(argv)  # inside run_cli: a mistake is one error line
        if not args.errors:
            given = [f"--{k.replace('_', '-')}" for k in ERRORS_ONLY if getattr(args, k) is not None]
            if given:
                raise UserError(f"{', '.join(given)} go with --errors only; add --errors and one run dir, or drop "
                                f"{'them' if len(given) > 1 else 'it'} to compare runs")
            return report(args.dirs, args.out)
        if len(args.dirs) > 1:
            raise UserError(f"--errors takes one run dir, got {len(args.dirs)}; run it once per run")
        from tl.inference.mistakes import errors_report  # here: it imports torch, which comparing runs does not need

        return errors_report(args.dirs[0], args.split or "val", args.top or 16, args.weights, args.data_dir, args.out)

    run_cli(go)


if __name__ == "__main__":
    main()
