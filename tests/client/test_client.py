"""The client SDK on its own: no server imports, the offline key check agrees with the server's,
and the signature header parser refuses what it cannot read."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyshift import client as sdk
from keyshift.client import keys as client_keys
from keyshift.licensing import keys as server_keys
from keyshift.security.signing import SigningKeys


def test_the_sdk_imports_nothing_from_the_server() -> None:
    code = (
        "import sys, keyshift.client\n"
        "bad = sorted(m for m in sys.modules if m.startswith('keyshift') and m not in "
        "('keyshift',) and not m.startswith('keyshift.client'))\n"
        "bad += sorted(m for m in ('sqlalchemy', 'fastapi', 'pydantic', 'orjson') if m in sys.modules)\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@given(st.text(alphabet=server_keys.ALPHABET, min_size=24, max_size=24))
def test_check_character_matches_the_server_copy(body: str) -> None:
    assert client_keys.check_character(body) == server_keys.check_character(body)


def test_offline_key_check_catches_typos() -> None:
    key = server_keys.generate()
    assert sdk.normalise_key(key.lower()) == key
    assert sdk.is_well_formed(key)
    position = 3
    wrong = "1" if key[position] != "1" else "2"
    assert not sdk.is_well_formed(key[:position] + wrong + key[position + 1 :])
    swapped = key[:1] + key[2] + key[1] + key[3:]
    # Luhn mod 32 misses exactly one transposition, 0<->Z (see tests/licensing/test_keys.py).
    if swapped != key and {key[1], key[2]} != {"0", "Z"}:
        assert not sdk.is_well_formed(swapped)


def test_offline_key_check_forgives_only_ascii_like_the_server() -> None:
    body = "123456789ABCDEFGHJKMNPQS"
    key = server_keys.format_key(body + server_keys.check_character(body))
    assert sdk.normalise_key(f" {key.lower()}\n") == server_keys.normalise(key.lower()) == key
    for ascii_char, lookalike in [
        ("1", "\u0131"),
        ("S", "\u017f"),
        ("-", "\u00a0"),
        ("-", "\u3000"),
    ]:
        typed = key.replace(ascii_char, lookalike)
        assert not sdk.is_well_formed(typed)
        with pytest.raises(server_keys.KeyFormatError):
            server_keys.normalise(typed)


def test_verify_response_round_trip_and_rotation() -> None:
    signing = SigningKeys.generate()
    body = json.dumps({"valid": True, "nonce": "n"}).encode()
    kid, signature = signing.sign(body)
    header = (
        f'keyid="{kid}", algorithm="ed25519", signature="{base64.b64encode(signature).decode()}"'
    )
    assert sdk.verify_response(body, header, signing.public_keys(), nonce="n")["valid"] is True
    rotated = signing.rotated()  # the old key stays published, so old answers still verify
    published = sdk.public_keys_from_jwks({"keys": rotated.public_jwks()})
    assert set(published) == {"s1", "s2"}
    assert sdk.verify_response(body, header, published)


@pytest.mark.parametrize(
    "header",
    [
        "",
        'keyid="s1", algorithm="ed25519"',
        'keyid=s1, algorithm="ed25519", signature="AAAA"',
        'keyid="s1", algorithm="ed25519", signature="not base64!"',
        'keyid="s1" algorithm="ed25519" signature="AAAA" junk',
    ],
)
def test_unreadable_signature_headers_are_malformed(header: str) -> None:
    with pytest.raises(sdk.MalformedLicenseFile):
        sdk.verify_response(b"{}", header, SigningKeys.generate().public_keys())


def test_other_algorithms_are_refused() -> None:
    signing = SigningKeys.generate()
    _, signature = signing.sign(b"{}")
    header = f'keyid="s1", algorithm="hs256", signature="{base64.b64encode(signature).decode()}"'
    with pytest.raises(sdk.SignatureInvalid):
        sdk.verify_response(b"{}", header, signing.public_keys())


def test_every_error_is_a_license_file_error() -> None:
    for error in (
        sdk.SignatureInvalid,
        sdk.MalformedLicenseFile,
        sdk.KeyRequired,
        sdk.DecryptionFailed,
        sdk.NonceMismatch,
        sdk.LicenseFileExpired,
    ):
        assert issubclass(error, sdk.LicenseFileError)
    assert sdk.VerificationError is sdk.LicenseFileError
