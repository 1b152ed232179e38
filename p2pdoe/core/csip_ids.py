"""IEEE 2030.5 device identities from a certificate (no I/O, no XML: `p2pdoe provision` uses them)."""

from __future__ import annotations

import hashlib

LFDI_HEX_DIGITS = 40  # 160 bits
SFDI_HEX_DIGITS = 9  # 36 bits


def lfdi(certificate_der: bytes) -> str:
    """IEEE 2030.5 6.3.4: the first 160 bits of SHA-256 over the certificate (DER), upper-case hex."""
    return hashlib.sha256(certificate_der).hexdigest()[:LFDI_HEX_DIGITS].upper()


def sfdi(lfdi_hex: str) -> int:
    """IEEE 2030.5 6.3.3: the first 36 bits of the LFDI in decimal, then its check digit."""
    return with_check_digit(int(lfdi_hex[:SFDI_HEX_DIGITS], 16))


def with_check_digit(value: int) -> int:
    """`value` followed by the digit that makes the sum of all its digits a multiple of ten (IEEE
    2030.5's check digit of an SFDI and of a registration PIN)."""
    digit_sum = sum(int(d) for d in str(value))
    return value * 10 + (10 - digit_sum % 10) % 10
