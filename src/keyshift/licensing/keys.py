"""License keys: 120 random bits in Crockford base32, grouped for typing, with a Luhn mod 32
check character so a typo is caught on the client before any server round trip.

``7KQ2M-9XH3D-F4TVA-PZ8NE-R1CW6`` — five groups of five; the last character is the check.
Reading forgives case, spaces, dashes and the look-alikes O→0, I/L→1.
"""

from __future__ import annotations

import base64
import hashlib
import secrets

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
BODY_LENGTH = 24  # 24 symbols * 5 bits = 120 bits of entropy
GROUP = 5


class KeyFormatError(ValueError):
    """The text cannot be a license key; the message says why, without echoing the key."""


def check_character(body: str) -> str:
    """Luhn mod 32 over the body: catches every single-symbol error, and every adjacent swap
    but 0<->Z (which ``generate`` never emits). From the last symbol back, every other one
    counts doubled (its two base-32 digits summed); the tables hold both values per symbol."""
    n = len(ALPHABET)
    total = sum(map(_DOUBLED.__getitem__, body[-1::-2])) + sum(
        map(_INDEX.__getitem__, body[-2::-2])
    )
    return ALPHABET[(n - total % n) % n]


#: Each symbol's addend where Luhn doubles it: the digits of 2 * value in base 32, summed.
_DOUBLED = {c: (2 * i) // len(ALPHABET) + (2 * i) % len(ALPHABET) for c, i in _INDEX.items()}


#: Luhn mod N detects every adjacent transposition except of the symbols worth 0 and N-1
#: ("0" and "Z" here). Generated keys never hold such a pair, so every adjacent swap in a
#: typed key is caught; this costs about 0.07 of the 120 bits.
_BLIND_PAIRS = ("0Z", "Z0")


def generate() -> str:
    while True:
        key = _from_body("".join(secrets.choice(ALPHABET) for _ in range(BODY_LENGTH)))
        if key is not None:
            return key


def derive(material: bytes) -> str:
    """A well-formed key derived from ``material`` alone: the same material, the same key.
    For synthetic data (``keyshift simulate``), whose keys must be reproducible from a seed;
    a real key comes from ``generate``. The body is SHA-256 of the material (and a counter,
    should a body hold a pair ``generate`` never emits)."""
    for attempt in range(1_000):
        digest = hashlib.sha256(material + attempt.to_bytes(2, "big")).digest()
        # 120 bits as 24 symbols of 5, the lowest bits first: base32 gives them highest first.
        body = base64.b32encode(digest[:15]).translate(_FROM_BASE32)[::-1].decode()
        key = _from_body(body)
        if key is not None:
            return key
    raise AssertionError("unreachable: a blind pair in 1,000 bodies running")


#: RFC 4648 base32's alphabet to ours (Crockford's), symbol for symbol.
_FROM_BASE32 = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", ALPHABET.encode())


def _from_body(body: str) -> str | None:
    """The grouped key for a body, or None when it would hold a blind pair."""
    compact = body + check_character(body)
    if any(pair in compact for pair in _BLIND_PAIRS):
        return None
    return format_key(compact)


def format_key(compact: str) -> str:
    return "-".join(compact[i : i + GROUP] for i in range(0, len(compact), GROUP))


def normalise(text: str) -> str:
    """The canonical grouped form of ``text``, or KeyFormatError."""
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
    return format_key(compact)


def hint(key: str) -> str:
    """What may be shown of a key in lists and logs: its last group."""
    return "…" + key[-GROUP:]
