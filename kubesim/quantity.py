"""Resource quantities in their canonical form, as kube-apiserver stores them.

Follows k8s.io/apimachinery pkg/api/resource/quantity.go: ParseQuantity (the suffix decides the
format; the value is exact, rounded away from zero to nano; a binary value is capped at 2^63-1)
and CanonicalizeBytes (the largest exponent that loses nothing: a multiple of 3 for decimal
formats, a power of 1024 for BinarySI, which falls back to DecimalSI below 1024 or for a
fraction); suffix.go for the suffix tables. A string already in canonical form is kept as sent,
as ParseQuantity's fast path keeps it (so "1E3" stays "1E3").
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

_DECIMAL_SI = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_DECIMAL_SUFFIX = {exponent: suffix for suffix, exponent in _DECIMAL_SI.items()}
_BINARY_SI = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
_BINARY_SUFFIX = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
_SHAPE = re.compile(r"([+-]?)(0*)([0-9]*)(?:\.([0-9]*))?([eEinumkKMGTP]*[-+]?[0-9]*)")
_MAX_BINARY = 2**63 - 1
_NANO = Fraction(1, 10**9)


def canonical(value: object, milli: bool = False) -> object:
    """The stored form of a quantity; a value that does not parse is returned unchanged.
    `milli`: a value of a core/v1 ResourceList (container requests and limits, a quota's
    hard), which defaulting rounds up, away from zero, to a whole milli-unit
    (pkg/apis/core/v1/defaults.go, SetDefaults_ResourceList: Quantity.RoundUp(-3), which
    recomputes the string only when it rounded)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return value
    text = value.strip() if isinstance(value, str) else _number_text(value)
    parsed = _parse(text)
    if parsed is None:
        return value
    amount, fmt, keep = parsed
    if milli and (amount * 1000).denominator != 1:
        amount = Fraction(math.copysign(math.ceil(abs(amount) * 1000), amount)) / 1000
        keep = False
    return text if keep else _format(amount, fmt)


def parses(text: str) -> bool:
    return _parse(text.strip()) is not None


def _number_text(number: int | float) -> str:
    # Quantity.UnmarshalJSON parses a bare JSON number from its text, as it would a string.
    return str(number) if isinstance(number, int) else repr(number).replace("e+", "e")


def _parse(text: str) -> tuple[Fraction, str, bool] | None:
    """(value, format, already canonical) or None if `text` is not a quantity."""
    if text == "0":
        return Fraction(0), "DecimalSI", True
    match = _SHAPE.fullmatch(text)
    if not match or not text:
        return None
    sign, _, whole, fraction, suffix = match.groups()
    whole, fraction = whole or "0", fraction or ""
    if suffix in _DECIMAL_SI:
        base, exponent, fmt = 10, _DECIMAL_SI[suffix], "DecimalSI"
    elif suffix in _BINARY_SI:
        base, exponent, fmt = 2, _BINARY_SI[suffix], "BinarySI"
    elif suffix[:1] in ("e", "E") and re.fullmatch(r"[-+]?[0-9]+", suffix[1:]):
        base, exponent, fmt = 10, int(suffix[1:]), "DecimalExponent"
    else:
        return None
    digits = whole + fraction
    amount = Fraction(int(digits)) / 10 ** len(fraction) * Fraction(base) ** exponent
    if sign == "-":
        amount = -amount
    keep = _kept_as_sent(digits, whole, fraction, exponent, fmt)
    if amount % _NANO:  # round away from zero to a whole nano
        amount = Fraction(math.copysign(math.ceil(abs(amount) / _NANO), amount)) * _NANO
    if fmt == "BinarySI" and amount > _MAX_BINARY:
        amount = Fraction(_MAX_BINARY)
    return amount, fmt, keep


def _kept_as_sent(digits: str, whole: str, fraction: str, exponent: int, fmt: str) -> bool:
    """ParseQuantity's fast path, which reuses the input string when it is canonical already."""
    if fmt == "BinarySI":
        precision = 15 - len(whole) - int(exponent * 3 / 10) - 1
        value = int(digits)
        return not fraction and precision >= 0 and value & 0x07 != 0
    precision = 18 - len(whole) - len(fraction)
    scale = exponent - len(fraction)
    shifted = digits  # the whole part has no leading zeros (and is "0" if it had no digits)
    return (
        precision >= 0
        and scale >= -9
        and scale % 3 == 0
        and not shifted.endswith("000")
        and not shifted.startswith("0")
    )


def _format(amount: Fraction, fmt: str) -> str:
    if amount == 0:
        return "0"
    sign = "-" if amount < 0 else ""
    magnitude = abs(amount)
    if fmt == "BinarySI" and magnitude >= 1024 and magnitude.denominator == 1:
        number, power = int(magnitude), 0
        while number % 1024 == 0 and power < len(_BINARY_SUFFIX) - 1:
            number, power = number // 1024, power + 1
        return f"{sign}{number}{_BINARY_SUFFIX[power]}"
    # Decimal: the mantissa is a whole number; the exponent a multiple of 3, as high as it goes.
    exponent = -9
    number = int(magnitude / _NANO)
    while number % 1000 == 0:
        number, exponent = number // 1000, exponent + 3
    if fmt == "DecimalExponent":
        return f"{sign}{number}" + (f"e{exponent}" if exponent else "")
    suffix = _DECIMAL_SUFFIX.get(exponent)
    return f"{sign}{number}" + (suffix if suffix is not None else f"e{exponent}")
