"""Parsing user budgets: bytes, size strings ('6GiB') or a percentage of the store-all peak."""
from __future__ import annotations

import math
import re

from planner.errors import InvalidBudgetError

_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
    "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40,
}
_QUANTITY = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
_FRACTION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*%\s*$")
ACCEPTED_FORMS = "an int of bytes, a size string such as '6GiB', '512MB' or '1.5e9', or a percentage of the store-all peak such as '50%'"


def parse_budget(budget: int | float | str, reference_bytes: int | None = None) -> int:
    """Turn a user budget into bytes.

    Percentages need ``reference_bytes`` (the store-all peak). Raises ``InvalidBudgetError`` (a
    ``ValueError``) naming the accepted forms for anything unparseable, negative, zero or not finite.
    """
    if isinstance(budget, bool):
        raise InvalidBudgetError(f"budget {budget!r} is not a size: give {ACCEPTED_FORMS}")
    if isinstance(budget, (int, float)):
        value = float(budget)
    elif isinstance(budget, str):
        fraction = _FRACTION.match(budget)
        if fraction:
            if reference_bytes is None:
                raise InvalidBudgetError(f"budget {budget!r} is a percentage, which needs the store-all peak")
            value = float(fraction.group(1)) / 100.0 * reference_bytes
        else:
            quantity = _QUANTITY.match(budget)
            unit = quantity.group(2).upper() if quantity else None
            if not quantity or unit not in _UNITS:
                raise InvalidBudgetError(f"cannot read budget {budget!r}: give {ACCEPTED_FORMS}")
            value = float(quantity.group(1)) * _UNITS[unit]
    else:
        raise InvalidBudgetError(f"budget of type {type(budget).__name__} is not accepted: give {ACCEPTED_FORMS}")
    if not math.isfinite(value) or value < 1:
        raise InvalidBudgetError(f"budget {budget!r} must be a finite size of at least one byte: give {ACCEPTED_FORMS}")
    return int(value)
