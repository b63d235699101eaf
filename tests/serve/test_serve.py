"""The HTTP server, over real sockets on 127.0.0.1: equivalence with generate() under
continuous batching, the OpenAI client, the prefix cache, disconnects, limits and errors."""

import asyncio
import json
import random
import threading
import time

import httpx
import pytest

from recall import episode, random_word, save_recall_run
from servers import post, reference, start_server, stop_server


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """The copy model (tests/recall.py): its continuations depend on the whole prompt, so a
    state mixed up between requests or rows changes the text."""
    return save_recall_run(tmp_path_factory.mktemp("serve") / "run")


@pytest.fixture(scope="module")
def srv(run_dir):
    s = start_server(run_dir, max_batch=6, max_queue=32, max_prompt_tokens=600, max_tokens=64,
                     max_request_kib=16)
    yield s
    stop_server(s)


@pytest.mark.slow
def test_concurrent_streams_equal_generate(srv):
    """16 streaming clients, prompt lengths 1..300, staggered arrivals, a batch of at most 6:
    continuous batching changes nothing."""
    rng = random.Random(1)
    prompts = []
    for _ in range(16):  # whole copy episodes, then a word to copy: 1 to about 300 bytes
        history = "".join(episode(random_word(rng)) for _ in range(rng.randint(0, 10)))
        prompts.append((history + random_word(rng) + "|")[-rng.randint(1, 300):])
    async def client(i, prompt):
        await asyncio.sleep(0.02 * rng.random() * i)
        text = ""
        async with httpx.AsyncClient(timeout=60) as c, c.stream(
                "POST", srv.url + "/v1/completions",
                json={"model": srv.name, "prompt": prompt, "max_tokens": 24,
                      "temperature": 0, "stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    async def main():
        return await asyncio.gather(*(client(i, p) for i, p in enumerate(prompts)))

    texts = asyncio.run(main())
    for prompt, text in zip(prompts, texts):
        assert text == reference(srv, srv.tok.encode(prompt), 24)
    assert srv.engine.snapshot()["batch_size_max"] > 1


def test_openai_client_completions_and_chat(srv):
    from openai import OpenAI

    client = OpenAI(base_url=srv.url + "/v1", api_key="unused", timeout=30)
    assert [m.id for m in client.models.list().data] == [srv.name]
    c = client.completions.create(model=srv.name, prompt="the gate", max_tokens=8,
                                  temperature=0)
    assert c.choices[0].text == reference(srv, srv.tok.encode("the gate"), 8)
    assert c.usage.prompt_tokens == 8 and c.usage.completion_tokens >= 1
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model=srv.name, prompt="the gate", max_tokens=8, temperature=0, stream=True))
    assert streamed == c.choices[0].text
    msgs = [{"role": "user", "content": "what decays?"}]
    chat = client.chat.completions.create(model=srv.name, messages=msgs, max_tokens=6,
                                          temperature=0, logprobs=True, top_logprobs=2)
    assert chat.choices[0].message.role == "assistant"
    assert len(chat.choices[0].logprobs.content[0].top_logprobs) == 2
    parts = [ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model=srv.name, messages=msgs, max_tokens=6, temperature=0, stream=True) if ch.choices]
    assert "".join(parts) == chat.choices[0].message.content


def test_n_choices_share_one_prefill_and_seeds_reproduce(srv):
    body = {"model": srv.name, "prompt": "state", "max_tokens": 10, "temperature": 1.0,
            "n": 3, "seed": 7}
    a, b = post(srv, "/v1/completions", body).json(), post(srv, "/v1/completions", body).json()
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    assert len({c["text"] for c in a["choices"]}) > 1  # choices draw different samples
    assert a["usage"]["completion_tokens"] >= 3


def test_prefix_cache_skips_prefill_and_changes_nothing(srv):
    prompt = "the state keeps what matters " * 12  # over one 256-token boundary
    body = {"model": srv.name, "prompt": prompt, "max_tokens": 12, "temperature": 0}
    first = post(srv, "/v1/completions", body).json()
    before = srv.engine.snapshot()["prefilled_tokens"]
    second = post(srv, "/v1/completions", body).json()
    assert srv.engine.snapshot()["prefilled_tokens"] == before  # nothing prefilled again
    n = len(srv.tok.encode(prompt))
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == n
    assert first["choices"][0]["text"] == second["choices"][0]["text"] == reference(
        srv, srv.tok.encode(prompt), 12)
    longer = {**body, "prompt": prompt + "and more"}
    third = post(srv, "/v1/completions", longer).json()
    assert third["usage"]["prompt_tokens_details"]["cached_tokens"] == 256
    assert third["choices"][0]["text"] == reference(srv, srv.tok.encode(prompt + "and more"), 12)


def test_chat_turns_reuse_message_boundaries(srv):
    turn = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    post(srv, "/v1/chat/completions", {"model": srv.name, "messages": turn, "max_tokens": 4})
    nxt = turn + [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "why?"}]
    r = post(srv, "/v1/chat/completions", {"model": srv.name, "messages": nxt,
                                           "max_tokens": 4}).json()
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == len(
        srv.tok.encode("<|system|>\nbe brief\n<|user|>\nhello\n"))


