"""The documentation cannot drift from the programs: its commands are run.

- Every `python src/<program>.py ...` line of a command block marked ```bash embedded in README.md and
  docs/*.md runs as written, in process (`run_program` for run / calibrate / bench, the `main` of
  src/viz.py and src/sweep.py), in a temporary working directory where `outputs/` lands; the lines of one
  page run in order in one directory (a later line may read an earlier one's outputs). A failure names
  the page and line.
- Every other `python src/(run|calibrate|bench).py` line (shown for real models) passes the command-line
  check the program does first: its group choices and keys exist and it composes.
- The Python snippet of README.md and docs/usage.md runs against the embedded checkpoint (its `path = ...`
  is the one thing changed).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline_fixtures import REPO, run_program, script_main
from pore.app import precheck
from pore.app.cli import CONFIG_DIR

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
HYDRA_PROGRAMS = {"run": "config", "calibrate": "calibrate", "bench": "bench"}
ARGPARSE_PROGRAMS = ("viz", "sweep", "compare")
FENCE = re.compile(r"^```(\S*)\s*(.*)$")
ENVIRONMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")
# Shown for a user to fill in (or with a plug-in folder of the user's): not a command as written.
PLACEHOLDERS = ("<", "...", "$", "plugins=")
EMBEDDED_MODEL = REPO / "assets" / "tiny-llava"


@dataclass(frozen=True)
class Command:
    page: Path
    line: int  # where the command starts (1-based)
    text: str  # as written, continuation lines joined
    embedded: bool  # in a block marked ```bash embedded

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    def split(self) -> tuple[dict[str, str], str, list[str]]:
        """(environment assignments, program name, its arguments) of `VAR=1 python src/<program>.py ...`."""
        words = shlex.split(self.text, comments=True)
        env = {}
        while words and ENVIRONMENT.match(words[0]):
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        if len(words) < 2 or words[0] != "python" or not re.fullmatch(r"src/\w+\.py", words[1]):
            raise ValueError(f"{self.where}: not a `python src/<program>.py ...` command: {self.text}")
        return env, Path(words[1]).stem, words[2:]


def blocks(page: Path) -> list[tuple[str, int, list[str]]]:
    """(info string, line of the first content line, its lines) of each fenced block."""
    found, info, start, lines = [], None, 0, []
    for number, line in enumerate(page.read_text().splitlines(), start=1):
        fence = FENCE.match(line)
        if fence and info is None:
            info, start, lines = " ".join(part for part in fence.groups() if part), number + 1, []
        elif line.startswith("```") and info is not None:
            found.append((info, start, lines))
            info = None
        elif info is not None:
            lines.append(line)
    return found


def commands(page: Path) -> list[Command]:
    """The commands of the page's bash blocks, continuation lines (ending in `\\`) joined."""
    found = []
    for info, start, lines in blocks(page):
        if info.split()[:1] != ["bash"]:
            continue
        embedded = info.split()[1:] == ["embedded"]
        text, first = "", 0
        for offset, line in enumerate(lines):
            if not text:
                first = start + offset
            text += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith("\\") else line
            if line.rstrip().endswith("\\"):
                continue
            if text.strip() and not text.lstrip().startswith("#"):
                found.append(Command(page, first, text.strip(), embedded))
            text = ""
    return found


def embedded_pages() -> list[Path]:
    return [page for page in PAGES if any(command.embedded for command in commands(page))]


def run(command: Command) -> tuple[int, str]:
    """Exit status and the end of the output of the command, run in this process."""
    env, program, argv = command.split()
    if program in HYDRA_PROGRAMS:
        result = run_program(*argv, program=program, env=env)
        return result.returncode, (result.stdout + result.stderr)[-2000:]
    assert program in ARGPARSE_PROGRAMS, f"{command.where}: unknown program {program}"
    try:
        return script_main(program)(argv), ""
    except SystemExit as exit:
        return (exit.code if isinstance(exit.code, int) else 1), str(exit.code)


