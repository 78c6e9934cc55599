"""The README and docs/ as a reference that stays true: every option of Config on the options page,
only real make targets, links that resolve, commands that parse and modules that answer, and the
README's first run, run for real on a tiny set (a few seconds)."""

import dataclasses
import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT, make_imagefolder

from tl.core.config import Config, parse_args
from tl.core.errors import UserError

README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
OPTIONS_PAGE = DOCS / "options.md"
README_MAX_BYTES = 12_288
OPTIONS = {"--config", *(f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(Config))}
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", flags=re.S | re.M)


def rel(path):
    return path.relative_to(ROOT).as_posix()


def prose(text):
    """The text outside fenced blocks."""
    return FENCE.sub("", text)


def code_spans(text):
    """Inline code spans outside fenced blocks, whitespace collapsed (a span may wrap a line)."""
    return [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", prose(text))]


def fenced_lines(text):
    """Each line of every fenced block."""
    return [line for _, block in FENCE.findall(text) for line in block.splitlines()]


def command_lines():
    """(page, text) for everything that may show a command: fenced lines and inline code spans."""
    for page in PAGES:
        text = page.read_text()
        for line in [*fenced_lines(text), *code_spans(text)]:
            yield page, line


def split_command(line):
    """The words of a shown command line, without its comment; None when not a shell line."""
    try:
        return shlex.split(line, comments=True)
    except ValueError:  # not a shell line (prose with an odd quote)
        return None


def test_readme_is_short_and_every_page_is_linked_from_it():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes, more than {README_MAX_BYTES}: move text to docs/"
    assert len(PAGES) > 1, "no docs/*.md pages"
    linked = {(ROOT / target).resolve() for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())}
    unlinked = [rel(p) for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_every_option_is_on_the_options_page():
    page = OPTIONS_PAGE.read_text()
    missing = [flag for flag in sorted(OPTIONS) if not re.search(rf"`{re.escape(flag)}[`\s]", page)]
    assert not missing, f"options missing from {rel(OPTIONS_PAGE)}: {missing}"


def test_only_real_make_targets():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-zA-Z][\w-]*):", makefile, flags=re.M))
    shows_make_test = re.search(r"^make test(?![\w-])", README.read_text(), flags=re.M)
    assert shows_make_test, "the README must show `make test` (the command CI runs)"
    wrong = {f"{rel(p)}: make {name}" for p in PAGES for name in re.findall(r"\bmake ([a-z][\w-]*)", p.read_text())
             if name not in targets}
    assert not wrong, f"make targets not in the Makefile: {sorted(wrong)}"


def anchors(page):
    """GitHub's anchors of a page's headings (outside fenced blocks)."""
    heads = re.findall(r"^#{1,6} (.+)$", prose(page.read_text()), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_every_local_link_and_anchor_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path) if path else page
            if not dest.exists():
                broken.append(f"{rel(page)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{rel(page)}: {target} (no such heading)")
    assert not broken, broken


def test_repository_paths_in_commands_exist():
    paths = {(rel(page), p) for page in PAGES
             for p in re.findall(r"\b((?:accelerate_configs|slurm)/[\w.-]+\.(?:yaml|sh|sbatch))", page.read_text())}
    assert paths
    assert [f"{page}: {p}" for page, p in sorted(paths) if not (ROOT / p).is_file()] == []


def train_argv(words):
    """The options after train.py of a shown command that runs it (python, accelerate launch, torchrun)."""
    if not words or "train.py" not in words:
        return None
    launcher = os.path.basename(words[0])
    if not (launcher.startswith("python") or launcher in ("accelerate", "torchrun")):
        return None
    argv = words[words.index("train.py") + 1:]
    for stop in ("|", "&&", ";", ">", "2>&1"):
        argv = argv[:argv.index(stop)] if stop in argv else argv
    return argv


