"""Issue 37's serving items: chunked prefill beside decoding, fair shares per HTTP request,
a few prefix states per request, saved states bounded in bytes, and connection limits. The
scheduling is checked through its decisions (`scheduler`, `Engine.turns`), never wall time."""

import http.client
import logging
import socket
import threading
import time

import httpx
import pytest

from retnet.checkpoint import load_checkpoint
from retnet.generation import SamplingParams
from retnet.serve import connections
from retnet.serve.cache import StateStore
from retnet.serve.engine import Engine, Request
from retnet.serve.scheduler import Waiting, cache_points, pick, split_budget
from servers import make_run, start_server, stop_server


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("fair") / "run")


@pytest.fixture
def engine_of(run_dir):
    engines = []

    def make(**options) -> Engine:
        ckpt = load_checkpoint(run_dir)
        engines.append(Engine(ckpt.build_model(), ckpt.tokenizer, **options))
        return engines[-1]

    yield make
    for engine in engines:
        engine.shutdown(0)


def request(ids, events, max_tokens=2, tag=None, **fields) -> Request:
    """An engine request whose events land in `events` as (tag, event)."""
    return Request(prompt_ids=list(ids), max_tokens=max_tokens, ignore_eos=True,
                   params=SamplingParams(temperature=0),
                   emit=lambda ev: events.append((tag, ev)), **fields)


