"""Offline typo detection for license keys: the same Luhn mod 32 check character the server
uses, so an application can reject a mistyped key before any network round trip.

Copied from ``keyshift.licensing.keys`` on purpose: the client SDK imports nothing from the
server side. ``tests/client/test_keys.py`` checks the two copies agree.
"""

from __future__ import annotations

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_INDEX = {c: i for i, c in enumerate(ALPHABET)}
#: What reading a key forgives, in ASCII only: case, spaces (and tabs, line breaks), dashes,
#: and the look-alikes O→0, I/L→1. Python's Unicode case mapping would also let U+0131 (dotless
#: i) pass for I and U+017F (long s) for S, and ``str.split`` NBSP or U+3000 for a space; such
#: characters stay and make the key malformed.
_FORGIVEN = str.maketrans(
    {
        **{c: c.upper() for c in "abcdefghijklmnopqrstuvwxyz"},
        **{c: "" for c in " \t\r\n-"},
        **{c: "0" for c in "Oo"},
        **{c: "1" for c in "IiLl"},
    }
)
BODY_LENGTH = 24
GROUP = 5


class KeyFormatError(ValueError):
    """The text cannot be a license key; the message says why, without echoing the key."""


def check_character(body: str) -> str:
    """Luhn mod 32 over the body: catches every single-symbol error and adjacent swaps."""
    factor, total, n = 2, 0, len(ALPHABET)
    for char in reversed(body):
        addend = factor * _INDEX[char]
        factor = 1 if factor == 2 else 2
        total += addend // n + addend % n
    return ALPHABET[(n - total % n) % n]


def normalise_key(text: str) -> str:
    """The canonical grouped form of a typed key, or KeyFormatError (a typo, caught offline)."""
    if len(text) > 64:
        raise KeyFormatError("too long to be a license key")
    compact = text.translate(_FORGIVEN)
    bad = sorted({c for c in compact if c not in _INDEX})
    if bad:
        shown = "".join(c if c.isascii() and c.isprintable() else f"<U+{ord(c):04X}>" for c in bad)
        raise KeyFormatError(f"characters not used in license keys: {shown}")
    if len(compact) != BODY_LENGTH + 1:
        raise KeyFormatError(f"a license key has {BODY_LENGTH + 1} characters, got {len(compact)}")
    if check_character(compact[:-1]) != compact[-1]:
        raise KeyFormatError("check character does not match: the key was probably mistyped")
    return "-".join(compact[i : i + GROUP] for i in range(0, len(compact), GROUP))


def is_well_formed(text: str) -> bool:
    try:
        normalise_key(text)
    except KeyFormatError:
        return False
    return True
