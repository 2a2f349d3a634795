"""Budget parsing and byte formatting."""
from __future__ import annotations

import pytest

from planner import format_bytes, parse_budget
from planner.budgets import ACCEPTED_FORMS


@pytest.mark.parametrize("text, expected", [
    ("6GiB", 6 * 2**30),
    ("512MB", 512 * 10**6),
    ("1.5e9", 1_500_000_000),
    ("1.5GB", 1_500_000_000),
    ("2 KiB", 2048),
    ("2kib", 2048),
    ("3G", 3 * 2**30),
    ("100B", 100),
    ("100", 100),
    ("  7 MiB ", 7 * 2**20),
    ("1TB", 10**12),
    (".5KiB", 512),
])
def test_size_strings(text: str, expected: int) -> None:
    assert parse_budget(text) == expected


def test_numbers() -> None:
    assert parse_budget(4096) == 4096
    assert parse_budget(1.5e9) == 1_500_000_000
    assert isinstance(parse_budget(1.5e9), int)


def test_percentages() -> None:
    assert parse_budget("50%", reference_bytes=1000) == 500
    assert parse_budget("100%", 1000) == 1000
    assert parse_budget(" 12.5 % ", 8000) == 1000
    assert parse_budget("150%", 1000) == 1500


def test_percentage_needs_a_reference() -> None:
    with pytest.raises(ValueError, match="store-all peak"):
        parse_budget("50%")


@pytest.mark.parametrize("bad", [0, -1, -2.5, "abc", float("nan"), float("inf"), "5 parsecs", "", "-5GB",
                                 "0GiB", "0%", "1e400", "GB", "6 GiB extra", True, None, [1], b"6GB"])
def test_rejected_budgets_name_the_accepted_forms(bad: object) -> None:
    with pytest.raises(ValueError) as info:
        parse_budget(bad, reference_bytes=1000)
    assert ACCEPTED_FORMS in str(info.value)
    assert "6GiB" in str(info.value) and "50%" in str(info.value)


@pytest.mark.parametrize("tiny", [0.5, "0.5B", "0.01%"])
def test_budget_below_one_byte_is_not_zero(tiny: object) -> None:
    """A budget that rounds down to zero bytes must be refused, as zero itself is."""
    try:
        value = parse_budget(tiny, reference_bytes=1000)
    except ValueError as error:
        assert ACCEPTED_FORMS in str(error)
    else:
        assert value > 0


def test_format_bytes() -> None:
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(6 * 2**30) == "6.00 GiB"
    assert format_bytes(3 * 2**40) == "3.00 TiB"
    assert format_bytes(5 * 2**50) == "5120.00 TiB"
    assert format_bytes(-2048) == "-2.00 KiB"
