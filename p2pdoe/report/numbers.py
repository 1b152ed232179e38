"""Numbers as a table shows them (standard library only: the monitor loads it with the parser)."""

from __future__ import annotations


def fixed(value: float, digits: int = 2, thousands: bool = False) -> str:
    """`value` with `digits` decimals, never `-0.00`: a value that rounds to zero has no sign."""
    text = f"{value:,.{digits}f}" if thousands else f"{value:.{digits}f}"
    if text.startswith("-") and not any(ch in "123456789" for ch in text):
        return text[1:]
    return text