def test_saved_state_continues_a_conversation(srv):
    a = post(srv, "/v1/completions", {"model": srv.name, "prompt": "retention", "max_tokens": 5,
                                      "temperature": 0, "save_state": True}).json()
    b = post(srv, "/v1/completions", {"model": srv.name, "prompt": " gate", "max_tokens": 6,
                                      "temperature": 0, "state_id": a["state_id"]}).json()
    ids = srv.tok.encode("retention" + a["choices"][0]["text"] + " gate")
    if a["choices"][0]["finish_reason"] == "length":  # no eos inside: plain concatenation
        assert b["choices"][0]["text"] == reference(srv, ids, 6)
    r = post(srv, "/v1/completions", {"model": srv.name, "prompt": "x", "state_id": "nope"})
    assert r.status_code == 404


def test_disconnect_frees_the_slot(srv):
    with httpx.Client(timeout=30) as c, c.stream(
            "POST", srv.url + "/v1/completions",
            json={"model": srv.name, "prompt": "a", "max_tokens": 64, "temperature": 1.0,
                  "stream": True, "ignore_eos": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break
    deadline = time.monotonic() + 10
    while srv.engine.snapshot()["active_sequences"]:
        assert time.monotonic() < deadline, "slot not freed"
        time.sleep(0.02)


@pytest.mark.parametrize("body,status,word", [
    ("{not json", 400, "not valid JSON"),
    ({"model": "gpt-9", "prompt": "a"}, 404, "does not exist"),
    ({"prompt": "a", "tools": []}, 400, "unsupported parameter"),
    ({"prompt": "a", "best_of": 3}, 400, "best_of is not supported"),
    ({"prompt": "a" * 700}, 400, "limit is 600"),
    ({"prompt": "a", "max_tokens": 65}, 400, "max_tokens must be between 1 and 64"),
    ({"prompt": "a", "temperature": 3}, 400, "temperature"),
    ({"prompt": "a", "n": 0}, 400, "n must be"),
    ({"prompt": "a", "stop": [1]}, 400, "stop must be"),
    ({"prompt": "a" * 20000}, 413, "request body over"),
    ({"prompt": {"a": 1}}, 400, "prompt must be"),
])
def test_bad_requests_get_clear_errors_and_the_server_lives(srv, body, status, word):
    if isinstance(body, dict):
        body = {"model": srv.name, **body}
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=30)
    else:
        r = httpx.post(srv.url + "/v1/completions", content=body, timeout=30,
                       headers={"content-type": "application/json"})
    assert r.status_code == status
    assert word in r.json()["error"]["message"]
    assert httpx.get(srv.url + "/health", timeout=10).json() == {"status": "ok"}


def test_full_queue_gets_429_with_retry_after(run_dir):
    s = start_server(run_dir, max_batch=1, max_queue=1, max_tokens=4000)
    try:
        body = {"model": s.name, "prompt": "a", "max_tokens": 4000, "stream": True,
                "ignore_eos": True}
        with httpx.Client(timeout=30) as c, c.stream("POST", s.url + "/v1/completions",
                                                     json=body) as first:
            lines = first.iter_lines()  # kept alive: dropping it would close the stream
            next(lines)  # active now

            def queued():
                with httpx.Client(timeout=30) as c2, c2.stream(
                        "POST", s.url + "/v1/completions", json=body) as r:
                    for _ in r.iter_lines():
                        break

            waiter = threading.Thread(target=queued, daemon=True)
            waiter.start()
            deadline = time.monotonic() + 10
            while s.engine.snapshot()["queued_requests"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            r = httpx.post(s.url + "/v1/completions", json={**body, "stream": False},
                           timeout=30)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
        waiter.join(timeout=30)
    finally:
        stop_server(s)


def test_metrics_and_models_endpoints(srv):
    m = httpx.get(srv.url + "/metrics?format=json", timeout=10).json()
    for key in ("requests", "generated_tokens", "active_sequences", "batch_size_max",
                "ttft_ms_mean", "step_ms_mean", "cached_tokens"):
        assert key in m
    assert httpx.get(srv.url + "/v1/models", timeout=10).json()["data"][0]["id"] == srv.name


def test_vllm_option_names_and_the_key_from_the_environment(run_dir, monkeypatch):
    """--served-model-name and --max-num-seqs (vLLM's names) set model_name and max_batch;
    $RETNET_API_KEY counts as --api-key unless the flag is given."""
    import retnet.serve as serve_module
    from retnet.cli import main

    seen = []
    monkeypatch.setattr(serve_module, "serve", seen.append)
    monkeypatch.setenv("RETNET_API_KEY", "sesame")
    assert main(["serve", "--checkpoint", str(run_dir), "--served-model-name", "m1",
                 "--max-num-seqs", "3"]) == 0
    assert (seen[0].model_name, seen[0].max_batch, seen[0].api_key) == ("m1", 3, "sesame")
    assert main(["serve", "--checkpoint", str(run_dir), "--model-name", "m2", "--max-batch",
                 "4", "--api-key", "other"]) == 0
    assert (seen[1].model_name, seen[1].max_batch, seen[1].api_key) == ("m2", 4, "other")
