"""Exported transformers folders load without retnet (trust_remote_code), with the chat template,
tie_word_embeddings and a model card; the wrapper's gradient checkpointing, hidden states and
refusal of assisted decoding."""

import ast
import json
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import retnet
from recall import episode_batch, recall_model
from retnet import RetNetConfig
from retnet.checkpoint import save_checkpoint
from retnet.hf import RetNetForCausalLM, RetNetHFConfig, bundle, export_checkpoint
from retnet.hf.export import save_hf_tokenizer
from retnet.tokenizer import DEFAULT_CHAT_TEMPLATE, ByteTokenizer

PROMPT = [256, *b"qwertyuiop|qwe"]  # the copy task: the next bytes come from the state
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "naïve {café} \"quoted\"\n"}]
META = {"corpus": {"source": "tests/recall.py", "fingerprint": "abc123"}, "documents": 7,
        "train_tokens": 123456, "metrics": {"val_loss": 0.0421, "val_bpb": 0.061}}

# Run under `python -I` (no PYTHONPATH, no script directory) from outside the repository, with
# retnet made unimportable before anything else runs: the folder alone must be enough.
CHILD = """
import sys
sys.modules["retnet"] = None  # `import retnet` (or any retnet.x) now raises ImportError
import json
import torch

folder, out, prompt, messages = sys.argv[1], sys.argv[2], *map(json.loads, sys.argv[3:])
# The model card's own instructions load the model and the tokenizer.
card = open(folder + "/README.md").read().split("```python")[1].split("```")[0]
names = {}
exec(card.replace('"path/to/this/folder"', repr(folder)), names)
model, tok = names["model"].eval(), names["tok"]
ids = torch.tensor([prompt])
with torch.no_grad():
    logits = model(ids).logits
    generated = model.generate(ids, max_new_tokens=8, do_sample=False)
json.dump({"module": type(model).__module__, "dtype": str(logits.dtype),
           "logits": logits.tolist(), "generated": generated.tolist(),
           "tie": model.config.tie_word_embeddings,
           "chat": tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
           "retnet": sorted(m for m, v in sys.modules.items() if m.split(".")[0] == "retnet"
                            and v is not None)}, open(out, "w"))
"""


def recall_hf(dtype=torch.float64) -> RetNetForCausalLM:
    """The state-sensitive copy model (tests/recall.py) inside the transformers wrapper."""
    config = RetNetHFConfig.from_retnet(RetNetConfig.from_preset("tiny", vocab_size=258),
                                        eos_token_id=256, pad_token_id=257, bos_token_id=256)
    model = RetNetForCausalLM(config)
    model.model.load_state_dict(recall_model().state_dict())
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A checkpoint of the copy model exported by `retnet export --hf`'s function, and what a
    fresh interpreter without retnet made of the folder."""
    root = tmp_path_factory.mktemp("export")
    model = recall_hf(torch.float32)
    ckpt = save_checkpoint(root / "run", 400, model.model.state_dict(), model.model.config,
                           ByteTokenizer(), {"step": 400}, META)
    folder = export_checkpoint(ckpt, root / "hf")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(root / "hf-home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    subprocess.run([sys.executable, "-I", "-c", CHILD, str(folder), str(root / "child.json"),
                    json.dumps(PROMPT), json.dumps(MESSAGES)],
                   cwd=root, env=env, stdin=subprocess.DEVNULL, check=True, timeout=300)
    return folder, json.loads((root / "child.json").read_text())


@pytest.mark.slow
def test_folder_loads_without_retnet_and_matches(exported):
    child = exported[1]
    assert child["retnet"] == [] and child["module"].endswith("modeling_retnet")
    ours = recall_hf(torch.float32)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        ref = ours(ids).logits
        generated = ours.generate(ids, max_new_tokens=8, do_sample=False)
    theirs = torch.tensor(child["logits"], dtype=torch.float32)
    assert child["dtype"] == "torch.float32"
    assert (theirs - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert child["generated"] == generated.tolist()
    assert bytes(generated[0, len(PROMPT):len(PROMPT) + 7]) == b"rtyuiop"  # it copies


@pytest.mark.slow
def test_remote_code_is_generated_from_source(exported):
    folder, _ = exported
    code = bundle.remote_code()
    assert {name: (folder / name).read_text() for name in code} == code
    # Every function and class of the package modules is in the bundle verbatim.
    for name, paths in ((bundle.CONFIG_FILE, bundle.CONFIG_MODULES),
                        (bundle.MODELING_FILE, bundle.MODELING_MODULES)):
        for path in paths:
            source = (Path(retnet.__file__).parent / path).read_text()
            for node in ast.parse(source).body:
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    assert ast.get_source_segment(source, node) in code[name], (path, node.name)
        assert "import retnet" not in code[name] and "from retnet" not in code[name]
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == bundle.AUTO_MAP
    assert config["tie_word_embeddings"] is True and config["model_type"] == "retnet_exact"


def test_bundle_refuses_a_missing_dependency(monkeypatch, tmp_path):
    monkeypatch.setattr(bundle, "MODELING_MODULES", bundle.MODELING_MODULES[1:])  # no rotary
    with pytest.raises(bundle.BundleError, match=r"modules/retention.py imports rotary_factors"):
        bundle.write_remote_code(tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_tie_word_embeddings_follows_tie_embeddings(exported):
    assert exported[1]["tie"] is True
    untied = RetNetConfig.from_preset("tiny", vocab_size=258, tie_embeddings=False)
    config = RetNetHFConfig.from_retnet(untied)
    assert config.tie_word_embeddings is False and config.to_dict()["tie_word_embeddings"] is False
    assert RetNetHFConfig(**config.to_dict()).tie_word_embeddings is False


def retnet_chat(template: dict, prompt: bool = True) -> str:
    """The text retnet's own chat rendering (retnet.tokenizer.render_chat) makes of MESSAGES."""
    text = "".join(template["message"].format(role=m["role"], content=m["content"])
                   for m in MESSAGES)
    return text + (template["generation_prompt"] if prompt else "")


