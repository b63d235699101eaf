"""The server's prefix-state cache and saved states, on the state-sensitive copy model: every
continuation's log-probabilities equal a cold full forward of the whole prompt."""

import random

import httpx
import pytest

from recall import episode, random_word, save_recall_run
from servers import check_against_cold, check_completion, cold_greedy, start_server, stop_server

EPISODES = "".join(episode(random_word(random.Random(i))) for i in range(14))  # > 256 bytes
HISTORY = EPISODES[:EPISODES.index("\n", 60) + 1]  # whole episodes


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = start_server(save_recall_run(tmp_path_factory.mktemp("recall") / "run"), max_batch=4,
                     max_queue=16, max_prompt_tokens=2000, max_tokens=32, max_request_kib=64)
    yield s
    stop_server(s)


def complete(s, prompt: str, **body) -> dict:
    r = httpx.post(s.url + "/v1/completions", timeout=60, json={
        "model": s.name, "prompt": prompt, "max_tokens": 10, "temperature": 0, "logprobs": 1,
        **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_prompt_that_hits_its_own_cached_state(srv):
    word = random_word(random.Random(99))
    prompt = EPISODES + word + "|"
    n = len(srv.tok.encode(prompt))
    assert n > 256  # so the prompt also has an interior boundary at 256
    cold, warm = complete(srv, prompt), complete(srv, prompt)
    assert (check_completion(srv, prompt, cold), check_completion(srv, prompt, warm)) == (0, n)
    # the copy came out of the cached state
    assert (word + "\n").startswith(warm["choices"][0]["text"])


def test_a_longer_prompt_continues_from_a_shorter_cached_prefix(srv):
    word = random_word(random.Random(98))
    base = EPISODES + episode(word)
    complete(srv, base)  # stores states at 256 tokens and at its end
    other = random_word(random.Random(97))
    for extra in (other + "|", other[:2]):
        prompt = base + extra
        assert check_completion(srv, prompt, complete(srv, prompt)) == 256  # shared boundary


def chat(s, messages) -> tuple[list[str], list[float], int]:
    r = httpx.post(s.url + "/v1/chat/completions", timeout=60, json={
        "model": s.name, "messages": messages, "max_tokens": 8, "temperature": 0,
        "logprobs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    content = body["choices"][0]["logprobs"]["content"]
    return ([c["token"] for c in content], [c["logprob"] for c in content],
            body["usage"]["prompt_tokens_details"]["cached_tokens"])


def test_chat_turns_continue_from_message_boundaries(srv):
    from retnet.tokenizer import DEFAULT_CHAT_TEMPLATE, render_chat

    words = [random_word(random.Random(90 + i)) for i in range(3)]
    turn = [{"role": "system", "content": EPISODES[:120]},
            {"role": "user", "content": words[0] + "|"}]
    *first, _ = chat(srv, turn)
    nxt = turn + [{"role": "assistant", "content": words[0]},
                  {"role": "user", "content": words[1] + "|" + words[1][:3]}]
    *second, cached = chat(srv, nxt)
    ids, ends = render_chat(nxt, srv.tok, DEFAULT_CHAT_TEMPLATE)
    assert cached == ends[1]  # the end of the first turn's last message
    check_against_cold(srv, ids, *second)
    check_against_cold(srv, render_chat(turn, srv.tok, DEFAULT_CHAT_TEMPLATE)[0], *first)


def test_a_saved_state_continues_the_conversation(srv):
    word = random_word(random.Random(96), 8, 8)
    first = HISTORY + word + "|"
    r = complete(srv, first, max_tokens=3, save_state=True)
    said = r["choices"][0]["text"]
    assert said == word[:3]
    r2 = complete(srv, word[3:5], max_tokens=4, state_id=r["state_id"])
    check_completion(srv, first + said + word[3:5], r2)
    assert r2["choices"][0]["text"] == word[5:] + "\n"  # the saved state holds the whole word


@pytest.mark.parametrize("form", ["parallel", "chunkwise7"])
def test_the_engine_prefills_in_its_form_and_cuts_at_a_stop_string(srv, form):
    """An engine made with another prefill form: the tokens, log-probabilities and text equal
    the cold run's, the text cut before the stop string (TextStream in the engine)."""
    import threading

    from retnet.generation import SamplingParams
    from retnet.ops import PARALLEL, Form
    from retnet.serve.engine import Engine, Request

    model = srv.model
    engine = Engine(model, srv.tok, max_batch=2,
                    form=PARALLEL if form == "parallel" else Form("chunkwise", 7))
    word = random_word(random.Random(95), 9, 9)
    ids = srv.tok.encode(HISTORY + word + "|")
    events, done = [], threading.Event()

    def emit(event):
        events.append(event)
        if event.index == -1:
            done.set()

    stop = word[5:7]
    engine.submit(Request(prompt_ids=ids, max_tokens=12, params=SamplingParams(temperature=0),
                          emit=emit, stop=[stop]))
    try:
        assert done.wait(60)
    finally:
        engine.shutdown(0)
    new, logprobs = cold_greedy(srv, ids, 12)
    k = next(i for i in range(1, 13) if stop in srv.tok.decode(new[:i]))  # completes the stop
    got = [e for e in events if e.token is not None]
    assert [e.token for e in got] == new[:k]
    assert [e.logprob for e in got] == pytest.approx(logprobs[:k], abs=1e-5)
    text = srv.tok.decode(new)
    assert "".join(e.text for e in events if e.index == 0) == text[:text.find(stop)]
    assert [e.finish_reason for e in events if e.finish_reason] == ["stop"]
