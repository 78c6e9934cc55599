"""Sweeps: python -m tl.sweep SWEEP_FILE [--dry-run] [--index I] [--sweep-dir DIR]

A sweep file (YAML or JSON) names option sets of train.py:

    name: lr-seeds                          # the sweep's dir is runs/<name>; its W&B group
    base: {mode: feature-extract, epochs: 10}
    grid: {lr: [0.001, 0.01], seed: [0, 1, 2]}
    runs: [{optimizer: sgd}, {optimizer: adamw, lr: 0.0005}]

`base` holds every run's options; `grid` every combination of its lists (in the file's order, the
last key varying fastest); `runs` a list of option sets, each crossed with the grid when both are
given. Keys are train.py's options, as in `train.py --config`. Option set i trains in
<sweep dir>/<i>-<its values of the options that differ across the sets> (e.g. 4-lr=0.01,seed=1), as
W&B run <that name> in group <name>.

Here the runs train one after another, each in its own process; a run already done is skipped, a
stopped one resumes (--resume), so running the sweep again completes it. --index I runs set I only.
On SLURM, slurm/sweep.sbatch runs set i in array task i (through --launch-args and slurm/launch.sh).
"""

import dataclasses
import itertools
import json
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tl.core.cli import Parser, number
from tl.core.config import ACTIONS, Config, file_options, parse_args, read_mapping
from tl.core.errors import UserError, run_cli
from tl.core.stop import Stopped, Stopper
from tl.runs import rundir

KEYS = ("name", "base", "grid", "runs")


@dataclass
class Sweep:
    file: str
    name: str
    dir: Path
    sets: list[dict]  # option sets, base included
    names: list[str]  # each set's run dir name

    def argv(self, i: int) -> list[str]:
        """train.py's flags for set i, without --output-dir: an option at its default is left out."""
        defaults = {f.name: f.default for f in dataclasses.fields(Config)}
        args = []
        for name, value in ({"wandb_group": self.name} | self.sets[i]).items():
            if value == defaults[name] and type(value) is type(defaults[name]):
                continue
            flag = "--" + name.replace("_", "-")
            args += [flag] if value is True else [f"{flag}={value}"]  # `=`: a value may begin with -
        return args

    def run_dir(self, i: int) -> Path:
        return self.dir / self.names[i]

    def status(self, i: int) -> str:
        """done (a summary for all its epochs, or stopped early by --patience), started, or new."""
        path = self.run_dir(i)
        summary = rundir.read_summary(path)
        epochs = self.sets[i].get("epochs", Config.epochs)
        if summary and (summary.get("epochs", 0) >= epochs or summary.get("stop_reason") == "patience"):
            return "done"
        return "started" if path.is_dir() else "new"


def _grid(grid, source: str) -> list[dict]:
    if not isinstance(grid, dict) or not grid:
        raise UserError(f"{source}: grid must map options to lists of values, e.g. grid: {{seed: [0, 1, 2]}}")
    axes = {}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{source}: grid: {key} must be a list of values, e.g. [0, 1, 2]; got {values!r}")
        name = str(key).replace("-", "_")
        if name in axes:
            raise UserError(f"{source}: grid: {name} is given twice; keep one")
        axes[name] = [file_options({key: v}, f"{source}: grid")[name] for v in values]
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def _short(value) -> str:
    text = json.dumps(value) if isinstance(value, bool) or value is None else str(value)
    text = text.rstrip("/").rsplit("/", 1)[-1]  # a path: its last part
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)[:24]


def load(file: str, sweep_dir: str | None = None) -> Sweep:
    data = read_mapping(file, "sweep file")
    if not data:
        raise UserError(f"sweep file {file} is empty; write its name, base, grid and/or runs (see docs/sweeps.md)")
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise UserError(f"{file}: unknown key {unknown[0]!r}; a sweep file has {', '.join(KEYS)} (options go under "
                        "base, grid or runs)")
    name = data.get("name", Path(file).stem)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise UserError(f"{file}: name must be a plain name (letters, digits, . _ -), got {name!r}: it names the "
                        "sweep's dir and W&B group")
    base = data.get("base") or {}
    if not isinstance(base, dict):
        raise UserError(f"{file}: base must map options to values, e.g. base: {{epochs: 10}}")
    base = file_options(base, f"{file}: base")
    runs = data.get("runs")
    if runs is not None and (not isinstance(runs, list) or not runs or not all(isinstance(r, dict) for r in runs)):
        raise UserError(f"{file}: runs must be a list of option sets, e.g. runs: [{{lr: 0.01}}, {{lr: 0.1}}]")
    runs = [file_options(r, f"{file}: runs[{j}]") for j, r in enumerate(runs or [{}])]
    grid = _grid(data["grid"], file) if "grid" in data else [{}]
    both = sorted(set(grid[0]) & {k for r in runs for k in r})
    if both:
        raise UserError(f"{file}: {both[0]} is in both grid and runs; give it in one of them")
    sets = [base | r | g for r in runs for g in grid]
    for s in sets:
        given = [k for k in ACTIONS if k in s]
        if given:
            raise UserError(f"{file}: {given[0]} is not a sweep option: the sweep gives each run its own dir under "
                            "the sweep's and resumes stopped runs by itself")
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    full = [defaults | s for s in sets]  # what each run trains with
    keys = list(dict.fromkeys([*base, *(k for r in runs for k in r), *grid[0]]))  # the file's order
    differ = [k for k in keys if len({json.dumps(s[k]) for s in full}) > 1]
    names = [f"{i}" + ("-" if differ else "") + ",".join(f"{k.replace('_', '-')}={_short(s[k])}" for k in differ)
             for i, s in enumerate(full)]
    sweep = Sweep(file, name, Path(sweep_dir) if sweep_dir else Path("runs") / name, sets, [n[:100] for n in names])
    seen = {}
    for i, s in enumerate(full):
        key = json.dumps(s, sort_keys=True)
        if key in seen:
            raise UserError(f"{file}: option sets {seen[key]} and {i} are the same; make each run differ")
        seen[key] = i
        try:  # every set is a valid command line before any run starts (no torch needed)
            parse_args([*sweep.argv(i), f"--output-dir={sweep.run_dir(i)}"])
        except UserError as e:
            raise UserError(f"{file}: option set {i} ({sweep.names[i]}): {e}") from None
    return sweep