def test_the_pages_mark_commands_that_run_on_the_embedded_model() -> None:
    marked = {page.relative_to(REPO).as_posix() for page in embedded_pages()}
    assert {"README.md", "docs/usage.md", "docs/sweeps.md", "docs/pore_presets.md"} <= marked
    for page in PAGES:
        for command in commands(page):
            if command.embedded:
                command.split()  # only `python src/<program>.py` commands in an embedded block


# docs/sweeps.md runs a sweep, whose trials are subprocesses (the runner's design): a slow test.
SUBPROCESS_PAGES = ("sweeps.md",)


@pytest.mark.parametrize(
    "page",
    [
        pytest.param(page, marks=[pytest.mark.slow] if page.name in SUBPROCESS_PAGES else [], id=page.name)
        for page in embedded_pages()
    ],
)
def test_every_embedded_command_runs_as_written(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In a fresh working directory that has the repository's `src/` and `sweeps/` (what the commands name
    relative to the repository root), one thread per process, offline."""
    for name in ("src", "sweeps"):
        (tmp_path / name).symlink_to(REPO / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    failures = []
    for command in [command for command in commands(page) if command.embedded]:
        status, output = run(command)
        capsys.readouterr()  # the programs' output is long: keep only what a failure needs
        if status != 0:
            failures.append(f"{command.where}: `{command.text}` exited {status}:\n{output}")
    assert not failures, "\n\n".join(failures)


def shown_commands() -> list[Command]:
    """The commands for real models that can be checked as written (no placeholder to fill in)."""
    found = []
    for page in PAGES:
        for command in commands(page):
            words = command.text.split()
            program = next((word for word in words if re.fullmatch(r"src/\w+\.py", word)), "")
            if command.embedded or Path(program).stem not in HYDRA_PROGRAMS:
                continue
            if not any(mark in command.text for mark in PLACEHOLDERS):
                found.append(command)
    return found


def test_the_commands_shown_for_real_models_pass_the_command_line_check() -> None:
    """Their group choices and keys exist and they compose (what the program checks before anything)."""
    checked = shown_commands()
    assert len(checked) >= 20
    problems = []
    for command in checked:
        words = shlex.split(command.text, comments=True)
        at = next(index for index, word in enumerate(words) if re.fullmatch(r"src/\w+\.py", word))
        program, argv = Path(words[at]).stem, words[at + 1 :]  # after a launcher (srun ...) too
        message = precheck.command_line_message(argv, CONFIG_DIR, HYDRA_PROGRAMS[program])
        if message:
            problems.append(f"{command.where}: `{command.text}`: {message}")
    assert not problems, "\n".join(problems)


def python_snippets() -> list[tuple[Path, str]]:
    """The pages' Python blocks that use the Pruner on a checkpoint (`path = "..."`)."""
    found = []
    for page in (REPO / "README.md", REPO / "docs" / "usage.md"):
        for info, _, lines in blocks(page):
            code = "\n".join(lines)
            if info == "python" and "Pruner(" in code:
                found.append((page, code))
    return found


@pytest.mark.parametrize("page, code", python_snippets(), ids=lambda value: getattr(value, "name", "code"))
def test_the_python_snippet_runs_on_the_embedded_checkpoint(
    page: Path, code: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = re.search(r'^path = "([^"]+)"', code, flags=re.MULTILINE)
    assert written is not None, f'{page.name}: the snippet names its checkpoint in `path = "..."`'
    monkeypatch.chdir(REPO)  # the snippet reads the shipped benchmark from the repository root
    namespace: dict = {}
    exec(compile(code.replace(written.group(0), f'path = "{EMBEDDED_MODEL}"'), str(page), "exec"), namespace)
    assert len(namespace["answers"]) == len(namespace["images"]) == len(namespace["prompts"]) == 2
    kept = namespace["pruner"].last_record.kept_raster
    assert [len(per_image[0]) for per_image in kept] == [64, 64]  # keep=64 of the embedded model's 64