def make_and_slurm_argv(words):
    """train.py options passed through make's ARGS= or SLURM's TRAIN_ARGS= (in --export ALL,...), SLURM's
    $VARIABLES standing for 0."""
    for word in words or ():
        m = re.search(r"(?:^|,)(?:TRAIN_)?ARGS=(.*)$", word)
        if m:
            yield re.sub(r"\$\{?SLURM_\w+\}?", "0", m.group(1)).split()


def test_shown_train_commands_parse(tmp_path):
    config = tmp_path / "empty.yaml"  # --config FILE: parse_args reads it; an empty file adds nothing
    config.write_text("")
    shown, failed = 0, []
    for page, line in command_lines():
        words = split_command(line)
        for argv in [train_argv(words), *make_and_slurm_argv(words)]:
            if argv is None or "--help" in argv:  # --help prints and exits
                continue
            argv = [str(config) if i and argv[i - 1] == "--config" else a for i, a in enumerate(argv)]
            shown += 1
            inexact = [a.split("=")[0] for a in argv if a.startswith("--") and a.split("=")[0] not in OPTIONS]
            if inexact:  # argparse takes --epoch for --epochs; a page shows the full name
                failed.append(f"{rel(page)}: {line} -> not option names: {inexact}")
            try:
                parse_args(argv)
            except (UserError, SystemExit) as e:
                failed.append(f"{rel(page)}: {line} -> {e}")
    assert shown >= 5, f"found only {shown} train.py command lines"
    assert not failed, failed


def test_shown_sweep_file_has_real_options():
    import yaml

    from tl.core.config import file_options

    blocks = [b for p in PAGES for lang, b in FENCE.findall(p.read_text()) if lang == "yaml" and "grid:" in b]
    assert blocks, "no sweep file shown"
    for block in blocks:
        sweep = yaml.safe_load(block)
        file_options(sweep["base"], "base")
        file_options({k: v[0] for k, v in sweep["grid"].items()}, "grid")


# Runs `python -m MODULE --help` for each module named on the command line, as -m does (runpy), in one
# process so that torch is imported once; prints each one's exit status and output between markers.
HELP_DRIVER = """
import contextlib, io, runpy, sys
for module in sys.argv[1:]:
    sys.argv, out, code = [module, "--help"], io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException as e:
            print(repr(e)); code = 1
    print(f"=== {module} {code}\\n{out.getvalue()}")
"""


