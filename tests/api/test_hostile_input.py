"""No input gets a 5xx, on either database: schemathesis over the app's own OpenAPI spec
(anonymous and with an admin token), and hypothesis strategies for the classes of input that
once did (NUL characters, integers beyond 64 bits, lone surrogates, dates and durations at the
calendar's edges) thrown at every field of every route, against a real server process.

After each write the seeded keys must still validate, and at the end every read of the seeded
license and account must still answer below 500: a stored value must never make a later read
fail.

Bounded to stay fast and reproducible: few examples per route, ``derandomize`` (a fixed seed),
no shrinking (every 5xx is collected and reported at once, with its request)."""

from __future__ import annotations

import json
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from keyshift.api.app import create_app
from keyshift.api.state import AppState
from keyshift.context import SYSTEM
from keyshift.db.engine import Database
from keyshift.licensing import activations
from keyshift.security import tokens
from keyshift.security.secrets_store import Secrets
from tests import factories
from tests.support import LiveServer

pytestmark = pytest.mark.server

INT64_MAX = 2**63 - 1
#: Examples per route and generation mode (schemathesis), and per route (hostile classes).
SPEC_EXAMPLES = 3
HOSTILE_EXAMPLES = 2

CONFORMANCE = [
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]

BOUNDED = settings(
    max_examples=SPEC_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


@dataclass
class World:
    """What the seeded database holds, for requests that reach past the lookups."""

    admin: dict[str, str]
    key: str  # a seat plan with a grace period: its expiry plus the grace is computed
    usage_key: str  # a usage plan with the meter api_calls
    account_id: str
    license_id: str
    activation_id: str
    spare_token_id: str  # deleting it is harmless (never the admin token the suite uses)
    spec: dict[str, Any]
    failures: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # schema-valid (admin) requests: 422

    def path_values(self) -> dict[str, str]:
        return {
            "account_id": self.account_id,
            "license_id": self.license_id,
            "activation_id": self.activation_id,
            "token_id": self.spare_token_id,
            "migration_id": str(uuid.uuid4()),
            "name": "extra",
            "kind": "plan",
            "ref": factories.USAGE,
        }


@pytest.fixture
async def world(db: Database, secrets: Secrets, app_state: AppState) -> World:
    await factories.publish_sample_catalog(db)
    account = await factories.create_account(db, factories.SEAT_NODE, name="Hostile Ltd")
    row, key = await factories.issue_license(db, secrets, account.id)
    metered = await factories.create_account(db, factories.USAGE, name="Metered Ltd")
    _, usage_key = await factories.issue_license(db, secrets, metered.id)
    async with db.transaction() as session:
        outcome = await activations.activate(session, SYSTEM, secrets.keyring, row, "fp-seed")
        admin = await tokens.create_token(session, SYSTEM, name="fuzz", scopes=["admin"])
        spare = await tokens.create_token(session, SYSTEM, name="spare", scopes=["audit:read"])
    return World(
        admin={"Authorization": f"Bearer {admin.plaintext}"},
        key=key,
        usage_key=usage_key,
        account_id=account.id,
        license_id=row.id,
        activation_id=outcome.activation.id,
        spare_token_id=spare.token.id,
        spec=create_app(state=app_state).openapi(),
    )


def _operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            yield method.upper(), path, operation


def _reads_still_answer(
    client: httpx.Client, world: World, after: str, *, everything: bool
) -> None:
    """The seeded keys and account can still be read: nothing stored broke a later read.
    After each write the keys' validation (the named victim); ``everything`` at the end."""
    reads = [
        ("POST", "/v1/licenses/validate", {"key": world.key, "fingerprint": "fp-seed"}),
        ("POST", "/v1/licenses/validate", {"key": world.usage_key, "meter": "api_calls"}),
    ]
    if everything:
        reads += [
            ("POST", "/v1/licenses/checkout", {"key": world.key}),
            ("POST", "/v1/licenses/heartbeat", {"key": world.key, "fingerprint": "fp-seed"}),
            ("GET", f"/v1/licenses/{world.license_id}", None),
            ("GET", f"/v1/licenses/{world.license_id}/activations", None),
            ("GET", f"/v1/accounts/{world.account_id}", None),
            ("GET", f"/v1/accounts/{world.account_id}/usage", None),
            ("GET", f"/v1/accounts/{world.account_id}/objects", None),
            ("GET", "/v1/accounts?limit=1000", None),
            ("GET", "/v1/audit/events?limit=1000", None),
            ("GET", "/v1/tokens", None),
        ]
    for method, path, body in reads:
        response = client.request(method, path, json=body, headers=world.admin)
        if response.status_code >= 500:
            world.failures.append(
                f"after {after}: {method} {path} -> {response.status_code} {response.text[:200]}"
            )


def test_no_input_gets_a_5xx(live_server: LiveServer, world: World) -> None:
    """One server per database for all the parts (starting one costs seconds); every answer
    is also checked against the spec (status, content type, headers, body schema)."""
    with httpx.Client(base_url=live_server.base_url, timeout=30) as client:
        wrong_method = client.patch(f"/v1/accounts/{world.account_id}/addons/extra")
        assert (wrong_method.status_code, wrong_method.headers["allow"]) == (405, "DELETE, PUT")
        _spec_driven_requests(client, world, who="anonymous")
        _spec_driven_requests(client, world, who="admin")
        _hostile_values_in_every_field(client, world)
        _reads_still_answer(client, world, "all of them", everything=True)
    assert not world.failures, "\n".join(world.failures)
    # A request the spec calls valid is refused only for what no schema can say (a rules or
    # manifest text, a key's check character, a date that is no date: domain codes) or for
    # an integer written as 5.0, which JSON Schema calls an integer and the API does not.
    unexplained = [
        refused
        for refused in world.refused
        if '"code":"invalid_request"' in refused and '"type":"int_type"' not in refused
    ]
    assert not unexplained, "schema-valid requests refused:\n" + "\n".join(unexplained)


# -- schemathesis over the app's own spec ----------------------------------------------------


def _spec_driven_requests(client: httpx.Client, world: World, who: str) -> None:
    """Schemathesis cases (positive, negative, and with the seeded rows' ids) for every
    operation of the spec, sent anonymously or with the admin token."""
    schema = schemathesis.openapi.from_dict(world.spec)  # the ASGI app's own ``app.openapi()``
    headers = world.admin if who == "admin" else {}
    real_ids = world.path_values()
    session = requests.Session()
    base_url = str(client.base_url).rstrip("/")
    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        names = {p.name for p in operation.path_parameters}
        strategies = [
            operation.as_strategy(generation_mode=mode)
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        ]
        if names:  # and the same with the seeded rows' ids, to reach past the lookup
            strategies.append(
                operation.as_strategy(
                    path_parameters={n: real_ids[n] for n in names if n in real_ids}
                )
            )

        @BOUNDED
        @given(case=st.one_of(strategies))
        def run(case: schemathesis.Case) -> None:
            response = case.call(base_url=base_url, session=session, headers=headers, timeout=30)
            request = f"    {case.as_curl_command(headers=headers)[:600]}"
            if response.status_code >= 500:
                world.failures.append(
                    f"{who}: {case.method} {case.path} -> {response.status_code}"
                    f" {response.text[:200]}\n{request}"
                )
            try:  # the answer is one the spec documents, with the documented body and headers
                case.validate_response(response, checks=CONFORMANCE)
            except (Exception, BaseExceptionGroup) as exc:  # schemathesis' failures are a group
                world.failures.append(f"{who}: {case.method} {case.path}: {exc}\n{request}")
            positive = case.meta is not None and case.meta.generation.mode.is_positive
            if who == "admin" and positive and response.status_code == 422:
                world.refused.append(
                    f"{case.method} {case.path} -> {response.text[:300]}\n{request}"
                )

        run()
        if operation.method.upper() != "GET":
            _reads_still_answer(client, world, label, everything=False)


# -- hostile classes in every field ----------------------------------------------------------

NUL = st.text(max_size=4).map(lambda s: f"{s}\x00{s}")
BEYOND_64_BITS = st.one_of(
    st.integers(min_value=INT64_MAX + 1, max_value=2**80),
    st.integers(min_value=-(2**80), max_value=-INT64_MAX - 2),
    st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**30]),
)
LONE_SURROGATE = st.tuples(st.text(max_size=3), st.integers(0xD800, 0xDFFF)).map(
    lambda t: f"{t[0]}{chr(t[1])}"
)
#: Every one of these goes to every dated field (too few to sample from).
CALENDAR_EDGES = tuple(
    [
        "0001-01-01T00:00:00Z",
        "0001-01-01T00:00:00+14:00",
        "1969-12-31T23:59:59Z",
        "9999-12-31T00:00:00Z",
        "9999-12-31T23:59:59-23:59",
        "9999-12-31T23:59:59.999999+00:00",
        "0001-01-01",
        "9999-12-31",
        "9999y",
        "120000mo",
        "999999d",
        "999999w",
        "999999h",
    ]
)