def wait_until(condition, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


# ---- the scheduler's decisions ------------------------------------------------------------

def test_the_prompt_budget_finishes_short_prompts_and_gives_the_rest_to_the_long():
    assert split_budget([5000, 7, 3000], 256) == [125, 7, 124]
    assert split_budget([3, 4], 256) == [3, 4]
    for needs in ([1, 2, 3], [1000] * 5, [300, 0, 9], [10] * 40):
        grants = split_budget(needs, 256)
        assert sum(grants) <= 256 and all(0 <= g <= n for g, n in zip(grants, needs))
        assert sum(grants) == min(256, sum(needs))  # no budget left unused


def test_the_group_holding_fewest_rows_goes_first_within_its_share():
    big, small = [Waiting("big", 1)] * 3, [Waiting("small", 1)]
    # A newcomer goes before the other prompts of a request already decoding.
    assert pick(big + small, {"big": 2}, max_batch=8, share=4) == 3
    # A group at its share waits for its own rows; the others go on.
    assert pick(big, {"big": 4}, max_batch=8, share=4) is None
    assert pick(big + small, {"big": 4, "small": 1}, max_batch=8, share=4) == 3
    # The chosen one waits when it does not fit, and nobody passes it (no starvation).
    assert pick([Waiting("wide", 4), Waiting("x", 1)], {"y": 5}, max_batch=8, share=4) is None
    # A request wider than its share or the batch waits, then runs once it can.
    assert pick([Waiting("wide", 6)], {}, max_batch=8, share=4) == 0
    assert pick([Waiting("huge", 9)], {"y": 1}, max_batch=8, share=4) is None
    assert pick([Waiting("huge", 9)], {}, max_batch=8, share=4) == 0


def test_a_long_chat_keeps_at_most_eight_cache_points():
    ends = list(range(8, 1601, 8))  # 200 messages
    points = cache_points(1630, ends)
    assert len(points) == 8 and {8, 1600, 1630} <= set(points)
    assert cache_points(100) == [100] and cache_points(600, [5, 300]) == [5, 256, 300, 512, 600]


# ---- the engine ---------------------------------------------------------------------------

def hold_admission(engine):
    """Block the engine thread inside its first admission, so that requests submitted
    meanwhile are all waiting when it goes on; returns the gate to open."""
    entered, release = threading.Event(), threading.Event()
    real = engine._begin

    def held(req):
        if not release.is_set():
            entered.set()
            release.wait(20)
        return real(req)

    engine._begin = held
    return entered, release


def test_a_long_prompt_is_read_in_budgeted_chunks_between_decode_steps(engine_of):
    engine = engine_of(max_batch=8, prefill_tokens=64)
    events = []
    stream = request([97], events, max_tokens=400)
    engine.submit(stream)
    wait_until(lambda: engine.snapshot()["active_sequences"] == 1, "the stream never started")
    entered, release = hold_admission(engine)
    long, short = request([98] * 1000, events), request([99] * 5, events)
    engine.submit(long)
    assert entered.wait(20)
    engine.submit(short)
    release.set()
    wait_until(lambda: long.closed and short.closed, "the prompts were never read")
    turns = [t for t in engine.turns if dict(t.read).get(id(long))]
    assert len(turns) >= 1000 // 64
    for t in turns:  # the budget bounds each turn, and the stream decoded in every one
        assert sum(n for _, n in t.read) <= 64 and t.decoded >= 1
    # The short prompt was read whole in the first turn, beside the long one's first chunk.
    assert dict(turns[0].read).get(id(short)) == 5
    stream.cancelled.set()


def test_one_request_holds_its_share_and_a_newcomer_starts_before_its_other_prompts(
        engine_of):
    engine = engine_of(max_batch=4)  # a share of 2 rows per HTTP request
    events, group = [], object()
    entered, release = hold_admission(engine)
    batch = [request([97 + i], events, 30, tag=i, group=group) for i in range(4)]
    engine.submit(batch[0])
    assert entered.wait(20)
    for r in batch[1:]:
        engine.submit(r)
    newcomer = request([120], events, 2, tag="new")
    engine.submit(newcomer)
    release.set()
    wait_until(lambda: all(r.closed for r in batch + [newcomer]), "requests never ended")
    first, running, most = {}, set(), 0
    for i, (tag, ev) in enumerate(events):  # replayed in the order the engine emitted them
        first.setdefault(tag, i)
        if tag != "new" and ev.index >= 0:
            running.add(tag)
            most = max(most, len(running))
        if ev.finish_reason is not None:
            running.discard(tag)
    assert most == 2  # the batch had room for 4: the group kept to its share
    assert first["new"] < first[2]  # the newcomer did not queue behind the group's prompts


def test_a_200_message_chat_stores_few_states_within_the_cache_bound(engine_of):
    engine = engine_of(cache_bytes=1 << 30)
    one = engine.model.init_state(1).nbytes
    ids = [97, 10] * 200
    ends = list(range(2, 401, 2))
    events = []
    first = request(ids + [62], events, message_ends=ends)
    engine.submit(first)
    wait_until(lambda: first.closed, "the chat never ended")
    assert len(engine.cache) <= 8
    # Its next turn starts from the state at its last message end.
    turn = request(ids + [98, 10, 62], events, message_ends=ends + [402])
    engine.submit(turn)
    wait_until(lambda: turn.closed, "the next turn never ended")
    assert turn.cached_tokens == 400
    small = engine_of(cache_bytes=3 * one + 3 * 258 * 8)  # room for three entries
    again = request(ids + [62], events, message_ends=ends)
    small.submit(again)
    wait_until(lambda: again.closed, "the chat never ended")
    assert 0 < len(small.cache) <= 3 and small.cache.nbytes <= small.cache.max_bytes


# ---- saved states --------------------------------------------------------------------------

def test_saved_states_are_bounded_in_bytes_least_recently_used_first(engine_of):
    one = engine_of().model.init_state(1).nbytes
    engine = engine_of(state_bytes=int(2.5 * one))
    events, ids = [], []
    for i in range(4):
        r = request([97 + i], events, tag=i, save_state=True)
        engine.submit(r)
        wait_until(lambda r=r: r.closed, "the request never ended")
        ids.append(next(ev.state_id for tag, ev in events if tag == i and ev.state_id))
        if i == 1:
            assert engine.saved.get(ids[0]) is not None  # used: now the newest of the two
    assert len(engine.saved) == 2 and engine.saved.nbytes <= 2.5 * one
    assert engine.saved.get(ids[0]) is None and engine.saved.get(ids[3]) is not None
    m = engine.snapshot()
    assert (m["saved_state_bytes"], m["saved_states_evicted"]) == (2 * one, 2)


def test_the_state_store_keeps_the_one_used_last():
    store = StateStore(max_bytes=2 * 16)
    state = type("State", (), {"nbytes": 16})  # the store reads only nbytes
    for k in "abc":
        store.put(k, state())
        if k == "b":
            store.get("a")
    assert "a" in store and "c" in store and "b" not in store and store.evicted == 1


@pytest.fixture(scope="module")
def srv(run_dir):
    s = start_server(run_dir, max_batch=4, state_store_mib=0, max_connections=6,
                     read_timeout_s=1.0)
    yield s
    stop_server(s)


def test_save_state_on_a_server_without_a_state_store_is_a_400(srv):
    r = httpx.post(srv.url + "/v1/completions", timeout=30, json={
        "model": srv.name, "prompt": "a", "max_tokens": 1, "save_state": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "save_state"
    assert "--state-store-mib" in r.json()["error"]["message"]
    text = httpx.get(srv.url + "/metrics", timeout=10).text
    assert 'retnet_saved_states_bytes{model_name="run"} 0.0' in text


# ---- connections ---------------------------------------------------------------------------

def half_sent(port: int, head: bytes = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
              ) -> socket.socket:
    """A connection that sends `head` (never a whole request) and waits."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


@pytest.mark.slow
def test_connections_past_the_cap_are_closed_and_half_sent_headers_time_out(srv, caplog):
    caplog.set_level(logging.WARNING, logger="retnet.serve")
    held = [half_sent(srv.port) for _ in range(5)] + [half_sent(srv.port, b"")]  # one silent
    try:
        extra = [half_sent(srv.port) for _ in range(20)]
        assert all(closed_by_server(s) for s in extra)  # refused at once, not kept
        # The log says so once, not once per connection.
        assert sum("--max-connections" in r.getMessage() for r in caplog.records) == 1
        # The held ones are closed when their header deadline (--read-timeout-s) passes.
        assert all(closed_by_server(s) for s in held)
        r = httpx.post(srv.url + "/v1/completions", timeout=30, json={
            "model": srv.name, "prompt": "a", "max_tokens": 1})
        assert r.status_code == 200
    finally:
        for s in held + extra:
            s.close()


@pytest.mark.slow
def test_a_body_that_does_not_arrive_in_time_is_a_408(srv):
    with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        reply = b"".join(iter(lambda: sock.recv(4096), b""))  # until the server closes
    assert reply.startswith(b"HTTP/1.1 408") and b"--read-timeout-s" in reply


def test_the_connection_cap_stays_below_the_open_file_limit(monkeypatch):
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda _: (256, 4096))
    assert connections.connection_cap(512) == 256 - connections.RESERVED_FILES
    assert connections.connection_cap(100) == 100


def test_a_repeated_log_message_passes_once_per_interval():
    limit = connections.RateLimited(every_s=60)
    record = logging.LogRecord("asyncio", logging.ERROR, "", 0, "accept failed", None, None)
    assert [limit.filter(record) for _ in range(5)] == [True] + [False] * 4


@pytest.mark.slow
def test_half_sent_headers_of_a_second_request_on_a_kept_alive_connection_time_out(srv):
    """uvicorn's keep-alive timer stops at the first byte of the next request: the header
    deadline must start again there."""
    sock = half_sent(srv.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    with sock:
        first = http.client.HTTPResponse(sock)
        first.begin()
        assert first.status == 200 and first.read() == b'{"status":"ok"}'
        sock.sendall(b"GET /health HTTP/1.1\r\n")  # and nothing more
        assert closed_by_server(sock)