@pytest.mark.slow
def test_chat_template_renders_like_retnet(exported):
    folder, child = exported
    assert child["chat"] == retnet_chat(DEFAULT_CHAT_TEMPLATE)
    assert "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())


@pytest.mark.parametrize("template", [
    {"message": "\n{role}: {{{{x}}}} {content} {{% raw %}}'\"\\\n", "generation_prompt": "\n{%"},
    {"message": "[{content}]", "generation_prompt": ""},
], ids=["jinja-syntax-in-literals", "no-role-no-prompt"])
def test_any_chat_template_exports_exactly(tmp_path, template):
    save_hf_tokenizer(ByteTokenizer(), tmp_path, template)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    for prompt in (True, False):
        text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=prompt)
        assert text == retnet_chat(template, prompt)


@pytest.mark.slow
def test_model_card(exported):
    card = (exported[0] / "README.md").read_text()
    params = recall_model().num_parameters()
    for text in ("trust_remote_code=True", f"| parameters | {params:,} |", "| d_model | 64 |",
                 "## Training data", "| corpus.source | `tests/recall.py` |",
                 "| train_tokens | 123,456 |", "| step | 400 |", "## Metrics",
                 "| val_loss | 0.0421 |"):
        assert text in card


def grads(model: RetNetForCausalLM, ids: torch.Tensor, labels: torch.Tensor) -> list:
    model.zero_grad()
    model(ids, labels=labels).loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_gradient_checkpointing_gives_the_same_gradients():
    model = recall_hf().train()
    ids, labels = episode_batch(random.Random(0), 2, episodes=2)
    calls = []
    model.model.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    plain = grads(model, ids, labels)
    with warnings.catch_warnings():  # 5.x: renamed activation_checkpointing_enable, same thing
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable()
        assert model.model.activation_checkpointing and model.is_gradient_checkpointing
        checkpointed = grads(model, ids, labels)
        model.gradient_checkpointing_disable()
    assert not model.model.activation_checkpointing
    assert len(calls) == 3  # once without, twice with (the recomputation in backward)
    assert all(torch.equal(a, b) for a, b in zip(plain, checkpointed))


def test_output_hidden_states_are_block_inputs_then_final_norm():
    model = recall_hf()
    seen = []
    for block in model.model.blocks:
        block.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    model.model.norm.register_forward_hook(lambda m, args, out: seen.append(out))
    ids = torch.tensor([PROMPT, PROMPT[::-1]])
    out = model(ids, output_hidden_states=True)
    n, d = model.config.n_layers, model.config.d_model
    assert len(out.hidden_states) == n + 1 == len(seen)
    assert all(h.shape == (2, len(PROMPT), d) for h in out.hidden_states)
    assert all(torch.equal(h, s) for h, s in zip(out.hidden_states, seen))
    assert torch.equal(out.logits, out.hidden_states[-1] @ model.model.embed.weight.T)
    assert model(ids).hidden_states is None


def test_generate_returns_hidden_states_per_step():
    model = recall_hf()
    out = model.generate(torch.tensor([PROMPT]), max_new_tokens=3, do_sample=False,
                         output_hidden_states=True, return_dict_in_generate=True)
    assert [len(step) for step in out.hidden_states] == [3, 3, 3]
    assert [step[-1].shape[1] for step in out.hidden_states] == [len(PROMPT), 1, 1]


@pytest.mark.parametrize("option", [{"prompt_lookup_num_tokens": 3}, {"assistant_model": None}],
                         ids=["prompt-lookup", "assistant-model"])
def test_assisted_decoding_is_refused_with_the_reason(option):
    model = recall_hf()
    option = {k: model if k == "assistant_model" else v for k, v in option.items()}
    with pytest.raises(ValueError, match="state cannot be rolled back"):
        model.generate(torch.tensor([PROMPT]), max_new_tokens=3, do_sample=False, **option)


def test_hand_written_loop_passes_retnet_cache():
    model = recall_hf()
    ids = torch.tensor([PROMPT])
    first = model(ids[:, :-1])
    step = model(ids[:, -1:], retnet_cache=first.retnet_cache)
    assert torch.allclose(step.logits[:, -1], model(ids).logits[:, -1], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="retnet_cache=out.retnet_cache"):
        model(ids[:, -1:], past_key_values=first.retnet_cache)
