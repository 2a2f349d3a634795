"""Import ``planner`` from this checkout without installing it.

``setup.py`` installs three folders as one package (``planner/``, and ``algorithms/`` and
``gpu/`` as ``planner.algorithms`` and ``planner.gpu``). A machine where the project cannot be
pip-installed (a GPU box with no network and its own PyTorch, which the project's pins do not
match) still runs the checkout: ``use_checkout()`` puts a finder for those three names first on
``sys.meta_path``. Every other module resolves as usual.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"planner": "planner", "planner.algorithms": "algorithms", "planner.gpu": "gpu"}


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, name, path=None, target=None):
        folder = FOLDERS.get(name)
        if folder is None:
            return None
        location = self.root / folder
        return importlib.util.spec_from_file_location(name, location / "__init__.py",
                                                      submodule_search_locations=[str(location)])


def use_checkout(root: Path = ROOT) -> str:
    """Make ``import planner`` load ``root``'s sources; returns how planner is found."""
    loaded = sys.modules.get("planner")
    if loaded is not None:
        return f"already imported from {Path(loaded.__file__).parent}"
    sys.meta_path.insert(0, _CheckoutFinder(root))
    return f"from the checkout {root}"


#: a ``python -c`` prefix that does the same in a child process (run from any folder)
CHILD_PREFIX = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import checkout; checkout.use_checkout(); "