def first_run_section():
    text = README.read_text()
    section = re.search(r"^## First run\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert section, "README.md has no '## First run' section"
    blocks = FENCE.findall(section.group(1))
    command = next(b.strip() for lang, b in blocks if lang == "bash")
    listing = next(b for lang, b in blocks if b.startswith("$ ls "))
    printed = next(b for lang, b in blocks if lang == "text" and not b.startswith("$ "))
    return command, printed.splitlines(), listing.splitlines()[1].split()


def words(line):
    """A printed line's words: numbers, paths and the precision's value (bf16 or no) left out."""
    line = re.sub(r"precision \S+", "precision", line)
    line = re.sub(r"\S*/\S*", " ", line)
    return re.findall(r"[A-Za-z][A-Za-z_'&-]*", line)


def test_first_run_prints_and_writes_what_the_readme_shows(tmp_path, modules_help):
    command, printed, listed = first_run_section()
    words_of_command = shlex.split(command)
    assert words_of_command[:1] == ["make"], command
    data = make_imagefolder(tmp_path / "data", classes=("ants", "bees"), n_train=8, n_val=4, size=72)
    out = tmp_path / "run"
    overrides = f"--epochs 1 --image-size 64 --batch-size 8 --weights none --wandb disabled --output-dir {out}"
    dry = subprocess.run([*words_of_command, "-n", f"VENV={sys.prefix}", f"DATA_DIR={data}", f"ARGS={overrides}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    launch = [line for line in dry.stdout.splitlines() if "train.py" in line]
    assert len(launch) == 1, dry.stdout
    user_env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # as a shell has it (see conftest)
    run = subprocess.run(shlex.split(launch[0]), cwd=ROOT, capture_output=True, text=True, timeout=240,
                         env={**user_env, "PYTHONUNBUFFERED": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    actual = [words(line) for line in re.split(r"[\r\n]", run.stdout + run.stderr)]
    missing = [line for line in printed if line.strip() and not line.startswith("W&B:")  # W&B: disabled here
               and words(line) not in actual]
    assert not missing, f"lines the README shows but the run did not print: {missing}\n{run.stdout}"
    wrote = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    listed = {name for name in listed if not name.startswith("wandb")}  # wandb/, wandb_run_id: W&B's
    assert wrote == listed, f"written, not in the README's ls: {wrote - listed}; listed, not written: {listed - wrote}"


def shown_modules():
    """{module: the options the shown lines pass it} for every `python -m tl.X` shown."""
    shown = {}
    for _, line in command_lines():
        for module, rest in re.findall(r"-m (tl\.\w+)([^`\n]*)", line):
            rest = rest.split("#")[0]
            shown.setdefault(module, set()).update(re.findall(r"(?<![\w-])--[a-z][\w-]*", rest))
    return shown


@pytest.fixture(scope="module")
def modules_help():
    """The --help of every module shown, started once in the background: the first run overlaps it."""
    shown = shown_modules()
    return shown, subprocess.Popen([sys.executable, "-c", HELP_DRIVER, *sorted(shown)], cwd=ROOT, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_modules_answer_help(modules_help):
    """Each `python -m tl.X` shown answers --help with exit 0, naming the options the shown lines pass it."""
    shown, proc = modules_help
    assert len(shown) >= 4, shown
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    helps = {m: (int(code), out) for m, code, out in
             re.findall(r"^=== (\S+) (\d+)\n(.*?)(?=^=== |\Z)", stdout, flags=re.S | re.M)}
    assert set(helps) == set(shown), stdout
    wrong = [f"{m} --help exited {code}: {out[-500:]}" for m, (code, out) in helps.items() if code]
    wrong += [f"{m}: {opt} is not in its --help" for m, opts in shown.items() for opt in sorted(opts)
              if opt not in helps[m][1]]
    assert not wrong, wrong


def test_layout_lists_the_modules_as_they_are():
    """docs/development.md's Layout has a paragraph per tl/ subpackage naming each of its modules, and
    one for the commands: move, add or delete a module, update it."""
    page = DOCS / "development.md"
    layout = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", page.read_text(), flags=re.S | re.M)
    assert layout, f"{rel(page)} has no Layout section"
    paragraphs = {m.group(1): m.group(2) for m in
                  re.finditer(r"^\*\*`?([^*`]+?)`?\*\*(.*?)(?=^\*\*|\Z)", layout.group(1), flags=re.S | re.M)}
    packages = sorted(p.parent.name for p in (ROOT / "tl").glob("*/__init__.py"))
    wrong = []
    for name in packages:
        text = paragraphs.get(f"tl/{name}/")
        if text is None:
            wrong.append(f"no paragraph for tl/{name}/")
            continue
        named = set(re.findall(r"`(\w+\.py)`", text))
        actual = {p.name for p in (ROOT / "tl" / name).glob("*.py") if p.name != "__init__.py"}
        wrong += [f"tl/{name}/: missing {sorted(actual - named)}, gone {sorted(named - actual)}"] * (named != actual)
    named = set(re.findall(r"`((?:tl/)?\w+\.py)`", paragraphs.get("Commands", "")))
    actual = {rel(p) for p in (ROOT / "tl").glob("*.py") if p.name != "__init__.py"} | {"train.py"}
    wrong += [f"Commands: missing {sorted(actual - named)}, gone {sorted(named - actual)}"] * (named != actual)
    assert not wrong, f"{rel(page)} Layout: {wrong}"


def test_troubleshooting_names_real_test_files():
    page = DOCS / "troubleshooting.md"
    named = set(re.findall(r"\btest_\w+", page.read_text()))
    assert named, f"{rel(page)} names no test file"
    assert sorted(n for n in named if not (ROOT / "tests" / f"{n}.py").is_file()) == []
