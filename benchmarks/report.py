"""Shared by the benchmark scripts: the environment line, the command line, and writing one
section of docs/benchmarks.md without touching the others."""
from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
from pathlib import Path
from typing import Sequence

import torch

ANALYSIS_HEADING = "### Analysis"  # hand-written, last in a section; kept when the section is rewritten
DEFAULT_FILE_PREAMBLE = "# Benchmarks\n\nNumbers written by the scripts in `benchmarks/`.\n\n"


def environment_line() -> str:
    import torchvision

    return (f"Run on {datetime.date.today().isoformat()}, torch {torch.__version__}, "
            f"torchvision {torchvision.__version__}, Python {platform.python_version()}, "
            f"{os.cpu_count()} CPU cores, CPU only.")


def command_line(argv: Sequence[str]) -> str:
    script = Path(argv[0])
    try:
        script = script.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    return shlex.join(["python", str(script), *argv[1:]])


_FENCE = re.compile(r"^\s*(```|~~~)")


def _section_bounds(lines: list[str], heading: str) -> tuple[int, int] | None:
    """Line range [start, end) of the section under ``heading``: up to the next level-2 (or level-1)
    heading outside code fences, or the end of the file."""
    start = None
    in_fence = False
    for index, line in enumerate(lines):
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        if start is None:
            if line.rstrip() == heading:
                start = index
        elif line.startswith("## ") or line.startswith("# "):
            return start, index
    return None if start is None else (start, len(lines))


def write_section(path: Path, heading: str, body: str, preamble: str = DEFAULT_FILE_PREAMBLE) -> None:
    """Replace the text of section ``heading`` in ``path`` with ``body``; other sections are kept.

    A missing file is created with ``preamble``; a missing section is appended at the end.
    """
    section = f"{heading}\n\n{body.rstrip()}\n"
    text = path.read_text(encoding="utf-8") if path.exists() else preamble
    lines = text.splitlines(keepends=True)
    bounds = _section_bounds(lines, heading)
    if bounds is None:
        new_text = text.rstrip("\n") + "\n\n" + section
    else:
        start, end = bounds
        following = "".join(lines[end:])
        new_text = "".join(lines[:start]) + section + ("\n" + following if following else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new_text, encoding="utf-8")


def kept_analysis(path: Path, heading: str) -> str | None:
    """The hand-written analysis at the end of section ``heading`` of ``path``, to carry over on a rewrite."""
    if not path.exists():
        return None
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    bounds = _section_bounds(lines, heading)
    if bounds is None:
        return None
    section = lines[bounds[0]:bounds[1]]
    start = next((i for i, line in enumerate(section) if line.rstrip() == ANALYSIS_HEADING), None)
    return None if start is None else "".join(section[start:]).rstrip()


def publish(heading: str, body: str, markdown: Path | None) -> None:
    """Print a section, and write it into ``markdown`` (docs/benchmarks.md) when given, keeping
    the section's hand-written analysis (``ANALYSIS_HEADING``), which the reader should then check."""
    print(f"{heading}\n\n{body}")
    if markdown is not None:
        analysis = kept_analysis(markdown, heading)
        write_section(markdown, heading, body.rstrip() + ("\n\n" + analysis if analysis else ""))