def _baseline(world: World, method: str, path: str) -> tuple[dict[str, Any], Any]:
    """A request that reaches past validation to the seeded rows: (query, body)."""
    key = world.key
    event = {"meter": "api_calls", "quantity": 1, "idempotency_key": uuid.uuid4().hex}
    bodies: dict[str, Any] = {
        "/v1/licenses/validate": {"key": key, "fingerprint": "fp-seed", "meter": "api_calls"},
        "/v1/licenses/checkout": {"key": key, "fingerprint": "fp-seed", "ttl": "1d"},
        "/v1/licenses/check-in": {"key": key, "license_file": "x", "ttl": "1d"},
        "/v1/licenses/{license_id}/file": {"ttl": "1d", "fingerprint": "fp-seed"},
        "/v1/catalog/publish": {"files": {"plan": "x = 1"}},
        "/v1/accounts": {"name": "n", "attributes": {"tier": "gold"}},
        "/v1/accounts/{account_id}/subscription": {"plan": factories.USAGE},
        "/v1/accounts/{account_id}/addons/{name}": {"quotas": {"projects": 1}},
        "/v1/accounts/{account_id}/preferences": {"theme": "dark"},
        "/v1/accounts/{account_id}/objects": {
            "quota": "projects",
            "name": "p",
            "units": 1,
            "content_base64": "",
        },
        "/v1/licenses": {"account_id": world.account_id, "expires_at": "2030-01-01T00:00:00Z"},
        "/v1/licenses/{license_id}": {"max_activations_override": 5},
        "/v1/licenses/{license_id}/suspend": {"reason": "r"},
        "/v1/licenses/{license_id}/reinstate": {"reason": "r"},
        "/v1/licenses/{license_id}/revoke": {"reason": "r"},
        "/v1/licenses/{license_id}/renew": {"expires_at": "2031-01-01T00:00:00Z"},
        "/v1/licenses/activate": {"key": key, "fingerprint": "fp-2", "label": "l"},
        "/v1/licenses/heartbeat": {"key": key, "fingerprint": "fp-seed"},
        "/v1/licenses/deactivate": {"key": key, "fingerprint": "fp-2"},
        "/v1/tokens": {"name": "t", "scopes": ["audit:read"], "ttl_seconds": 3600},
        "/v1/usage": {"key": world.usage_key, **event, "timestamp": None},
        "/v1/usage/batch": {"key": world.usage_key, "events": [event]},
        "/v1/rules/validate": {"rules": "x = 1"},
        "/v1/migrations/plan": {"rules": "x = 1", "account_id": world.account_id},
        "/v1/migrations": {"rules": "x = 1", "account_id": world.account_id},
        "/v1/migrations/run-due": {"limit": 1},
        "/v1/migrations/{migration_id}/rollback": {"reason": "r"},
        "/v1/accounts/{account_id}/migrations/rollback": {"reason": "r"},
    }
    queries: dict[str, dict[str, Any]] = {
        "/v1/catalog/diff": {"from": factories.USAGE, "to": factories.SEAT_NODE},
        "/v1/audit/events": {"account_id": world.account_id, "after_seq": 0},
        "/v1/accounts/{account_id}/usage": {"period": "current"},
    }
    body = bodies.get(path) if method in ("POST", "PUT", "PATCH") else None
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if v is not None}
    return dict(queries.get(path, {})), body


