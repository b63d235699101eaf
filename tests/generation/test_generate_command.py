"""`retnet generate` on the copy model (tests/recall.py): stop strings, prompt files and
standard input, what is echoed, and the state saved after a stop, each against plain full
forwards of the growing sequence (no state carried)."""

import io
import random

import pytest
import torch

from recall import episode, random_word, save_recall_run
from reference import rel_err
from retnet.checkpoint import load_checkpoint
from retnet.cli import main
from retnet.generation.command import GenerateOptions, command
from retnet.model import load_state
from retnet.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
WORD = random_word(random.Random(5), 9, 9)
HISTORY = "".join(episode(random_word(random.Random(50 + i))) for i in range(2))
PROMPT = HISTORY + WORD + "|"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return save_recall_run(tmp_path_factory.mktemp("generate") / "run")


@pytest.fixture(scope="module")
def model(run):
    return load_checkpoint(run).build_model().double()


def cold_greedy(model, prompt: str, n: int) -> list[int]:
    """The reference: argmax of a full forward of the growing sequence, n times."""
    seq = TOK.encode(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(TOK.encode(prompt)):]


def generate_cli(*args) -> int:
    return main(["generate", "--max-new-tokens", "14", "--temperature", "0",
                 "--dtype", "float64", *args])


def test_the_copy_is_what_the_reference_makes(model):
    new = cold_greedy(model, PROMPT, 14)
    assert TOK.decode(new).startswith(WORD + "\n")  # the model needs its state for this


def test_a_stop_string_cuts_the_text_and_the_state_has_read_up_to_it(run, model, tmp_path,
                                                                    capsys):
    stop = WORD[4:6]
    out = tmp_path / "s.safetensors"
    assert generate_cli("--checkpoint", str(run), "--prompt", PROMPT, "--stop", "zzz",
                        "--stop", stop, "--state-out", str(out)) == 0
    new = cold_greedy(model, PROMPT, 14)
    text = TOK.decode(new)
    assert capsys.readouterr().out == PROMPT + text[:text.find(stop)] + "\n"
    # the state has consumed every token up to the one that completed the stop string
    k = next(i for i in range(1, 15) if stop in TOK.decode(new[:i]))
    state = load_state(out, model.config.fingerprint())
    ref = model(torch.tensor([TOK.encode(PROMPT) + new[:k]])).state
    assert int(state.offset[0]) == len(TOK.encode(PROMPT)) + k
    assert max(rel_err(a, b) for a, b in zip(state.kv, ref.kv)) < 1e-10


def test_a_prompt_file_is_read_and_not_echoed(run, model, tmp_path, capsys):
    path = tmp_path / "doc.txt"
    path.write_text(PROMPT, encoding="utf-8")
    out = tmp_path / "s.safetensors"
    assert generate_cli("--checkpoint", str(run), "--prompt-file", str(path),
                        "--state-out", str(out), "--max-new-tokens", "10") == 0
    captured = capsys.readouterr()
    first = TOK.decode(cold_greedy(model, PROMPT, 10))
    assert captured.out == first + "\n"  # the continuation only, not the document
    assert "saved to" in captured.err
    # the saved state continues the document: the next copy needs all of it
    second = random_word(random.Random(6), 8, 8)
    assert generate_cli("--checkpoint", str(run), "--state-in", str(out), "--prompt",
                        second + "|", "--max-new-tokens", "8") == 0
    copy = TOK.decode(cold_greedy(model, PROMPT + first + second + "|", 8))
    assert capsys.readouterr().out == second + "|" + copy + "\n"
    assert copy == second


def test_chat_renders_the_message_with_the_template_and_prints_the_answer(run, model, capsys):
    """--chat MESSAGE: the prompt is the user turn in the run's chat template (none saved here:
    the default, written out by hand below) and the assistant's generation prompt; only the
    answer is printed, as greedy full forwards of that text give it."""
    message = HISTORY + WORD + "|"
    assert generate_cli("--checkpoint", str(run), "--chat", message) == 0
    rendered = "<|user|>\n" + message + "\n<|assistant|>\n"
    new = cold_greedy(model, rendered, 14)
    if TOK.eos_id in new:
        new = new[:new.index(TOK.eos_id)]
    assert capsys.readouterr().out == TOK.decode(new) + "\n"
    assert main(["generate", "--checkpoint", str(run), "--chat", "hi", "--prompt", "x"]) == 2


def test_the_prompt_from_standard_input(run, model, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(PROMPT.encode())))
    assert command(GenerateOptions(checkpoint=str(run), prompt_file="-", max_new_tokens=14,
                                   temperature=0.0, dtype="float64", device="cpu",
                                   stop=["\n"])) == 0
    assert capsys.readouterr().out == WORD + "\n"  # the copy, cut at its newline


