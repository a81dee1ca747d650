"""The README's commands run as written; the commands and links of every page (README.md, docs/*.md) point
at things that exist.

Which README blocks run. Every ```bash block of README.md, top to bottom, each as one `bash -euo pipefail`
script, all in one scratch folder that looks like the checkout (its files linked in, a `.venv/bin/python`
that is this test's Python, run outputs landing in the scratch folder), with `$MNIST_DATA` pointing at
tiny generated MNIST and Fashion-MNIST files. A block must exit 0. It is skipped, with the reason, when it
needs what a test machine lacks:
  - Slurm: it says launcher=slurm, sbatch, squeue, scancel, SLURM_CONF, mnist.jobs, or make submit, dry-run,
    status, watch, logs, show, resubmit, cancel, cluster-up or cluster-down;
  - the internet or root: apt-get, pip install, ssh, mnist.data download, make data (which downloads);
  - a dataset package: /usr/share/datasets;
  - a server that does not return: tensorboard.
Inside a block that runs, the lines `make test ...` (the suite: it is running) and `make install ...` (the
set-up: it is done) are left out. Blocks of output (``` without bash) are never run.

On every page, without running anything: each `make <target>` in its code exists in the Makefile, each
`python -m <module>` names a module that runs, each relative link points to an existing file (and, with
#anchor, to one of its headings), and every page of docs/ is in the README's map.
"""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)

NEEDS = [
    ("Slurm", re.compile(r"launcher=slurm|\bsbatch\b|\bsqueue\b|\bscancel\b|SLURM_CONF|\bmnist\.jobs\b|\bmake "
                         r"(?:submit|dry-run|status|watch|logs|show|resubmit|cancel|cluster-up|cluster-down)\b")),
    ("the internet or root", re.compile(r"\bapt-get\b|\bpip install\b|\bssh\b|\bmnist\.data download\b|\bmake data\b")),
    ("a dataset package", re.compile(r"/usr/share/datasets")),
    ("a server that does not return", re.compile(r"\btensorboard\b")),
]
LEFT_OUT = re.compile(r"^\s*make (?:test|install)\b")
# the checkout's files the commands use; run outputs and the environment are the scratch folder's own
NOT_LINKED = {".git", ".venv", "outputs", "multirun", "logs", "data", "bench", ".cluster", ".pytest_cache"}

MAKE = re.compile(r"(?<![\w$(-])make\s+(?:(?:-\S+|[A-Z_]+=\S*)\s+)*([a-z][\w-]*)")
PYTHON_M = re.compile(r"(?<![\w-])(?:\S*/)?python3?\s+-m\s+([A-Za-z_][\w.]*)")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")


def blocks(page):
    """(line, language, text) of each fenced block of a page."""
    text = page.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2)) for m in FENCE.finditer(text)]


def code(page):
    """All the code a page shows: its fenced blocks and its inline `code` spans."""
    text = page.read_text()
    prose = FENCE.sub("", text)
    return "\n".join([m.group(2) for m in FENCE.finditer(text)] + re.findall(r"`([^`\n]+)`", prose))


def headings(page):
    """GitHub's anchors of a page's headings (outside code blocks)."""
    prose = FENCE.sub("", page.read_text())
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", prose, re.M)}


def why_skipped(text):
    return next((f"needs {what}" for what, pattern in NEEDS if pattern.search(text)), None)


README_BASH = [(line, text) for line, language, text in blocks(README) if language == "bash"]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory, read_only_data):
    """A scratch folder like the checkout after `make install`, and the environment to run a block in."""
    folder = tmp_path_factory.mktemp("readme")
    for entry in ROOT.iterdir():
        if entry.name not in NOT_LINKED:
            (folder / entry.name).symlink_to(entry)
    venv_bin = folder / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    python = venv_bin / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    (folder / ".venv" / ".installed").touch()  # newer than setup.cfg: make sees the set-up done
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(MNIST_DATA=str(read_only_data), PATH=f"{venv_bin}{os.pathsep}{env.get('PATH', '')}")
    return folder, env


@pytest.mark.parametrize("line, text", README_BASH, ids=[f"README.md:{line}" for line, _ in README_BASH])
def test_a_readme_block_runs_as_written(line, text, checkout):
    reason = why_skipped(text)
    if reason:
        pytest.skip(f"README.md line {line} {reason}")
    script = "\n".join(command for command in text.splitlines() if not LEFT_OUT.match(command))
    folder, env = checkout
    result = subprocess.run(["bash", "-euxo", "pipefail", "-c", script], cwd=folder, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (f"README.md line {line}: exit status {result.returncode}\n{script}\n"
                                    f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}")


def test_the_readme_runs_some_blocks_and_shows_the_command_ci_runs():
    ran = [line for line, text in README_BASH if not why_skipped(text)]
    assert len(ran) >= 3, f"only the README blocks at lines {ran} run: a first run and a sweep should"
    ci = (ROOT / ".ci" / "run").read_text().split()
    assert "make test" in " ".join(ci) and "make test" in README_BASH[0][1], \
        "the README's first block must show the test command CI runs (make test)"


def makefile_targets():
    return set(re.findall(r"^([a-z][\w-]*)\s*:(?!=)", (ROOT / "Makefile").read_text(), re.M))


def runnable(module):
    """Whether `python -m module` runs: a project module with a __main__ guard, or an installed one."""
    path = ROOT.joinpath(*module.split("."))
    if (ROOT / module.split(".")[0]).is_dir():
        source = path.with_suffix(".py") if path.with_suffix(".py").is_file() else path / "__main__.py"
        return source.is_file() and ("__main__" in source.read_text() or source.name == "__main__.py")
    return importlib.util.find_spec(module) is not None


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_make_target_and_module_a_page_shows_exists(page):
    shown = code(page)
    targets, modules = set(MAKE.findall(shown)), set(PYTHON_M.findall(shown))
    missing = sorted(f"make {t}" for t in targets - makefile_targets())
    missing += sorted(f"python -m {m}" for m in modules if not runnable(m))
    assert not missing, f"{page.relative_to(ROOT)} shows commands that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_of_a_page_points_to_a_file_and_heading(page):
    broken = []
    for link in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", link):  # https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link} (no {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target})")
        elif anchor and target.suffix == ".md" and anchor not in headings(target):
            broken.append(f"{link} (no heading #{anchor} in {target.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)} links to what is not there: {broken}"


def test_every_docs_page_is_in_the_readmes_map():
    linked = {Path(link.partition("#")[0]) for link in LINK.findall(README.read_text())}
    missing = [str(p.relative_to(ROOT)) for p in PAGES[1:] if p.relative_to(ROOT) not in linked]
    assert not missing, f"README.md's map of docs/ lacks {missing}"
