"""The server's OpenAI / vLLM surface beyond plain generation: echo with prompt logprobs (what
lm_eval's local-completions scores with), lists of prompts, presence / frequency penalties, the
tokenizer endpoints, Prometheus metrics, and vLLM's option names. References are float64
forwards of the whole sequence and a hand-written decode loop, never the engine."""

import json
import math
import random

import httpx
import pytest
import torch

from recall import episode, random_word, save_recall_run
from servers import post, start_server, stop_server


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    run = save_recall_run(tmp_path_factory.mktemp("serve_openai") / "run")
    s = start_server(run, max_batch=4, max_prompt_tokens=600, max_tokens=32)
    yield s
    stop_server(s)


def history_prompt(seed: int, words: int) -> str:
    """Copy episodes, then a word and '|': the model's next letters depend on the history."""
    rng = random.Random(seed)
    return "".join(episode(random_word(rng)) for _ in range(words)) + random_word(rng) + "|"


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(token t | tokens before t) for t ≥ 1, from one float64 parallel forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]), mode="parallel").logits[0].double()
    return logits.log_softmax(-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def completion(srv, **body) -> dict:
    r = post(srv, "/v1/completions", {"model": srv.name, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_echo_returns_the_prompt_and_its_logprobs(srv):
    # 300+ tokens: the prompt is read in several segments (the prefix cache's 256-token points)
    prompt = history_prompt(0, 14)
    ids = srv.tok.encode(prompt)
    assert len(ids) > 300
    # First without echo: its states at the 256-token points are cached, and echo must not
    # skip the positions they cover.
    plain = completion(srv, prompt=prompt, max_tokens=3)["choices"][0]["text"]
    out = completion(srv, prompt=prompt, max_tokens=3, logprobs=2, echo=True)
    choice = out["choices"][0]
    assert choice["text"] == prompt + plain
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 3
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    got = torch.tensor(lp["token_logprobs"][1:len(ids)], dtype=torch.float64)
    torch.testing.assert_close(got, reference_logprobs(srv.model, ids), rtol=0, atol=1e-9)
    for logprob, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert len(top) == 2 and max(top.values()) >= logprob - 1e-12
    offsets = [0]
    for token in lp["tokens"][:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp["text_offset"] == offsets
    assert "".join(lp["tokens"]) == choice["text"]


def test_echo_top_logprobs_are_the_most_likely_tokens(srv):
    prompt = history_prompt(1, 2)
    ids = srv.tok.encode(prompt)
    lp = completion(srv, prompt=ids, max_tokens=1, logprobs=3, echo=True)["choices"][0][
        "logprobs"]
    with torch.no_grad():
        ref = srv.model(torch.tensor([ids]), mode="parallel").logits[0].double().log_softmax(-1)
    for pos in range(1, len(ids)):
        values, indices = ref[pos - 1].topk(3)
        expected = {srv.tok.decode([int(i)]): float(v) for i, v in zip(indices, values)}
        got = lp["top_logprobs"][pos]
        assert got.keys() == expected.keys()
        assert all(math.isclose(got[k], expected[k], abs_tol=1e-9) for k in got)


def test_a_list_of_prompts_answers_each_in_order(srv):
    prompts = [history_prompt(s, 3) for s in (2, 3, 4)]
    out = completion(srv, prompt=[prompts[0], srv.tok.encode(prompts[1]), prompts[2]],
                     max_tokens=6, n=2, echo=True, logprobs=0)
    assert [c["index"] for c in out["choices"]] == list(range(6))
    for i, prompt in enumerate(prompts):
        alone = completion(srv, prompt=prompt, max_tokens=6)["choices"][0]["text"]
        for c in out["choices"][2 * i:2 * i + 2]:
            assert c["text"] == prompt + alone
            ids = srv.tok.encode(prompt)
            got = torch.tensor(c["logprobs"]["token_logprobs"][1:len(ids)], dtype=torch.float64)
            torch.testing.assert_close(got, reference_logprobs(srv.model, ids), rtol=0,
                                       atol=1e-9)
    prompt_tokens = sum(len(srv.tok.encode(p)) for p in prompts)
    assert out["usage"]["prompt_tokens"] == prompt_tokens


def penalised_greedy(model, ids: list[int], steps: int, presence: float, frequency: float
                     ) -> tuple[list[int], list[float]]:
    """OpenAI's penalties written out: each step's logits minus frequency × (times the token
    was generated) minus presence × (generated at all); greedy. Returns tokens and their
    unpenalised logprobs (what the API reports)."""
    ids, out, logprobs = list(ids), [], []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([ids]), mode="parallel").logits[0, -1].double()
        adjusted = logits.clone()
        for token in set(out):
            adjusted[token] -= frequency * out.count(token) + presence
        token = int(adjusted.argmax())
        logprobs.append(float(logits.log_softmax(-1)[token]))
        out.append(token)
        ids.append(token)
    return out, logprobs


@pytest.mark.parametrize("presence,frequency", [(0.0, 1.5), (1.2, 0.0), (-0.7, 0.4)])
def test_presence_and_frequency_penalties_match_a_reference_loop(srv, presence, frequency):
    prompt = history_prompt(5, 2)
    ids = srv.tok.encode(prompt)
    out = completion(srv, prompt=prompt, max_tokens=20, logprobs=0, ignore_eos=True,
                     presence_penalty=presence, frequency_penalty=frequency)
    tokens, logprobs = penalised_greedy(srv.model, ids, 20, presence, frequency)
    plain, _ = penalised_greedy(srv.model, ids, 20, 0.0, 0.0)
    assert tokens != plain  # the penalty changes this continuation: the test can fail
    lp = out["choices"][0]["logprobs"]
    assert lp["tokens"] == [srv.tok.decode([t]) for t in tokens]
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"], dtype=torch.float64),
                               torch.tensor(logprobs, dtype=torch.float64), rtol=0, atol=1e-9)


def test_tokenizer_endpoints_round_trip(srv):
    info = httpx.get(srv.url + "/tokenizer_info", timeout=10).json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 600
    text = "retention é gate"
    t = post(srv, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()
    assert t["tokens"] == srv.tok.encode(text) and t["count"] == len(t["tokens"])
    assert post(srv, "/tokenize", {"prompt": info["eos_token"]}).json()["tokens"] == [
        srv.tok.eos_id]
    assert post(srv, "/detokenize", {"tokens": t["tokens"]}).json() == {"prompt": text}
    for path, body in [("/tokenize", {"prompt": 3}), ("/detokenize", {"tokens": [10**9]}),
                       ("/detokenize", {"tokens": "ab"}), ("/tokenize", {"prompt": "a", "x": 1})]:
        r = post(srv, path, body)
        assert r.status_code == 400 and "error" in r.json(), (path, body)


def test_metrics_are_prometheus_text(srv):
    from prometheus_client.parser import text_string_to_metric_families

    before = srv.engine.snapshot()["generated_tokens"]
    completion(srv, prompt="abc|", max_tokens=4, ignore_eos=True)
    r = httpx.get(srv.url + "/metrics", timeout=10)
    assert r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    generated = families["retnet_generation_tokens"]
    assert generated.type == "counter"
    sample = next(s for s in generated.samples if s.name == "retnet_generation_tokens_total")
    assert sample.labels == {"model_name": srv.name} and sample.value >= before + 4
    assert families["retnet_num_requests_running"].type == "gauge"
    ttft = {s.name: s.value for s in families["retnet_time_to_first_token_seconds"].samples}
    assert ttft["retnet_time_to_first_token_seconds_count"] >= 1
    as_json = httpx.get(srv.url + "/metrics?format=json", timeout=10).json()
    assert as_json["generated_tokens"] >= before + 4
    assert httpx.get(srv.url + "/metrics?format=xml", timeout=10).status_code == 400


@pytest.mark.parametrize("body,word", [
    ({"prompt": "a", "presence_penalty": 2.5}, "presence_penalty"),
    ({"prompt": "a", "frequency_penalty": "1"}, "frequency_penalty"),
    ({"prompt": ["a", "b"], "stream": True}, "stream false"),
    ({"prompt": "a", "echo": True, "stream": True}, "stream false"),
    ({"prompt": ["a"] * 33}, "at most 32"),
    ({"prompt": ["a", "b"], "save_state": True}, "save_state"),
    ({"prompt": [[1, 2], [1.5]]}, "prompt must be"),
])
def test_bad_new_fields_get_one_line_errors(srv, body, word):
    r = post(srv, "/v1/completions", {"model": srv.name, **body})
    assert r.status_code == 400 and word in r.json()["error"]["message"], r.text


def test_max_model_len_and_chat_template_options(tmp_path, monkeypatch):
    import retnet.serve as serve_module
    from retnet.cli import main

    run = save_recall_run(tmp_path / "run")
    template = tmp_path / "chat.json"
    template.write_text(json.dumps({"message": "[{role}] {content}\n",
                                    "generation_prompt": "[assistant] "}))
    seen = []
    monkeypatch.setattr(serve_module, "serve", seen.append)
    assert main(["serve", "--checkpoint", str(run), "--max-model-len", "77",
                 "--chat-template", str(template)]) == 0
    assert seen[0].max_prompt_tokens == 77 and seen[0].chat_template == str(template)
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert main(["serve", "--checkpoint", str(run), "--chat-template",
                 str(tmp_path / "bad.jinja")]) == 2
    s = start_server(run, chat_template=str(template))
    try:
        r = post(s, "/v1/chat/completions", {"model": s.name, "max_tokens": 1, "messages": [
            {"role": "user", "content": "hi"}]}).json()
        assert r["usage"]["prompt_tokens"] == len("[user] hi\n[assistant] ")
        info = httpx.get(s.url + "/tokenizer_info", timeout=10).json()
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        rendered = ImmutableSandboxedEnvironment().from_string(info["chat_template"]).render(
            messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True)
        assert rendered == "[user] hi\n[assistant] "
    finally:
        stop_server(s)
