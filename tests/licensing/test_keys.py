"""License key format: typable groups, 120 bits of entropy, a check character that catches
every single-character typo and every adjacent transposition before a server round trip."""

from __future__ import annotations

import hashlib
import re

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from keyshift.licensing import keys

KEY_SHAPE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{5}(-[0-9A-HJKMNP-TV-Z]{5}){4}$")
bodies = st.text(alphabet=keys.ALPHABET, min_size=keys.BODY_LENGTH, max_size=keys.BODY_LENGTH)


def _key(body: str) -> str:
    return keys.format_key(body + keys.check_character(body))


def test_generated_keys_are_five_groups_of_five_from_the_alphabet() -> None:
    for _ in range(200):
        key = keys.generate()
        assert KEY_SHAPE.match(key), key
        assert keys.normalise(key) == key


def test_generated_keys_are_unique_and_use_the_whole_alphabet() -> None:
    generated = [keys.generate() for _ in range(5000)]
    assert len(set(generated)) == len(generated)
    bodies_seen = "".join(k.replace("-", "")[:-1] for k in generated)
    # 120 bits: 24 symbols of 5 bits, each symbol roughly uniform over 32.
    counts = {c: bodies_seen.count(c) for c in keys.ALPHABET}
    expected = len(bodies_seen) / 32
    assert min(counts.values()) > expected * 0.8
    assert max(counts.values()) < expected * 1.2
    assert keys.BODY_LENGTH * 5 >= 120


@given(bodies)
def test_normalise_round_trips_and_forgives_case_spaces_and_lookalikes(body: str) -> None:
    key = _key(body)
    assert keys.normalise(key) == key
    sloppy = key.lower().replace("-", " ").replace("0", "o").replace("1", "l")
    assert keys.normalise(f"  {sloppy} ") == key


#: Characters Python's Unicode case mapping or ``str.split`` would read as a key's symbol or
#: separator; reading forgives only ASCII, so each makes a key malformed.
UNICODE_LOOKALIKES = [
    ("1", "\u0131"),  # dotless i: its str.upper() is I, read as 1
    ("S", "\u017f"),  # long s: its str.upper() is S
    ("-", "\u00a0"),  # no-break space
    ("-", "\u3000"),  # ideographic space
    ("-", "\u2003"),  # em space
]
#: A key holding both 1 and S (24 symbols, then its check character).
KEY_WITH_1_AND_S = _key("123456789ABCDEFGHJKMNPQS")


@pytest.mark.parametrize(("ascii_char", "lookalike"), UNICODE_LOOKALIKES)
def test_only_ascii_is_forgiven(ascii_char: str, lookalike: str) -> None:
    assert keys.normalise(KEY_WITH_1_AND_S.lower().replace("1", "l")) == KEY_WITH_1_AND_S
    with pytest.raises(keys.KeyFormatError, match="characters not used in license keys"):
        keys.normalise(KEY_WITH_1_AND_S.replace(ascii_char, lookalike))


@given(bodies, st.data())
def test_every_single_character_substitution_is_detected(body: str, data: st.DataObject) -> None:
    compact = body + keys.check_character(body)
    position = data.draw(st.integers(0, len(compact) - 1))
    for replacement in keys.ALPHABET:
        if replacement == compact[position]:
            continue
        typo = compact[:position] + replacement + compact[position + 1 :]
        with pytest.raises(keys.KeyFormatError, match="check character"):
            keys.normalise(keys.format_key(typo))


def _has_blind_pair(compact: str) -> bool:
    return "0Z" in compact or "Z0" in compact


def test_every_substitution_and_adjacent_swap_of_issued_keys_is_detected() -> None:
    for _ in range(20):
        compact = keys.generate().replace("-", "")
        for i, original in enumerate(compact):
            for replacement in keys.ALPHABET:
                if replacement != original:
                    typo = compact[:i] + replacement + compact[i + 1 :]
                    with pytest.raises(keys.KeyFormatError):
                        keys.normalise(typo)
        for i in range(len(compact) - 1):
            if compact[i] != compact[i + 1] and not _has_blind_pair(compact[i : i + 2]):
                swapped = compact[:i] + compact[i + 1] + compact[i] + compact[i + 2 :]
                with pytest.raises(keys.KeyFormatError):
                    keys.normalise(swapped)


@given(bodies, st.integers(0, keys.BODY_LENGTH - 1))
def test_adjacent_transposition_is_detected(body: str, i: int) -> None:
    compact = body + keys.check_character(body)
    assume(compact[i] != compact[i + 1] and not _has_blind_pair(compact[i : i + 2]))
    swapped = compact[:i] + compact[i + 1] + compact[i] + compact[i + 2 :]
    with pytest.raises(keys.KeyFormatError):
        keys.normalise(swapped)


def test_luhn_mod_32_cannot_see_a_swap_of_0_and_Z() -> None:
    # The one blind spot of Luhn mod N (like 09/90 in decimal Luhn): the values 0 and N-1.
    body = "0Z" + "A" * (keys.BODY_LENGTH - 2)
    swapped = "Z0" + "A" * (keys.BODY_LENGTH - 2)
    assert keys.check_character(body) == keys.check_character(swapped)


def test_generated_keys_never_hold_an_undetectable_swap() -> None:
    for _ in range(2000):
        compact = keys.generate().replace("-", "")
        assert not _has_blind_pair(compact), compact


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "25 characters"),
        ("ABCDE-FGHJK", "25 characters"),
        ("x" * 65, "too long"),
        ("UUUUU-UUUUU-UUUUU-UUUUU-UUUUU", "not used"),
        ("!!!!!-!!!!!-!!!!!-!!!!!-!!!!!", "not used"),
    ],
)
def test_malformed_keys_are_refused_without_echoing_them(text: str, reason: str) -> None:
    with pytest.raises(keys.KeyFormatError, match=reason) as raised:
        keys.normalise(text)
    if len(text) > 5:
        assert text not in str(raised.value)


def test_hint_shows_only_the_last_group() -> None:
    key = keys.generate()
    assert keys.hint(key) == "…" + key[-5:]
    assert key[:23] not in keys.hint(key)


def _reference_check_character(body: str) -> str:
    """Luhn mod 32 as the format defines it, symbol by symbol from the end."""
    factor, total, n = 2, 0, len(keys.ALPHABET)
    for char in reversed(body):
        addend = factor * keys.ALPHABET.index(char)
        factor = 1 if factor == 2 else 2
        total += addend // n + addend % n
    return keys.ALPHABET[(n - total % n) % n]


@given(st.text(alphabet=keys.ALPHABET, max_size=40))
def test_check_character_is_luhn_mod_32(body: str) -> None:
    assert keys.check_character(body) == _reference_check_character(body)


@given(st.binary(max_size=64))
def test_derived_keys_are_the_sha256_bits_lowest_first(material: bytes) -> None:
    # Synthetic data is reproducible from its seed: derive must never change its keys.
    for attempt in range(1_000):
        digest = hashlib.sha256(material + attempt.to_bytes(2, "big")).digest()
        bits = int.from_bytes(digest[:15], "big")
        body = "".join(keys.ALPHABET[(bits >> (5 * i)) & 31] for i in range(keys.BODY_LENGTH))
        compact = body + _reference_check_character(body)
        if "0Z" not in compact and "Z0" not in compact:
            break
    assert keys.derive(material) == keys.format_key(compact)
    assert keys.derive(b"keyshift-simulate:1:0:0") == "70DY0-VPB86-C0YV2-97Z7E-DFZCR"
