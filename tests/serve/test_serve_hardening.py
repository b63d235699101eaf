"""The server against hostile and careless clients, over real sockets on 127.0.0.1: requests
validated whole before queueing, bounded bodies (chunked too), disconnects, OpenAI-shaped
errors on a connection that stays usable, API key and Host checks, draining, the engine's
in-flight count, and a fuzz."""

import asyncio
import http.client
import json
import random
import signal
import socket
import threading
import time
from collections import OrderedDict

import httpx
import pytest

from recall import episode, random_word, save_recall_run
from retnet.checkpoint import load_checkpoint
from retnet.generation import SamplingParams
from retnet.serve.engine import Engine, Request
from servers import check_completion, make_run
from servers import start_server as start
from servers import stop_server as stop


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("hardening") / "run")


@pytest.fixture(scope="module")
def srv(run_dir):
    s = start(run_dir, max_batch=2, max_queue=2, max_tokens=4000, max_request_kib=16,
              max_prompt_tokens=1000)
    yield s
    stop(s)


def post(s, body, path="/v1/completions", **kw):
    return httpx.post(s.url + path, json=body, timeout=30, **kw)


def wait_until(condition, what, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def assert_openai_error(r, status, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert len(err["message"]) < 600  # never the echoed input
    if param is not None:
        assert err["param"] == param
    return err


def test_invalid_stream_options_are_refused_before_anything_is_queued(srv):
    """Item 1: four such requests used to take both slots and the queue for 4000 tokens."""
    before = srv.engine.snapshot()["requests"]
    bad = {"model": srv.name, "prompt": "a", "max_tokens": 4000, "ignore_eos": True,
           "stream": True, "stream_options": "x"}
    for _ in range(4):
        assert_openai_error(post(srv, bad), 400, "stream_options")
    assert srv.engine.snapshot()["requests"] == before  # nothing reached the engine
    ok = post(srv, {"model": srv.name, "prompt": "a", "max_tokens": 2})
    assert ok.status_code == 200


def test_a_chunked_body_is_cut_at_the_limit(srv):
    """Item 2: no Content-Length, 17 KiB sent of an endless body: 413 at 16 KiB, not a wait
    for the rest (the old code buffered it all first)."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 1024
        sock.sendall(b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(17)))
        response = http.client.HTTPResponse(sock)
        response.begin()  # raises socket.timeout if the server waits for the terminating chunk
        assert response.status == 413
        assert "request body over" in json.loads(response.read())["error"]["message"]


def test_a_non_streaming_client_that_leaves_frees_its_slot(srv):
    """Item 3: the generation stops when the client disconnects, not after 4000 tokens."""
    generated = srv.engine.snapshot()["generated_tokens"]
    body = json.dumps({"model": srv.name, "prompt": "a", "max_tokens": 4000,
                       "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_until(lambda: srv.engine.snapshot()["active_sequences"] == 1, "never started")
    wait_until(lambda: srv.engine.snapshot()["active_sequences"] == 0, "slot not freed", 60)
    assert srv.engine.snapshot()["generated_tokens"] - generated < 4000


@pytest.mark.parametrize("body,param", [
    ({"prompt": "a", "state_id": ["x"]}, "state_id"),
    ({"prompt": "a", "state_id": {"a": 1}}, "state_id"),
    ('{"model": "M", "prompt": "\\ud800"}', "prompt"),
    ('{"model": "M", "messages": [{"role": "user", "content": "\\udfff"}]}', "messages"),
])
def test_bad_values_get_openai_errors_on_a_connection_that_stays_open(srv, body, param):
    """Item 4: these were plain-text 500s, after which the keep-alive connection was reset."""
    raw = (body.replace('"M"', json.dumps(srv.name)) if isinstance(body, str)
           else json.dumps({"model": srv.name, **body}))
    path = "/v1/chat/completions" if "messages" in raw else "/v1/completions"
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.request("POST", path, raw, {"Content-Type": "application/json"})
        r = conn.getresponse()
        err = json.loads(r.read())["error"]
        assert r.status == 400 and err["param"] == param, err
        first = conn.sock
        conn.request("POST", "/v1/completions", json.dumps(
            {"model": srv.name, "prompt": "a", "max_tokens": 2}),
            {"Content-Type": "application/json"})
        assert conn.getresponse().status == 200
        assert conn.sock is first  # the same connection served the next request
    finally:
        conn.close()


@pytest.mark.parametrize("extra,param", [
    ({"stream": "false"}, "stream"),
    ({"save_state": "no"}, "save_state"),
    ({"ignore_eos": 1}, "ignore_eos"),
    ({"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "include_usage"),
    ({"state_id": "x" * 10_000}, "state_id"),
    ({"max_tokens": 10**90}, "max_tokens"),
    ({"user": 3}, "user"),
    ({"model": "m" * 10_000}, "model"),
    ({"echo": 0}, "echo"),  # equal to false, but not false
    ({"best_of": True}, "best_of"),
    ({"frequency_penalty": False}, "frequency_penalty"),
])
def test_loose_types_are_refused_and_errors_stay_short(srv, extra, param):
    """Item 5: "false" is not false, and no error echoes kilobytes of input."""
    r = post(srv, {"model": srv.name, "prompt": "a", "max_tokens": 2, **extra})
    assert r.status_code in (400, 404)
    err = assert_openai_error(r, r.status_code)
    assert param in (err["param"] or err["message"])


@pytest.mark.parametrize("number,message", [
    ("1e999", "infinite"),  # json.loads makes it inf, which no range check should meet
    ("-" + "9" * 101, "101 digits"),  # int() of a long digit string is quadratic (< 3.10.7)
    ("1" + "0" * 4000, "4001 digits"),
])
def test_numbers_json_cannot_represent_are_invalid_json(srv, number, message):
    raw = f'{{"model": {json.dumps(srv.name)}, "prompt": "a", "temperature": {number}}}'
    r = httpx.post(srv.url + "/v1/completions", content=raw, timeout=30,
                   headers={"Content-Type": "application/json"})
    err = assert_openai_error(r, 400)
    assert err["code"] == "invalid_json" and message in err["message"], err


def test_a_state_evicted_after_validation_is_a_404(srv, monkeypatch):
    """The API checks state_id, then the engine may evict it before the request is queued:
    still the 404 (it was a 500), and the state is taken when queued, so that a later eviction
    cannot fail the prefill either."""
    class EvictedAfterTheCheck(OrderedDict):
        def __contains__(self, key):
            return True

    monkeypatch.setattr(srv.engine, "saved", EvictedAfterTheCheck())
    r = post(srv, {"model": srv.name, "prompt": "a", "max_tokens": 2, "state_id": "gone"})
    assert assert_openai_error(r, 404, "state_id")["code"] == "state_not_found"


def test_a_long_prompt_is_refused_untokenised_and_tokenising_is_off_the_event_loop(
        srv, monkeypatch):
    """5,000 characters cannot be 1,000 tokens of a byte tokenizer: refused before encode();
    a prompt that may fit is encoded in a worker thread, not on the event loop's."""
    tok, threads = srv.engine.tok, []
    real = tok.encode

    def encode(text):
        threads.append(threading.current_thread())
        return real(text)

    monkeypatch.setattr(tok, "encode", encode)
    for path, body in (("/v1/completions", {"prompt": "a" * 5000}),
                       ("/v1/chat/completions",
                        {"messages": [{"role": "user", "content": "a" * 5000}]})):
        r = post(srv, {"model": srv.name, "max_tokens": 2, **body}, path=path)
        assert assert_openai_error(r, 400, "prompt")["code"] == "context_length_exceeded"
    assert threads == []
    assert post(srv, {"model": srv.name, "prompt": "ab", "max_tokens": 2}).status_code == 200
    assert threads and srv.thread not in threads


def test_null_means_unset(srv):
    """Item 5: a null max_completion_tokens no longer overrides max_tokens."""
    r = post(srv, {"model": srv.name, "messages": [{"role": "user", "content": "hi"}],
                   "max_tokens": 3, "max_completion_tokens": None, "ignore_eos": True,
                   "temperature": None, "stop": None, "stream": None, "seed": None},
             path="/v1/chat/completions")
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3


@pytest.fixture(scope="module")
def keyed(run_dir):
    s = start(run_dir, api_key="sesame", allowed_host=["proxy.internal"], max_tokens=8)
    yield s
    stop(s)


@pytest.mark.parametrize("path,headers,status", [
    ("/v1/models", {}, 401),
    ("/v1/models", {"Authorization": "Bearer wrong"}, 401),
    ("/v1/models", {"Authorization": "sesame"}, 401),
    ("/metrics", {}, 401),
    ("/v1/models", {"Authorization": "Bearer sesame"}, 200),
    ("/health", {}, 200),
    ("/v1/models", {"Authorization": "Bearer sesame", "Host": "evil.example"}, 400),
    ("/v1/models", {"Authorization": "Bearer sesame", "Host": "proxy.internal:80"}, 200),
    ("/v1/models", {"Authorization": "Bearer sesame", "Host": "localhost:1"}, 200),
    ("/v1/models", {"Authorization": "Bearer sesame", "Host": "[::1].evil.example"}, 400),
    ("/v1/models", {"Authorization": "Bearer sesame", "Host": "localhost:1.evil.example"}, 400),
    ("/v1/models", {"Authorization": "Bearer sesame", "Host": "[::1]:8000"}, 200),
])
def test_api_key_and_host_header(keyed, path, headers, status):
    """Item 8: every endpoint but /health needs the key; Host must be one served here."""
    r = httpx.get(keyed.url + path, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    if status != 200:
        assert_openai_error(r, status)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          None])
def test_simple_cross_origin_posts_are_refused(keyed, srv, content_type):
    """Item 8: a web page can POST text/plain anywhere without a preflight; JSON only here."""
    body = json.dumps({"model": srv.name, "prompt": "a", "max_tokens": 2})
    headers = {"Content-Type": content_type} if content_type else {}
    for s, extra in ((srv, {}), (keyed, {"Authorization": "Bearer sesame"})):
        r = httpx.post(s.url + "/v1/completions", content=body, headers={**headers, **extra},
                       timeout=30)
        assert_openai_error(r, 415)
    ok = httpx.post(keyed.url + "/v1/completions", json={"model": keyed.name, "prompt": "a",
                                                         "max_tokens": 2},
                    headers={"Authorization": "Bearer sesame"}, timeout=30)
    assert ok.status_code == 200


@pytest.mark.slow
def test_drain_reports_503_and_ends_streams_with_a_final_event(run_dir):
    """Item 7: on SIGTERM /health says 503 draining (the port stays open), new requests get
    503, and a stream still running after the drain window ends with finish_reason and
    [DONE]; then the server exits."""
    s = start(run_dir, max_tokens=100_000, drain_s=1.0)
    body = {"model": s.name, "prompt": "a", "max_tokens": 100_000, "ignore_eos": True,
            "stream": True}
    with httpx.Client(timeout=30) as c, c.stream("POST", s.url + "/v1/completions",
                                                 json=body) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")
        s.server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
        wait_until(lambda: not s.engine.accepting, "not draining")
        health = httpx.get(s.url + "/health", timeout=10)
        assert (health.status_code, health.json()) == (503, {"status": "draining"})
        assert_openai_error(post(s, {**body, "stream": False}), 503)
        events = [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "abort"
    s.thread.join(timeout=20)
    assert not s.thread.is_alive()


def test_busy_sees_a_request_the_engine_holds_between_its_lists(run_dir):
    """Item 4: the engine thread has taken a request from the waiting list and not yet put it
    in its prefill list (here held there): drain's busy() must still count it in flight. It
    leaves the count with its last event, or when it is dropped as cancelled."""
    ckpt = load_checkpoint(run_dir)
    engine = Engine(ckpt.build_model(), ckpt.tokenizer, max_batch=2)
    entered, release = threading.Event(), threading.Event()
    real = engine._begin

    def held(request):
        entered.set()
        release.wait(20)
        return real(request)

    engine._begin = held
    events = []
    request = Request(prompt_ids=[97, 98], max_tokens=2, params=SamplingParams(temperature=0),
                      emit=events.append)
    try:
        engine.submit(request)
        assert entered.wait(20)
        assert engine.busy()
        release.set()
        wait_until(lambda: not engine.busy(), "still busy after its last event")
        assert events[-1].index == -1 and events[-1].usage["completion_tokens"] == 2
        gone = Request(prompt_ids=[97], max_tokens=2, params=SamplingParams(),
                       emit=events.append)
        gone.cancelled.set()  # its client left while it was queued
        engine.submit(gone)
        wait_until(lambda: not engine.busy(), "a cancelled request stayed in flight")
    finally:
        release.set()
        engine.shutdown(0)


def _fuzz_body(rng, name):
    values = [None, True, False, 0, -1, 1, 3, 2**70, 1.5, "", "x", "false", [], [1, "a"], {},
              {"include_usage": "x"}, {"include_usage": True}, [{"role": "user", "content": "hi"}],
              [{"role": 1}], ["a", "b"], [5, 6, 7], "a" * 300, [[1]], {"a": [None]}]
    keys = ["prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "n", "stream",
            "stop", "seed", "user", "stream_options", "save_state", "state_id", "ignore_eos",
            "logprobs", "top_logprobs", "echo", "best_of", "logit_bias", "suffix",
            "max_completion_tokens", "junk"]
    body = {k: rng.choice(values) for k in rng.sample(keys, rng.randint(0, 6))}
    body["model"] = name if rng.random() < 0.9 else rng.choice(values)
    return body


@pytest.fixture(scope="module")
def recall_run(tmp_path_factory):
    return save_recall_run(tmp_path_factory.mktemp("recall") / "run")


@pytest.mark.slow
def test_random_requests_leave_the_server_healthy_and_unchanged(recall_run):
    """A bounded fuzz: 300 random bodies, 8 at a time (random types in every field, some not
    JSON, some too large): every answer is 200 or an OpenAI-shaped 4xx, and afterwards a new
    prompt (nothing of it cached) to the state-sensitive copy model has the log-probabilities
    of a cold full forward."""
    s = start(recall_run, max_batch=4, max_queue=16, max_tokens=2, max_request_kib=16)
    rng = random.Random(0)
    prompt = "".join(episode(random_word(rng)) for _ in range(3)) + random_word(rng) + "|"
    probe = {"model": s.name, "prompt": prompt, "max_tokens": 2, "temperature": 0,
             "logprobs": 1}
    bodies = [json.dumps(_fuzz_body(rng, s.name)) if i % 10 else
              '{"prompt": [' * rng.randint(1, 3000) for i in range(300)]
    paths = [rng.choice(["/v1/completions", "/v1/chat/completions"]) for _ in bodies]

    async def fuzz():
        gate = asyncio.Semaphore(8)
        async with httpx.AsyncClient(timeout=30) as c:
            async def one(path, content):
                async with gate:
                    try:
                        return await c.post(s.url + path, content=content,
                                            headers={"Content-Type": "application/json"})
                    except httpx.TransportError:
                        # A body over the limit is answered 413 and the connection closed
                        # while the client may still be sending: it can see the reset first.
                        if len(content) <= 16 * 1024:
                            raise
                        return None
            return await asyncio.gather(*map(one, paths, bodies))

    try:
        for body, r in zip(bodies, asyncio.run(fuzz())):
            if r is None:
                continue
            assert r.status_code in (200, 400, 404, 413, 429), (body[:200], r.text)
            if r.status_code != 200:
                assert_openai_error(r, r.status_code)
        wait_until(lambda: s.engine.snapshot()["active_sequences"] == 0, "sequences left over")
        assert httpx.get(s.url + "/health", timeout=10).json() == {"status": "ok"}
        r = post(s, probe)
        assert r.status_code == 200, r.text
        assert check_completion(s, prompt, r.json()) == 0  # cached tokens: none
    finally:
        stop(s)
