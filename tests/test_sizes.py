from __future__ import annotations

import pytest

from memguard.sizes import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0, 0),
        (1234, 1234),
        ("1234", 1234),
        ("512MiB", 512 * 1024**2),
        ("512 MiB", 512 * 1024**2),
        ("512mib", 512 * 1024**2),
        ("1.5GB", 1_500_000_000),
        ("1.5GiB", int(1.5 * 1024**3)),
        ("64k", 65536),
        ("64K", 65536),
        ("64kB", 64000),
        ("2g", 2 * 1024**3),
        ("400Mi", 400 * 1024**2),
        ("10B", 10),
        ("1TiB", 1024**4),
    ],
)
def test_parse_size(text: int | str, expected: int) -> None:
    assert parse_size(text) == expected


def test_percentage_is_a_fraction_of_the_total() -> None:
    assert parse_size("80%", total=1000) == 800
    assert parse_size("25 %", total=400 * 1024**2) == 100 * 1024**2
    assert parse_size("12.5%", total=800) == 100


def test_percentage_without_total_names_the_problem() -> None:
    with pytest.raises(ValueError, match=r"'80%'.*known total"):
        parse_size("80%")


@pytest.mark.parametrize("bad", ["", "abc", "12XB", "-5", "1..5MB", "5 M B", "101%", "MiB"])
def test_bad_input_raises_with_the_offending_text(bad: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        parse_size(bad, total=100)
    assert repr(bad) in str(excinfo.value)


@pytest.mark.parametrize("bad", [-1, True, 1.5, None])
def test_bad_types(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)  # type: ignore[arg-type]


def test_format_size() -> None:
    assert format_size(536870912) == "512.0 MiB"
    assert format_size(512) == "512 B"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(None) == "unlimited"
    assert format_size(-2 * 1024**2) == "-2.0 MiB"
    assert format_size(5 * 1024**5) == "5120.0 TiB"


def test_round_trip_through_format() -> None:
    for value in (1024, 3 * 1024**2, 7 * 1024**3):
        text = format_size(value).replace(" ", "")
        assert parse_size(text) == value