def _targets(operation: dict[str, Any], query: dict[str, Any], body: Any) -> list[str]:
    """Where a hostile value can go: ``path.x``, ``query.x``, a body field (nested ones as
    ``a.0.b``), or a new member of a free-form object (``a.*``)."""
    found = [f"{p['in']}.{p['name']}" for p in operation.get("parameters", [])]
    found += [f"query.{name}" for name in query if f"query.{name}" not in found]
    found.append("query.undeclared")  # a parameter no route declares

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict):
            found.append(f"{prefix}*")
            for name, child in value.items():
                found.append(f"{prefix}{name}")
                walk(child, f"{prefix}{name}.")
        elif isinstance(value, list):
            for index, child in enumerate(value):
                walk(child, f"{prefix}{index}.")

    if body is not None:
        walk(body, "body.")
    return sorted(set(found))


def _place(target: str, value: Any, path: str, query: dict[str, Any], body: Any) -> str:
    """Put ``value`` at ``target``; the path with its parameters filled in."""
    kind, _, rest = target.partition(".")
    if kind == "query":
        query[rest] = value
    elif kind == "body":
        *parents, last = rest.split(".")
        holder = body
        for part in parents:
            holder = holder[int(part)] if isinstance(holder, list) else holder[part]
        if last == "*":  # a new member, named by the value too when it is text
            holder[value if isinstance(value, str) else "extra"] = value
        elif isinstance(holder, list):
            holder[int(last)] = value
        else:
            holder[last] = value
    else:
        path = path.replace("{" + rest + "}", _quote(value), 1)
    return path


