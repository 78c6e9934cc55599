"""The README as a reference: every option of Config, every make target it names, every local link."""

import dataclasses
import re

from conftest import ROOT

from tl.config import Config


def test_readme_names_every_option_and_only_real_make_targets_and_files():
    readme = (ROOT / "README.md").read_text()
    missing = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(Config)
               if not re.search(rf"`{re.escape('--' + f.name.replace('_', '-'))}[`\s]", readme)]
    assert not missing, f"options missing from README.md: {missing}"

    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-zA-Z][\w-]*):", makefile, flags=re.M))
    named = set(re.findall(r"\bmake ([a-z][\w-]*)", readme))
    assert named, "the README names no make target"
    assert named <= targets, f"make targets in README.md but not in the Makefile: {sorted(named - targets)}"

    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", readme)
    assert [link for link in links if not (ROOT / link).exists()] == [], links
