"""The servers and runs the server tests share (a loopback server under the class `retnet
serve` runs, the runs they serve, and the checks against a cold full forward)."""


import socket
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
import torch

from retnet import RetNetConfig, RetNetLM, generate
from retnet.checkpoint import save_checkpoint
from retnet.serve import ServeConfig, build_app
from retnet.tokenizer import ByteTokenizer

LIMIT = 6  # lm-eval documents per task in the lm-eval client tests


def start_server(run, **options):
    """The app under the server class `retnet serve` runs, on a free loopback port."""
    from retnet.serve import uvicorn_config
    from retnet.serve.drain import DrainingServer

    cfg = ServeConfig(checkpoint=str(run), dtype="float64", **options)
    app, engine, name = build_app(cfg)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = DrainingServer(uvicorn_config(app, cfg, "critical"), engine, cfg.drain_s)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    port = sock.getsockname()[1]
    return SimpleNamespace(url=f"http://127.0.0.1:{port}", port=port, engine=engine, name=name,
                           server=server, thread=thread, model=engine.model, tok=engine.tok)


def stop_server(s):
    s.server.should_exit = True
    s.thread.join(timeout=20)


def reference(s, prompt_ids, max_tokens):
    ids = torch.tensor([prompt_ids])
    out = generate(s.model, ids, max_tokens, eos_token_id=s.tok.eos_id,
                   pad_token_id=s.tok.pad_id)[0, len(prompt_ids):].tolist()
    if s.tok.eos_id in out:
        out = out[:out.index(s.tok.eos_id)]
    return s.tok.decode(out)


def post(s, path, body, **kw):
    return httpx.post(s.url + path, json=body, timeout=30, **kw)


def make_run(folder):
    """A random tiny model saved as a run (no training: these tests are about the edges)."""
    torch.manual_seed(0)
    model = RetNetLM(RetNetConfig.from_preset("tiny", vocab_size=258))
    save_checkpoint(folder, 1, model.state_dict(), model.config, ByteTokenizer(),
                    {"optimizer": {}, "step": 1, "rng": {}}, {})
    return folder


def cold_greedy(s, prompt_ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """The reference: greedy tokens and their log-probabilities from plain full forwards of
    the growing sequence, no state carried."""
    seq = list(prompt_ids)
    logprobs = []
    with torch.no_grad():
        for _ in range(n):
            lp = s.model(torch.tensor([seq])).logits[0, -1].double().log_softmax(-1)
            seq.append(int(lp.argmax()))
            logprobs.append(lp[seq[-1]].item())
    return seq[len(prompt_ids):], logprobs


def check_against_cold(s, prompt_ids: list[int], tokens: list[str], logprobs: list[float]):
    """The server's tokens (as text) and log-probabilities equal the cold greedy run's."""
    assert len(tokens) == len(logprobs) > 0
    ids, ref = cold_greedy(s, prompt_ids, len(tokens))
    assert tokens == [s.tok.decode([t]) for t in ids]
    assert logprobs == pytest.approx(ref, abs=1e-5)  # the server reports them in float32


def check_completion(s, prompt: str, body: dict) -> int:
    """Checks a completion against the cold run; returns its cached prompt tokens."""
    lp = body["choices"][0]["logprobs"]
    check_against_cold(s, s.tok.encode(prompt), lp["tokens"], lp["token_logprobs"])
    return body["usage"]["prompt_tokens_details"]["cached_tokens"]


def evaluate(model, **kwargs) -> dict:
    # lm-eval's own models: its lazy import of them is skipped once any model (our "retnet")
    # is registered
    import lm_eval.models  # noqa: F401
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from retnet.eval.tasks import shipped_tasks

    kwargs.setdefault("tasks", ["retnet_mc"])
    return simple_evaluate(model=model, limit=LIMIT, log_samples=True,
                           task_manager=TaskManager(include_path=[str(shipped_tasks())]),
                           **kwargs)


def loglikelihoods(out: dict) -> list[tuple[float, bool]]:
    samples = sorted(out["samples"]["retnet_mc"], key=lambda s: s["doc_id"])
    return [tuple(r[0]) for s in samples for r in s["resps"]]