def _quote(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return urllib.parse.quote(text.encode("utf-8", "surrogatepass"), safe="")


def _query_string(query: dict[str, Any]) -> str:
    return "&".join(f"{_quote(k)}={_quote(v)}" for k, v in query.items())


def _encode(body: Any, raw_utf8: bool) -> bytes:
    """JSON with NUL and surrogates as ``\\u`` escapes, or (``raw_utf8``) as raw bytes."""
    if raw_utf8:
        return json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return json.dumps(body).encode()


#: Fields holding a date, a duration or a sequence number: calendar edges go there too.
DATED = {"expires_at", "timestamp", "ttl", "period", "after_seq"}
CLASSES = {"nul": NUL, "beyond-64-bits": BEYOND_64_BITS, "lone-surrogate": LONE_SURROGATE}


def _hostile_values_in_every_field(client: httpx.Client, world: World) -> None:
    """Every field of every operation gets values of each class (calendar edges where a date
    or a duration goes), the seeded rows' ids and a valid baseline everywhere else."""
    for method, template, operation in _operations(world.spec):
        query, body = _baseline(world, method, template)
        targets = _targets(operation, query, body)
        _hostile_examples(client, world, method, template, targets)()
        for target in targets:
            if target.rsplit(".", 1)[-1] in DATED:
                for edge in CALENDAR_EDGES:
                    _send(client, world, method, template, (target, "calendar", edge, False))
        if method != "GET":
            _reads_still_answer(client, world, f"{method} {template}", everything=False)


Hostile = tuple[str, str, Any, bool]  # (target, class, value, send text as raw UTF-8)


def _hostile_examples(
    client: httpx.Client, world: World, method: str, template: str, targets: list[str]
) -> Callable[[], None]:
    """Each example sends one request per field and class: a value of the class at that
    field, the baseline everywhere else."""
    cases = st.tuples(
        *(
            st.tuples(st.just(target), st.just(kind), values, st.booleans())
            for target in targets
            for kind, values in CLASSES.items()
        )
    )

    @settings(BOUNDED, max_examples=HOSTILE_EXAMPLES)
    @given(cases=cases)
    def run(cases: tuple[Hostile, ...]) -> None:
        for case in cases:
            _send(client, world, method, template, case)

    return run


def _send(client: httpx.Client, world: World, method: str, template: str, case: Hostile) -> None:
    target, kind, value, raw_utf8 = case
    query, body = _baseline(world, method, template)
    path = _place(target, value, template, query, body)
    for name, real in world.path_values().items():
        path = path.replace("{" + name + "}", real)
    url = path + ("?" + _query_string(query) if query else "")
    response = client.request(
        method,
        url,
        content=None if body is None else _encode(body, raw_utf8),
        headers={**world.admin, "content-type": "application/json"},
    )
    if response.status_code >= 500:
        world.failures.append(
            f"{method} {template} [{kind} at {target}: {value!r}] ->"
            f" {response.status_code} {response.text[:200]}"
        )
