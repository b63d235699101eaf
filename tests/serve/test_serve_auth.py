"""The API key check (serve/guard.py) on every route the app has, read from the app itself so
that a new endpoint is covered without editing this file: the empty token, every prefix of the
key, longer and altered keys, the key in the wrong case, other schemes and headers, the key in
the query string, two Authorization headers. The app runs in-process (httpx's ASGI transport):
the guard is ASGI middleware, so no socket is needed and each request takes about a millisecond.

Only the paths in guard.OPEN_PATHS (/health, for load balancers' probes) answer without the key,
and that set is pinned here: opening another path must be a deliberate change to this file."""

import asyncio
import base64
import re

import httpx
import pytest

from retnet.serve import ServeConfig, build_app
from retnet.serve import guard as guard_module
from servers import make_run

KEY = "sEsame-42"  # mixed case and a digit, so that case changes and prefixes all differ
OPEN = {"/health"}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("auth") / "run")
    app, engine, _ = build_app(ServeConfig(checkpoint=str(run), dtype="float64", api_key=KEY,
                                           max_tokens=2))
    yield app
    engine.shutdown(0)


def endpoints(app) -> list[tuple[str, str]]:
    """(method, path) for every route of the app, path parameters filled in."""
    found = []
    for route in app.routes:
        methods = getattr(route, "methods", None)
        assert methods, f"route {route!r} has no HTTP methods: teach this test to reach it"
        path = re.sub(r"\{[^}]*\}", "x", route.path)
        found += [(method, path) for method in sorted(methods)]
    return found


def keyed_endpoints(app) -> list[tuple[str, str]]:
    return [(m, p) for m, p in endpoints(app) if p not in OPEN]


def send_all(app, requests: list[tuple[str, str, list[tuple[str, str]]]]) -> list[httpx.Response]:
    """Each (method, path with query, headers as a list, duplicates kept) through the app; a
    POST carries `{}` as JSON, which no endpoint accepts, so nothing is ever generated."""
    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
            out = []
            for method, path, headers in requests:
                body = {"content": b"{}"} if method == "POST" else {}
                if method == "POST":
                    headers = [("Content-Type", "application/json"), *headers]
                out.append(await c.request(method, path, headers=headers, **body))
            return out
    return asyncio.run(run())


def refused_everywhere(app, variants: dict[str, list[tuple[str, str]]], query: str = ""):
    """Send every variant (name -> headers) to every keyed endpoint; each must be a 401 of the
    OpenAI shape asking for a Bearer key. Fails naming every endpoint and variant let through."""
    cases = [(m, p, name, headers) for m, p in keyed_endpoints(app)
             for name, headers in variants.items()]
    responses = send_all(app, [(m, p + query, headers) for m, p, _, headers in cases])
    through = [f"{m} {p}{query} with {name}: {r.status_code}"
               for (m, p, name, _), r in zip(cases, responses, strict=True)
               if r.status_code != 401]
    assert not through, "accepted without the key:\n" + "\n".join(through)
    for r in responses:
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"


