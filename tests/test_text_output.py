"""What the commands print: numbers without a sign on zero, tables not cut off a terminal."""

from __future__ import annotations

import pytest

from p2pdoe.cli.console import WIDTH_OFF_TERMINAL, make_console
from p2pdoe.report.numbers import fixed


@pytest.mark.parametrize(
    ("value", "digits", "shown"),
    [(-0.001, 2, "0.00"), (-0.0, 2, "0.00"), (-0.004, 0, "0"), (-0.006, 2, "-0.01"), (12.345, 1, "12.3")],
)
def test_a_value_that_rounds_to_zero_has_no_sign(value: float, digits: int, shown: str) -> None:
    assert fixed(value, digits) == shown


def test_thousands_are_grouped_and_zero_still_has_no_sign() -> None:
    assert fixed(-1234.5, 1, thousands=True) == "-1,234.5"
    assert fixed(-0.04, 1, thousands=True) == "0.0"


def test_a_table_written_to_a_file_keeps_its_site_names_whole() -> None:
    from rich.table import Table

    console = make_console(record=True)  # pytest's captured output is not a terminal
    assert not console.is_terminal
    assert console.width >= WIDTH_OFF_TERMINAL
    table = Table(title="sites")
    for col in ("site", "state", "mean DOE kW", "cost EUR", "sold kWh", "RSS MB", "a", "b", "c", "d"):
        table.add_column(col)
    for site in ("solar-18", "solar-wind-33"):
        table.add_row(site, "agreed", "[-300, 165]", "12.34", "100", "75", *("long column value",) * 4)
    console.print(table)
    text = console.export_text()
    assert "solar-18 " in text
    assert "solar-wind-33" in text
