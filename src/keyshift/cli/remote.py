"""The CLI's second backend: a command's work done through a remote server's HTTP API
(``--server URL`` or ``KEYSHIFT_SERVER``, with ``KEYSHIFT_TOKEN``) instead of a local database.
An error the server answers becomes the domain error the local path would raise, so
``keyshift.cli.output`` gives it the same message and exit code (docs/operations.md,
"Remote CLI")."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from keyshift import errors as e

if TYPE_CHECKING:
    import httpx

#: Seconds the CLI waits to connect, and for an answer (a dry-run report of a large cohort
#: may take minutes before its answer starts).
CONNECT_SECONDS = 10.0
ANSWER_SECONDS = 600.0

#: The statuses the API answers with, as the domain errors behind them (``api.errors.STATUS``
#: read backwards); a 429 is a refusal to retry later, as a 503 is.
_BY_STATUS: dict[int, type[e.KeyshiftError]] = {
    401: e.AuthenticationFailed,
    403: e.PermissionDenied,
    404: e.NotFound,
    409: e.Conflict,
    413: e.InvalidInput,
    415: e.InvalidInput,
    422: e.InvalidInput,
    429: e.Unavailable,
    502: e.Unavailable,
    503: e.Unavailable,
    504: e.Unavailable,
}


@dataclass(frozen=True)
class Target:
    """Where the CLI sends its requests. ``repr`` leaves the token out."""

    url: str
    token: str | None = field(default=None, repr=False)


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def target(server: str, token: str | None, *, insecure: bool = False) -> Target:
    """The checked server URL: http or https with a host; plain http only to a loopback
    address unless ``insecure`` (the token would cross the network in clear)."""
    import httpx

    try:
        url = httpx.URL(server.strip())
    except (httpx.InvalidURL, TypeError) as exc:
        raise e.ConfigurationError(
            f"{server!r} is not a URL: {exc}", field="KEYSHIFT_SERVER"
        ) from None
    if url.scheme not in ("http", "https") or not url.host:
        raise e.ConfigurationError(
            f"{server!r}: give the server as http(s)://host[:port]", field="KEYSHIFT_SERVER"
        )
    if url.scheme == "http" and not insecure and not is_loopback(url.host):
        raise e.ConfigurationError(
            f"refusing to send the token to {url.host} over plain http: use https,"
            " or --insecure on a network you trust",
            field="KEYSHIFT_SERVER",
        )
    base = str(url.copy_with(query=None, fragment=None)).rstrip("/")
    return Target(base, token)


def error_from(response: httpx.Response, where: str) -> e.KeyshiftError:
    """The domain error behind an error answer: its class by status, the server's code,
    message, field and details, and the problems of a rules or manifest refusal."""
    try:
        body = response.json()["error"]
        code, message = str(body["code"]), str(body["message"])
    except (ValueError, KeyError, TypeError):
        body, code, message = {}, "", ""
    if not message:
        # Not keyshift answering (a proxy's error page, say): say who did, and what.
        message = f"{where} answered {response.status_code} {response.reason_phrase}"
    field_name = body.get("field")
    if isinstance(field_name, str) and field_name.startswith(("query.", "path.")):
        # A query or path parameter is an option or argument of the command: name it alone.
        bare = field_name.split(".", 1)[1]
        message = message.replace(f"{field_name}: ", f"{bare}: ", 1)
        field_name = bare
    given = body.get("details") if isinstance(body.get("details"), dict) else {}
    # What the server said about the error, minus the names the constructors take themselves.
    details = {k: v for k, v in given.items() if k not in ("message", "field", "retry_after")}
    problems = body.get("problems")
    if code in ("invalid_rules", "invalid_manifest") and isinstance(problems, list):
        return _with_problems(code, problems)
    cls = _BY_STATUS.get(response.status_code, e.KeyshiftError)
    if response.status_code == 401:
        message = f"{message} (KEYSHIFT_TOKEN, for {where})"
    if issubclass(cls, e.Unavailable):
        retry = response.headers.get("retry-after", "")
        seconds = int(retry) if retry.isdigit() else 1
        later = f"; retry in {seconds} s" if retry.isdigit() else ""
        error: e.KeyshiftError = cls(f"{message} ({where}{later})", retry_after=seconds, **details)
        error.field = field_name if isinstance(field_name, str) else None
    else:
        if response.status_code >= 500:
            # A bug on the server: its log has the traceback under the request id.
            request_id = response.headers.get("x-request-id")
            message += f" ({where}, request id {request_id})" if request_id else f" ({where})"
        error = cls(message, field=field_name if isinstance(field_name, str) else None, **details)
    if code:
        error.code = code
    return error


def _with_problems(code: str, problems: list[Any]) -> e.KeyshiftError:
    from keyshift.catalog.loader import Problem
    from keyshift.migration.errors import RulesInvalid

    def problem(item: Any) -> Any:
        if isinstance(item, dict) and {"file", "field", "reason"} <= set(item):
            return Problem(item["file"], item["field"], item["reason"], item.get("line"))
        return str(item)

    placed = [problem(item) for item in problems]
    if code == "invalid_rules":
        return RulesInvalid(placed)
    return e.ManifestError(placed)


class Api:
    """A keyshift server's API as the commands use it: JSON in, JSON out, and every error
    (an error answer, an unreachable server) raised as a ``KeyshiftError``."""

    def __init__(self, where: Target, client: httpx.AsyncClient) -> None:
        self.target = where
        self._client = client

    async def call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, Any] | None = None,
    ) -> httpx.Response:
        """The answer to one request (2xx only; anything else raised as its domain error)."""
        import httpx

        query = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = await self._client.request(method, path, json=body, params=query or None)
        except httpx.TimeoutException as exc:
            failure: e.KeyshiftError = e.Unavailable(
                f"the server at {self.target.url} did not answer in time ({type(exc).__name__})"
            )
        except httpx.TransportError as exc:
            reason = (str(exc).strip().splitlines() or [""])[0]
            failure = e.Unavailable(
                f"cannot reach the server at {self.target.url}: {type(exc).__name__}: {reason}"
            )
        else:
            if response.is_success:
                return response
            if response.is_redirect:
                failure = e.ConfigurationError(
                    f"{self.target.url} redirects to {response.headers.get('location')}:"
                    " give that address as the server",
                    field="KEYSHIFT_SERVER",
                )
            else:
                failure = error_from(response, self.target.url)
        raise failure

    async def get(self, path: str, **params: Any) -> Any:
        return (await self.call("GET", path, params=params)).json()

    async def post(self, path: str, body: Any = None) -> Any:
        return (await self.call("POST", path, body=body)).json()

    async def put(self, path: str, body: Any) -> Any:
        return (await self.call("PUT", path, body=body)).json()

    async def patch(self, path: str, body: Any) -> Any:
        return (await self.call("PATCH", path, body=body)).json()

    async def delete(self, path: str) -> Any:
        return (await self.call("DELETE", path)).json()


@asynccontextmanager
async def connect(where: Target) -> AsyncIterator[Api]:
    import httpx

    timeout = httpx.Timeout(ANSWER_SECONDS, connect=CONNECT_SECONDS, pool=CONNECT_SECONDS)
    headers = {"User-Agent": "keyshift-cli"}
    if where.token:
        headers["Authorization"] = f"Bearer {where.token}"
    async with httpx.AsyncClient(
        base_url=where.url, headers=headers, timeout=timeout, follow_redirects=False
    ) as client:
        yield Api(where, client)


def segment(value: str) -> str:
    """``value`` as one path segment (an id with ``/`` or ``?`` in it stays one id, which the
    server then does not find, as the local path does not)."""
    from urllib.parse import quote

    return quote(value, safe="")
