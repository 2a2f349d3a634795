"""The package's structure holds: public names do not shadow modules, private PyTorch APIs stay in
their boundary modules."""
from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import planner


def test_public_names_do_not_shadow_submodules() -> None:
    """``planner.plan`` (the function) and a module ``planner/plan.py`` cannot both exist:
    ``import planner.plan as m`` would give the function once ``planner/__init__`` rebinds it."""
    submodules = {info.name for info in pkgutil.iter_modules(planner.__path__)}
    clashes = sorted(name for name in planner.__all__ if name in submodules)
    assert not clashes, f"public names that shadow a submodule of planner: {clashes}"


# ---- private PyTorch APIs: only in the boundary modules -----------------------------------------
ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("planner", "algorithms", "gpu", "benchmarks")
#: the modules that wrap torch internals, each saying in its docstring which
BOUNDARIES = {"planner/_aot.py", "planner/_torch.py", "benchmarks/_compile_internals.py"}


def _is_private(dotted: str) -> bool:
    """``torch._ops``, ``torch.utils._pytree.tree_map``: a component after ``torch`` starts with
    ``_`` (dunders such as ``__version__`` and ATen op names under ``torch.ops`` are public)."""
    parts = dotted.split(".")
    if parts[0] != "torch" or parts[1:2] == ["ops"]:
        return False
    return any(p.startswith("_") and not p.startswith("__") for p in parts[1:])


def _dotted(node: ast.AST) -> str | None:
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(names)])
    return None


def private_torch_uses(source: str) -> list[tuple[int, str]]:
    """(line, what) for every private torch import, ``torch._x`` attribute and ``._schema`` read."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if _is_private(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if _is_private(node.module) or (node.module.split(".")[0] == "torch"
                                            and any(_is_private(f"{node.module}.{a.name}") for a in node.names)):
                found.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            if node.attr == "_schema" or (dotted and _is_private(dotted) and not _is_private(dotted.rsplit(".", 1)[0])):
                found.append((node.lineno, dotted or f"._{node.attr.lstrip('_')}"))
    return sorted(found)


def test_the_scanner_finds_each_form() -> None:
    source = ("import torch._functorch.config as c\nfrom torch.utils._pytree import tree_map\n"
              "from torch.utils import _pytree\nx = torch._C._autograd.f()\ny = op._schema.returns\n"
              "z = torch.ops.aten._softmax.default\nv = torch.__version__\n")
    assert [line for line, _ in private_torch_uses(source)] == [1, 2, 3, 4, 5]


def test_private_torch_apis_only_in_boundary_modules() -> None:
    """Private PyTorch APIs change between releases without notice; keeping them in the boundary
    modules makes a new release a change in those files alone."""
    offenders = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if relative not in BOUNDARIES:
                offenders += [f"{relative}:{line}: {what}" for line, what in private_torch_uses(path.read_text())]
    assert not offenders, ("private torch APIs outside " + ", ".join(sorted(BOUNDARIES)) + " (move them there):\n"
                           + "\n".join(offenders))