def dry_run(sweep: Sweep) -> None:
    n = len(sweep.sets)
    width = max(len(name) for name in sweep.names)
    print(f"sweep {sweep.name}: {n} run{'s' * (n > 1)} in {sweep.dir}, W&B group {sweep.name}")
    for i in range(n):
        options = " ".join(a for a in sweep.argv(i) if not a.startswith("--wandb-group="))
        print(f"  {sweep.names[i]:<{width}}  {sweep.status(i):<7}  {options}")
    env = f"--export ALL,SWEEP_DIR={sweep.dir} " if sweep.dir != Path("runs") / sweep.name else ""
    print(f"on SLURM: sbatch --array 0-{n - 1} {env}slurm/sweep.sbatch {sweep.file}")


def launch_args(sweep: Sweep, i: int) -> None:
    """For slurm/sweep.sbatch: the run dir, then train.py's flags, one a line."""
    lines = [str(sweep.run_dir(i)), *sweep.argv(i)]
    if any("\n" in line for line in lines):
        raise UserError(f"{sweep.file}: option set {i} has a value with a line break; remove it")
    print("\n".join(lines))


def train_one(sweep: Sweep, i: int) -> None:
    """Set i in this process, as train.py would run it (a started run resumes)."""
    path = sweep.run_dir(i)
    if sweep.status(i) == "done":
        print(f"sweep {sweep.name}: run {i + 1} of {len(sweep.sets)}, {path}: done already, skipped")
        return
    print(f"sweep {sweep.name}: run {i + 1} of {len(sweep.sets)}, {path}", flush=True)
    stopper = Stopper()  # before the slow imports, as train.py does
    from tl.train.loop import train

    started = (path / rundir.CONFIG).is_file()  # tl writes it first: an empty dir has nothing to resume
    train(parse_args([*sweep.argv(i), f"--output-dir={path}", *(["--resume"] if started else [])]), stopper)


def run_all(sweep: Sweep) -> None:
    """Every set one after another, each in a child process (fresh state, as on a cluster). A stop
    signal goes to the running child, which saves and stops; the sweep stops after it."""
    n, failed, child, stopped = len(sweep.sets), [], None, []

    def forward(signum, frame):
        stopped.append(signum)
        if child and child.poll() is None:
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)}
    try:
        for i in range(n):
            if sweep.status(i) == "done":
                print(f"sweep {sweep.name}: run {i + 1} of {n}, {sweep.run_dir(i)}: done already, skipped")
                continue
            if not stopped:
                # Its own session: a Ctrl-C reaches the child once, through forward (a second stops it at once).
                child = subprocess.Popen([sys.executable, "-m", "tl.sweep", sweep.file, "--index", str(i),
                                          "--sweep-dir", str(sweep.dir)], start_new_session=True)
                status = child.wait()  # a signal handled meanwhile does not interrupt the wait (PEP 475)
            if stopped:
                raise Stopped(stopped[0], f"sweep stopped by {signal.Signals(stopped[0]).name} in run {i + 1} of {n}; "
                              "run the same command again to continue (done runs are skipped, started ones resume)")
            if status:
                failed.append(f"{sweep.names[i]} (exit status {status})")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if failed:
        raise UserError(f"{len(failed)} of {n} runs failed: {', '.join(failed)}; their errors are above. Fix them "
                        "and run the sweep again (done runs are skipped)")
    print(f"sweep {sweep.name}: all {n} runs done in {sweep.dir}; compare them: python -m tl.report {sweep.dir}")


def main(argv=None):
    parser = Parser(prog="python -m tl.sweep", description=__doc__.split("\n")[0],
                    epilog="The sweep file's format: see docs/sweeps.md.")
    parser.add_argument("file", metavar="SWEEP_FILE", help="YAML or JSON: name, base, grid and/or runs")
    parser.add_argument("--dry-run", action="store_true", help="print the runs (dir, status, options) and the sbatch "
                        "line of the SLURM array; train nothing")
    parser.add_argument("--index", type=number(int, 0), help="run option set I only (0-based), as array task I does")
    parser.add_argument("--sweep-dir", help="where the runs' dirs go (default: runs/<name>)")
    parser.add_argument("--launch-args", action="store_true", help="with --index: print set I's run dir and "
                        "train.py flags, one a line (what slurm/sweep.sbatch passes to slurm/launch.sh)")

    def go():
        args = parser.parse_args(argv)
        sweep = load(args.file, args.sweep_dir)
        if args.index is not None and not 0 <= args.index < len(sweep.sets):
            raise UserError(f"--index {args.index}: {args.file} has {len(sweep.sets)} option sets, 0 to "
                            f"{len(sweep.sets) - 1}; submit the array as --array 0-{len(sweep.sets) - 1}")
        if args.dry_run:
            return dry_run(sweep)
        if args.launch_args:
            if args.index is None:
                raise UserError("--launch-args needs --index I")
            return launch_args(sweep, args.index)
        if args.index is not None:
            return train_one(sweep, args.index)
        return run_all(sweep)

    run_cli(go)


if __name__ == "__main__":
    main()
