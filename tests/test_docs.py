"""The docs stay true: the API reference matches the docstrings, and CI runs the README's test command."""
from __future__ import annotations

import re
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_api_reference_is_generated_from_current_docstrings() -> None:
    render = runpy.run_path(str(ROOT / "docs" / "generate_api.py"), run_name="docs")["render"]
    assert (ROOT / "docs" / "api.md").read_text() == render(), "run: python docs/generate_api.py"


def _quickstart_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", quickstart)


def test_readme_quickstart_has_exactly_two_commands() -> None:
    commands = _quickstart_commands()
    assert len(commands) == 2
    assert commands[0].startswith("pip install") and "planner plan torchvision:" in commands[0]
    assert commands[1].startswith("pip install") and commands[1].endswith("pytest -q")


def test_ci_runs_the_readme_test_command() -> None:
    assert _quickstart_commands()[1] in (ROOT / ".ci" / "run").read_text()