@pytest.mark.parametrize("args,message", [
    (["--prompt", "a", "--prompt-file", "p.txt"], "not --prompt and --prompt-file"),
    (["--chat", "hi", "--prompt", "a"], "one of --prompt, --prompt-file and --chat"),
    (["--prompt-file", "missing.txt"], "--prompt-file missing.txt is not a file"),
    (["--prompt-file", "latin1.txt"], "is not UTF-8 text"),
    (["--stop", ""], "--stop needs non-empty"),
    (["--device", "quantum"], "invalid device 'quantum'"),
    (["--top-p", "0"], "--top-p must be a finite number in (0, 1]"),
    (["--num-samples", "0"], "--num-samples must be an integer in [1, 256]"),
    (["-n", "2", "--state-out", "s.safetensors"], "--state-out saves one state"),
])
def test_bad_options_exit_2_with_one_line_before_the_model_loads(run, tmp_path, monkeypatch,
                                                                  capsys, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("x")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    monkeypatch.setattr("retnet.generation.command.load_run", None)  # never reached
    assert generate_cli("--checkpoint", str(run), *args) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and message in err, err


@pytest.mark.parametrize("weights", [["--dtype", "float32"], ["--dtype", "bfloat16"],
                                     ["--quantization", "int8"]], ids=["f32", "bf16", "int8"])
def test_every_weight_format_copies_through_the_fused_step(run, weights, capsys, kernels_on):
    """The copy needs the state; each format's CLI run says it decodes with the fused kernel."""
    assert main(["generate", "--max-new-tokens", "12", "--temperature", "0", "--checkpoint",
                 str(run), "--prompt", PROMPT, *weights]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(PROMPT) and out[len(PROMPT):].startswith(WORD + "\n")
    fmt = {"float32": "float32", "bfloat16": "bfloat16", "int8": "int8"}[weights[1]]
    assert f"decode: fused CPU kernel ({fmt} weights" in err


def test_int8_needs_float32_weights(run, capsys):
    assert main(["generate", "--checkpoint", str(run), "--prompt", "a", "--quantization",
                 "int8", "--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["retnet generate: error: --quantization int8 quantises float32 weights: leave "
                   "--dtype at float32 (got bfloat16)"]


def test_num_samples_are_the_runs_of_successive_seeds(run, capsys):
    """-n 4 decodes four rows together; sample i is the text a run alone with --seed 7+i
    prints (each row has its own generator), and the samples differ."""
    args = ["--checkpoint", str(run), "--prompt", "ab", "--temperature", "1.5", "--stop", "|"]
    assert generate_cli(*args, "-n", "4", "--seed", "7") == 0
    out = capsys.readouterr().out
    assert out.startswith("ab\n--- sample 0 ---\n")
    samples = [part.split("\n", 1)[1] for part in out.rstrip("\n").split("--- sample ")[1:]]
    alone = []
    for i in range(4):
        assert generate_cli(*args, "--seed", str(7 + i)) == 0
        alone.append(capsys.readouterr().out.removeprefix("ab").removesuffix("\n"))
    assert [s.rstrip("\n") for s in samples] == [a.rstrip("\n") for a in alone]
    assert len(set(alone)) > 1


class _Recorder:
    """A stand-in for stdout or stderr that logs every write, in order, into one list."""

    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def write(self, text: str) -> int:
        self.log.append((self.name, text))
        return len(text)

    def flush(self) -> None:
        pass


def test_notices_go_to_stderr_once_before_any_text(run, monkeypatch, kernels_on):
    """bf16 weights: the head-norm kernel's note (printed while the prompt is read) came after
    the echoed prompt, so on a terminal it sat inside the text; and it read like a failure."""
    from retnet.kernels import switch

    monkeypatch.setattr(switch, "_noticed", set())
    log: list = []
    monkeypatch.setattr("sys.stdout", _Recorder("out", log))
    monkeypatch.setattr("sys.stderr", _Recorder("err", log))
    assert main(["generate", "--max-new-tokens", "6", "--temperature", "0", "--checkpoint",
                 str(run), "--prompt", PROMPT, "--dtype", "bfloat16"]) == 0
    first_text = next(i for i, (name, text) in enumerate(log) if name == "out" and text)
    notices = [text for name, text in log if name == "err" and text.strip()]
    late = [text for name, text in log[first_text:] if name == "err" and text.strip()]
    assert "".join(text for name, text in log if name == "out").startswith(PROMPT)
    assert any("decode:" in n for n in notices) and any("retnet: note:" in n for n in notices)
    assert late == [] and len(notices) == len(set(notices)), notices
    assert not any("using the PyTorch reference" in n for n in notices)
