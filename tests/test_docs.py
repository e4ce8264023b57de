"""Every console block in README.md and docs/*.md is run, and its output matches what the code prints.

A console block is a fenced block marked ``console``: lines starting with
``$ `` are commands, the lines after one are its output.  ``layerpipe
schedule``, ``simulate`` and ``compare`` are run as written and compared line
for line.  ``layerpipe train`` takes minutes at its defaults, so it is run
with a few steps of a small model and compared by shape: each shown line,
with its numbers written as ``#``, must be a line the run printed (a shown
``...`` stands for lines left out; the generated sample after ``sample:`` and
the progress bar are not compared).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
QUICK_TRAIN = [
    "--steps",
    "3",
    "--batch-size",
    "8",
    "--block-size",
    "16",
    "--width",
    "32",
    "--blocks",
    "2",
    "--sample-length",
    "20",
]


def console_commands(page: Path) -> list[tuple[str, list[str]]]:
    """Return ``(command, shown output lines)`` for every ``$`` line of the page's console blocks."""
    found: list[tuple[str, list[str]]] = []
    inside = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            inside = line.strip() == "```console" and not inside
            continue
        if not inside:
            continue
        if line.startswith("$ "):
            found.append((line[2:].strip(), []))
        elif found:
            found[-1][1].append(line)
    return [(command, _trimmed(output)) for command, output in found]


def _trimmed(lines: list[str]) -> list[str]:
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    return lines


CASES = [(page, command, output) for page in PAGES for command, output in console_commands(page)]


def _run(command: str, extra: list[str] = (), cwd: Path | None = None) -> str:
    words = command.split()
    assert words[0] == "layerpipe", f"console blocks run the layerpipe command only: {command}"
    run = subprocess.run(
        [sys.executable, "-m", "layerpipe", *words[1:], *extra], capture_output=True, text=True, cwd=cwd, timeout=600
    )
    assert run.returncode == 0, f"{command} failed:\n{run.stderr}"
    return run.stdout


def _shape(line: str) -> str:
    return re.sub(r"\d[\d,.]*", "#", line.strip())


def test_the_pages_have_console_blocks():
    assert any(command.startswith("layerpipe train") for _, command, _ in CASES)
    assert any(command.startswith("layerpipe schedule") for _, command, _ in CASES)


@pytest.mark.parametrize(
    "page, command, shown",
    [case for case in CASES if not case[1].startswith("layerpipe train")],
    ids=lambda value: value.name if isinstance(value, Path) else None,
)
def test_a_console_block_prints_what_the_page_shows(page, command, shown, tmp_path):
    assert _run(command, cwd=tmp_path).splitlines() == shown, f"{page.name}: {command}"


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "page, command, shown",
    [case for case in CASES if case[1].startswith("layerpipe train")],
    ids=lambda value: value.name if isinstance(value, Path) else None,
)
def test_a_train_console_block_has_the_shape_of_what_train_prints(page, command, shown, tmp_path):
    printed = {_shape(line) for line in _run(command, QUICK_TRAIN, cwd=tmp_path).splitlines()}
    for line in shown:
        if line.strip().startswith("sample:"):
            break
        if line.strip() in ("", "...") or "|" in line:
            continue
        assert _shape(line) in printed, f"{page.name}: `{line}` is not a line layerpipe train prints"


def python_blocks(page: Path) -> list[str]:
    """Return the page's fenced ``python`` blocks, in order."""
    return re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), flags=re.S | re.M)


@pytest.mark.parametrize("page", [ROOT / "docs" / "operators.md"], ids=lambda page: page.name)
def test_the_python_examples_run_and_print_what_their_comments_say(page, capsys):
    """The blocks run in order in one namespace; ``print(...)  # shown`` must print ``shown`` (up to a ``: `` note)."""
    namespace: dict = {}
    for block in python_blocks(page):
        exec(compile(block, str(page), "exec"), namespace)
        printed = capsys.readouterr().out.splitlines()
        prints = [line for line in block.splitlines() if line.startswith("print(")]
        assert len(printed) == len(prints), (prints, printed)
        for line, found in zip(prints, printed):
            if "  # " in line:
                assert found == line.split("  # ", 1)[1].split(": ", 1)[0], (line, found)
