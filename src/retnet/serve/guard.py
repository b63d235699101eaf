"""The checks every request passes before the API sees it, as one ASGI middleware:

1. Host header: only localhost, loopback addresses, the bound host and --allowed-host values
   (DNS rebinding: a web page whose name now resolves to 127.0.0.1 still sends its own name).
2. API key: one `Authorization: Bearer KEY` header, compared in constant time (all but
   /health); never from the query string or another header.
3. POST bodies must be `application/json`: a browser sends that cross-origin only after a
   CORS preflight, which this server never grants, so a web page cannot start a generation.

Any exception the app did not turn into a response becomes an OpenAI-shaped 500 here, so the
connection stays usable (uvicorn closes a keep-alive connection after an unhandled error)."""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from retnet.serve.validate import error_body

OPEN_PATHS = frozenset({"/health"})  # probes of load balancers carry no key and any Host
log = logging.getLogger("retnet.serve")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


# A Host header: a name or IPv4 address, or a bracketed IPv6 address, then an optional port.
_HOST = re.compile(r"(\[[0-9a-f:.]+\]|[^\[\]:]+)(?::[0-9]{1,5})?")


def host_name(header: str) -> str | None:
    """'Example.com:8000' -> 'example.com'; '[::1]:8000' -> '[::1]'; None if it is not of
    that form ('[::1].evil.com', 'a:b:c'), so that it matches no allowed name."""
    match = _HOST.fullmatch(header.strip().lower())
    return match[1] if match else None


def is_loopback(host: str) -> bool:
    """localhost or a loopback address (127.0.0.0/8, ::1; bracketed or not); any other name
    may resolve to a public address."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(bound: str, extra: list[str]) -> frozenset[str] | None:
    """The Host names accepted, besides loopback ones, for a server bound to `bound`; None
    accepts any ("*")."""
    if "*" in extra:
        return None
    names = {host_name(h) for h in extra} | {host_name(bound), host_name(f"[{bound}]")}
    return frozenset(names - {None})


class Guard:
    def __init__(self, app, api_key: str | None = None,
                 allowed_hosts: frozenset[str] | None = None) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        if refusal is not None:  # the body is never read: close rather than drain it
            status, message, code, headers = refusal
            headers = {**headers, "connection": "close"}
            return await _send_error(send, status, message, code, headers)
        started = False

        async def tracked(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            if started:  # a stream broke half way: nothing to say in its place
                raise
            log.exception("unhandled error in %s %s", scope["method"], scope["path"][:100])
            await _send_error(send, 500, "internal server error; the server log has the "
                              "details", "server_error")

    def _serves(self, host: str) -> bool:
        name = host_name(host)
        return self.hosts is None or (name is not None and (name in self.hosts
                                                            or is_loopback(name)))

    def _authorized(self, raw: list[tuple[bytes, bytes]]) -> bool:
        """Exactly one `Authorization: Bearer KEY` header (the scheme in any case), the whole
        key compared in constant time. Two Authorization headers are refused whichever holds
        the key: a proxy in front may have checked the other one."""
        values = [value for name, value in raw if name.lower() == b"authorization"]
        if len(values) != 1:
            return False
        scheme, _, token = values[0].partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)

    def _refusal(self, scope: Scope) -> tuple[int, str, str, dict] | None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["path"] in OPEN_PATHS:
            return None
        host = headers.get("host")
        # A request without Host (HTTP/1.0) cannot come from a browser, which always sends it.
        if host is not None and not self._serves(host):
            return (400, f"Host {host[:100]!r} is not served here; start the server with "
                    "--allowed-host NAME to accept it", "host_not_allowed", {})
        if self.key is not None and not self._authorized(scope["headers"]):
            return (401, "missing or incorrect API key: send one header "
                    "'Authorization: Bearer KEY'", "invalid_api_key",
                    {"www-authenticate": "Bearer"})
        if scope["method"] == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return (415, f"Content-Type must be application/json; got {kind[:60]!r}",
                        "unsupported_media_type", {})
        return None


async def _send_error(send: Send, status: int, message: str, code: str,
                      headers: dict | None = None) -> None:
    body = json.dumps(error_body(status, message, None, code)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
