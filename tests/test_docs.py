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


def test_architecture_lists_every_registered_variant() -> None:
    """The variants table of docs/architecture.md names exactly the registry's variants, each with
    what its backward reads and whether its gradients are bitwise stock, as its ``Variant`` says."""
    from planner.variants import VARIANTS

    section = (ROOT / "docs" / "architecture.md").read_text().split("## Low-memory variants", 1)[1].split("\n## ", 1)[0]
    rows = {m.group(1): (m.group(2), m.group(3)) for m in re.finditer(r"^\| `(\w+)` \| (.+) \| (.+) \|$", section, re.M)}
    assert set(rows) == set(VARIANTS)
    for name, variant in VARIANTS.items():
        reads, gradients = rows[name]
        assert reads == variant.backward_reads, name
        assert (gradients == "bitwise stock") == variant.bitwise, name