def bearer(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


def test_the_routes_are_found_and_only_health_is_open(app):
    """The route list is read from the app: it must hold the endpoints known today (else the
    reading broke and the other tests would check nothing), and the open set is /health only."""
    found = endpoints(app)
    for expected in [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                     ("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/health")]:
        assert expected in found
    assert set(guard_module.OPEN_PATHS) == OPEN
    for method, path in endpoints(app):
        if path in OPEN:
            for headers in ([], bearer("wrong"), [("Host", "evil.example")]):
                r = send_all(app, [(method, path, headers)])[0]
                assert r.status_code == 200, (method, path, headers, r.text)


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_key_opens_every_endpoint(app, scheme):
    """The control: with the key (the scheme is case-insensitive, RFC 9110) no endpoint says 401,
    so the refusals below are the key's doing, not a missing route."""
    responses = send_all(app, [(m, p, [("Authorization", f"{scheme} {KEY}")])
                               for m, p in keyed_endpoints(app)])
    for (m, p), r in zip(keyed_endpoints(app), responses, strict=True):
        assert r.status_code not in (401, 404, 405), (m, p, r.text)
        if m == "GET":
            assert r.status_code == 200, (m, p, r.text)


def test_no_token_and_no_prefix_of_the_key_is_accepted(app):
    """A comparison of only the first len(token) bytes would take each of these."""
    variants = {"no Authorization header": [], "'Bearer' alone": [("Authorization", "Bearer")],
                "'Bearer ' and spaces": [("Authorization", "Bearer    ")]}
    variants |= {f"prefix {KEY[:n]!r}": bearer(KEY[:n]) for n in range(len(KEY))}
    refused_everywhere(app, variants)


def test_longer_altered_and_wrongly_cased_keys_are_refused(app):
    last = KEY[-1]
    variants = {name: bearer(token) for name, token in {
        "key + 'x'": KEY + "x", "key twice": KEY + KEY, "'x' + key": "x" + KEY,
        "key without its first character": KEY[1:],
        "last character changed": KEY[:-1] + chr(ord(last) ^ 1),
        "upper case": KEY.upper(), "lower case": KEY.lower(), "case swapped": KEY.swapcase(),
        "key and another word": f"{KEY} x", "key, then a second credential": f"{KEY}, Bearer x",
        "wrong": "wrong"}.items()}
    assert len({v[0][1] for v in variants.values()}) == len(variants)
    refused_everywhere(app, variants)


def test_other_schemes_and_headers_are_refused(app):
    def basic(user_pass: str) -> list[tuple[str, str]]:
        return [("Authorization", "Basic " + base64.b64encode(user_pass.encode()).decode())]

    refused_everywhere(app, {
        "Basic KEY:": basic(f"{KEY}:"), "Basic :KEY": basic(f":{KEY}"),
        "Basic user:KEY": basic(f"user:{KEY}"), "Basic KEY (not encoded)":
        [("Authorization", f"Basic {KEY}")], "Token KEY": [("Authorization", f"Token {KEY}")],
        "Digest KEY": [("Authorization", f"Digest {KEY}")],
        "no scheme": [("Authorization", KEY)], "Bearer:KEY": [("Authorization", f"Bearer:{KEY}")],
        "BearerKEY": [("Authorization", f"Bearer{KEY}")],
        "tab for the space": [("Authorization", f"Bearer\t{KEY}")],
        "X-API-Key": [("X-API-Key", KEY)], "api-key": [("api-key", KEY)],
        "Proxy-Authorization": [("Proxy-Authorization", f"Bearer {KEY}")],
        "Cookie": [("Cookie", f"api_key={KEY}")]})


@pytest.mark.parametrize("query", [f"?api_key={KEY}", f"?key={KEY}", f"?access_token={KEY}",
                                   f"?authorization=Bearer%20{KEY}", f"?token={KEY}"])
def test_the_key_in_the_query_string_is_refused(app, query):
    """Query strings end up in logs and browser history; the key is only read from the header
    (also with a wrong header beside it)."""
    refused_everywhere(app, {"query only": [], "query and a wrong header": bearer("wrong"),
                             "query and an empty token": bearer("")}, query)


def test_two_authorization_headers_are_refused(app):
    """Whichever one holds the key: a proxy in front may have checked (or logged) the other."""
    refused_everywhere(app, {
        "wrong, then the key": [("Authorization", "Bearer wrong"), *bearer(KEY)],
        "the key, then wrong": [*bearer(KEY), ("Authorization", "Bearer wrong")],
        "empty, then the key": [("Authorization", "Bearer "), *bearer(KEY)],
        "the key twice": [*bearer(KEY), *bearer(KEY)],
        "the key, then lower-case name": [*bearer(KEY), ("authorization", "Basic x")]})


def test_unknown_and_look_alike_paths_need_the_key(app):
    """A 404 without the key would tell a scanner which paths exist; /health's neighbours are
    not open."""
    paths = ["/nope", "/v1/nope", "/health/", "/HEALTH", "//health", "/health/../v1/models",
             "/v1/models/", "/"]
    responses = send_all(app, [("GET", p, []) for p in paths])
    assert [r.status_code for r in responses] == [401] * len(paths)


def test_the_key_is_compared_in_constant_time(app, monkeypatch):
    """Every key check goes through hmac.compare_digest with the whole stored key (not a slice of
    it, not `==`), so the answer's time says nothing about how much of a token was right."""
    seen = []
    real = guard_module.hmac.compare_digest

    def spy(a, b):
        seen.append((bytes(a), bytes(b)))
        return real(a, b)

    monkeypatch.setattr(guard_module.hmac, "compare_digest", spy)
    tokens = ["", KEY[:3], KEY, KEY + "x", "wrong"]
    responses = send_all(app, [("GET", "/v1/models", bearer(t)) for t in tokens])
    assert [r.status_code for r in responses] == [401, 401, 200, 401, 401]
    assert seen == [(t.encode(), KEY.encode()) for t in tokens]
