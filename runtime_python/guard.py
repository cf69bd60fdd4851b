"""The server's front door: which requests reach the app, and the headers every response carries.

Design choices (a pure ASGI middleware: BaseHTTPMiddleware would hide disconnects from streams):
- Host: loopback names (localhost, *.localhost), the address the server is bound to, any IP
  literal, and `--allow-host` names pass; anything else is a 400. A DNS-rebinding page reaches us
  under the attacker's host name, never an IP literal, so IP literals are safe to accept and a
  server on 0.0.0.0 stays reachable by address. `--allow-host '*'` turns the check off.
- Origin: a request that carries one must be same-origin (the Origin's host:port is the Host
  header) or listed with `--allow-origin`; others get a 403 before any work is done. Browsers send
  Origin on every cross-origin fetch and on every POST, so a blind cross-site POST never runs.
- POST bodies must be `application/json` (415 otherwise): text/plain and form posts are what a
  cross-site page can send without a CORS preflight.
- CORS: off unless `--allow-origin` lists origins; then preflights from those origins are answered
  here and their responses get Access-Control-Allow-Origin (never `*`).
- API key: with one set, `/v1/*` needs `Authorization: Bearer KEY` (401 otherwise; compared with
  `hmac.compare_digest`). `/`, `/static/*` and `/health` stay open so the page can load and ask for
  the key; the page keeps it in sessionStorage and sends it as that header, like any client.
- Every response gets a strict CSP (scripts, styles, connections: this origin only, no inline
  script; frame-ancestors 'none'), X-Content-Type-Options: nosniff, X-Frame-Options: DENY and
  Referrer-Policy: no-referrer.
- Refusals use OpenAI's error shape, like every other error of the API; so does a bug of ours (a
  500, logged), caught here rather than by Starlette's outermost handler so it keeps the headers.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

from runtime_python.api_models import ApiError

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer")]
LOOPBACK_NAMES = {"localhost", "localhost.localdomain"}
log = logging.getLogger("supermix.serve")


def is_loopback(host: str) -> bool:
    """True for localhost and loopback IP addresses (127.0.0.0/8, ::1)."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def split_host(value: str) -> str:
    """The host name of a Host header value or netloc, without port or brackets, lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    def __init__(self, app: Callable, bound_host: str = "127.0.0.1", allow_hosts: tuple[str, ...] = (),
                 allow_origins: tuple[str, ...] = (), api_key: str | None = None) -> None:
        self.app, self.api_key = app, api_key
        self.any_host = "*" in allow_hosts
        self.hosts = {split_host(h) for h in (bound_host, *allow_hosts) if h and h != "*"}
        self.origins = {o.rstrip("/").lower() for o in allow_origins}

    def host_ok(self, host: str) -> bool:
        name = split_host(host)
        return bool(name) and (self.any_host or is_loopback(name) or _is_ip(name) or name in self.hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host, origin = headers.get("host", ""), headers.get("origin")
        cors = origin.rstrip("/").lower() if origin and origin.rstrip("/").lower() in self.origins else None
        extra = list(SECURITY_HEADERS)
        if cors:
            extra += [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
        error = self.refusal(scope, headers, host, origin, cors)
        if error is not None:
            return await self.respond(send, error.status, error.body(), extra)
        if cors and scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            allow = headers.get("access-control-request-headers", "authorization, content-type")
            return await self.respond(send, 204, None, extra + [
                (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                (b"access-control-allow-headers", allow.encode("latin-1")), (b"access-control-max-age", b"600")])

        started = False

        async def send_with_headers(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception as e:  # a bug of ours: logged, and still OpenAI's shape and these headers
            if started:
                raise
            log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            bug = ApiError(500, f"internal error: {type(e).__name__}: {e}", None, None, "server_error")
            await self.respond(send, 500, bug.body(), extra)

    def refusal(self, scope: Scope, headers: dict[str, str], host: str, origin: str | None,
                cors: str | None) -> ApiError | None:
        if not self.host_ok(host):
            return ApiError(400, f"host {host!r} is not allowed; start the server with --allow-host {split_host(host)} "
                            "to serve under that name", None, "host_not_allowed")
        if origin is not None and cors is None and urlsplit(origin).netloc.lower() != host.lower():
            return ApiError(403, f"cross-origin requests from {origin!r} are not allowed (--allow-origin)", None,
                            "origin_not_allowed", "permission_error")
        preflight = scope["method"] == "OPTIONS" and "access-control-request-method" in headers
        if scope["method"] in ("POST", "PUT", "PATCH"):
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return ApiError(415, f"the request body must be application/json, not {kind or 'unlabelled'}", None,
                                "unsupported_media_type")
        if self.api_key is not None and scope["path"].startswith("/v1/") and not preflight:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return ApiError(401, "a valid API key is needed: send 'Authorization: Bearer KEY'", None,
                                "invalid_api_key")
        return None

    @staticmethod
    async def respond(send: Send, status: int, body: dict | None, headers: list[tuple[bytes, bytes]]) -> None:
        if status == 401:
            headers = [*headers, (b"www-authenticate", b"Bearer")]
        data = b"" if body is None else json.dumps(body).encode()
        head = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())] if body else []
        await send({"type": "http.response.start", "status": status, "headers": head + headers})
        await send({"type": "http.response.body", "body": data})
