"""lm-evaluation-harness's own API clients against a running `retnet serve`: `local-completions`
(with its remote tokenizer) scores like the in-process adapter `retnet eval` uses (same
log-likelihoods per request with a float64 model, same metrics), and `local-chat-completions`
generates what the chat template and greedy generate() give."""

import pytest

from recall import save_recall_run
from servers import LIMIT, evaluate, loglikelihoods, start_server, stop_server


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    run = save_recall_run(tmp_path_factory.mktemp("serve_lm_eval") / "run")
    s = start_server(run, max_batch=4)
    yield s
    stop_server(s)


@pytest.mark.slow
def test_local_completions_against_the_server_scores_like_retnet_eval(srv):
    from retnet.eval.harness import RetNetHarnessLM

    args = (f"base_url={srv.url}/v1/completions,model={srv.name},tokenizer_backend=remote,"
            "tokenized_requests=True,batch_size=3,max_retries=1")
    served = evaluate("local-completions", model_args=args)
    local = evaluate(RetNetHarnessLM(model=srv.model, tokenizer=srv.tok, batch_size=4))
    got, expected = loglikelihoods(served), loglikelihoods(local)
    assert len(got) == len(expected) >= 2 * LIMIT
    for (lp, greedy), (ref_lp, ref_greedy) in zip(got, expected):
        assert lp == pytest.approx(ref_lp, abs=1e-8) and greedy == ref_greedy
    for metric in ("acc,none", "acc_norm,none"):
        assert served["results"]["retnet_mc"][metric] == local["results"]["retnet_mc"][metric]


@pytest.mark.slow
def test_local_chat_completions_generates_what_the_chat_template_prompts(srv):
    """lm-eval's chat client on a generate-until task: each answer equals greedy generate()
    on the prompt rendered with the server's chat template, cut at the task's stop string."""
    import json

    from retnet.tokenizer import DEFAULT_CHAT_TEMPLATE, render_chat
    from servers import reference

    out = evaluate("local-chat-completions", tasks=["retnet_gen"], apply_chat_template=True,
                   model_args=f"base_url={srv.url}/v1/chat/completions,model={srv.name},"
                              "max_retries=1")
    samples = out["samples"]["retnet_gen"]
    assert len(samples) == min(LIMIT, 4)
    for sample in samples:
        messages = json.loads(sample["arguments"][0][0][0])  # a JsonChatStr (prompt,)
        ids, _ = render_chat(messages, srv.tok, DEFAULT_CHAT_TEMPLATE)
        assert sample["resps"][0][0] == reference(srv, ids, 8).split("\n")[0]
