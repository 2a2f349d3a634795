"""The package's structure holds: public names do not shadow modules."""
from __future__ import annotations

import pkgutil

import planner


def test_public_names_do_not_shadow_submodules() -> None:
    """``planner.plan`` (the function) and a module ``planner/plan.py`` cannot both exist:
    ``import planner.plan as m`` would give the function once ``planner/__init__`` rebinds it."""
    submodules = {info.name for info in pkgutil.iter_modules(planner.__path__)}
    clashes = sorted(name for name in planner.__all__ if name in submodules)
    assert not clashes, f"public names that shadow a submodule of planner: {clashes}"
