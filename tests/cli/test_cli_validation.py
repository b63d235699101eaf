"""The bad invocations of issue #37 (items 7 and 8), table-driven: each is exit status 2 and one
line on stderr that names the option or file (no traceback), and nothing is written."""

import os
import shutil
from pathlib import Path

import pytest

from retnet import RetNetConfig, RetNetLM
from retnet.checkpoint import save_checkpoint
from retnet.cli import main
from retnet.options import Range
from retnet.tokenizer import ByteTokenizer


def save_run(folder: Path, weights_vocab: int = 258) -> Path:
    """A tiny run; with weights_vocab ≠ 258 its weights are another model's, under a config
    and manifest that agree with each other."""
    config = RetNetConfig.from_preset("tiny", vocab_size=258)
    model = RetNetLM(RetNetConfig.from_preset("tiny", vocab_size=weights_vocab))
    save_checkpoint(folder, 1, model.state_dict(), config, ByteTokenizer(),
                    {"optimizer": {}, "step": 1, "rng": {}}, {})
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli37")
    save_run(root / "run")
    save_run(root / "reshaped", weights_vocab=300)
    (root / "corpus.txt").write_text("the gate keeps the state\n" * 200)
    (root / "list.json").write_text("[1, 2]")
    (root / "empty.json").write_text("{}")
    (root / "binary.json").write_bytes(bytes(range(256)))
    (root / "broken.toml").write_text("steps = = 3\n")
    (root / "binary.toml").write_bytes(bytes(range(256)))
    (root / "broken.yaml").write_text("steps: [1\n")
    (root / "tokdir").mkdir()
    os.mkfifo(root / "pipe")
    return root


def train(f, *extra):
    return ["train", "--preset", "tiny", "--data", str(f / "corpus.txt"), "--out",
            str(f / "out"), "--steps", "2", "--seq-len", "16", *extra]


def gen(f, *extra):
    return ["generate", "--checkpoint", str(f / "run"), "--max-new-tokens", "2", *extra]


CASES = {
    # tokenizer files that are not tokenizers
    "tokenizer holding a list": (lambda f: train(f, "--tokenizer", str(f / "list.json")),
                                 "list.json is not a tokenizer file (a JSON list"),
    "tokenizer holding {}": (lambda f: train(f, "--tokenizer", str(f / "empty.json")),
                             "empty.json is not a tokenizer file (Model missing"),
    "binary tokenizer": (lambda f: train(f, "--tokenizer", str(f / "binary.json")),
                         "binary.json is not a tokenizer file (not UTF-8 text"),
    # option files that do not parse
    "broken TOML": (lambda f: ["train", "--config", str(f / "broken.toml")],
                    "broken.toml is not valid TOML (Invalid value"),
    "binary TOML": (lambda f: ["train", "--config", str(f / "binary.toml")],
                    "binary.toml is not valid TOML ("),
    "broken YAML": (lambda f: ["train", "--config", str(f / "broken.yaml")],
                    "broken.yaml is not valid YAML (while parsing a flow sequence); fix the "
                    "file, or pass the options as flags"),
    # numbers out of range, named by their flag (item 7's --lr among them)
    "lr inf": (lambda f: train(f, "--lr", "inf"), "--lr must be a finite number > 0; got inf"),
    "lr nan": (lambda f: train(f, "--lr", "nan"), "--lr must be a finite number > 0; got nan"),
    "clip nan": (lambda f: train(f, "--clip", "nan"), "--clip must be a finite number ≥ 0"),
    "beta2 1": (lambda f: train(f, "--beta2", "1"), "--beta2 must be a finite number in [0, 1)"),
    "seed -1": (lambda f: train(f, "--seed", "-1"), "--seed must be an integer in [0, "),
    "eval-batches -2": (lambda f: train(f, "--eval-batches", "-2"),
                        "--eval-batches must be an integer ≥ 1; got -2"),
    "eval-batches 0": (lambda f: train(f, "--eval-batches", "0"),
                       "--eval-batches must be an integer ≥ 1; got 0"),
    "stop-at -3": (lambda f: train(f, "--stop-at", "-3"), "--stop-at must be an integer ≥ 1"),
    "stop-at 0": (lambda f: train(f, "--stop-at", "0"), "--stop-at must be an integer ≥ 1; got 0"),
    "min-lr-ratio -3": (lambda f: train(f, "--min-lr-ratio", "-3"),
                        "--min-lr-ratio must be a finite number in [0, 1]; got -3.0"),
    "weight-decay -1": (lambda f: train(f, "--weight-decay", "-1"),
                        "--weight-decay must be a finite number ≥ 0; got -1.0"),
    "generate seed -1": (lambda f: gen(f, "--seed", "-1"), "--seed must be an integer in [0, "),
    "repetition penalty inf": (lambda f: gen(f, "--repetition-penalty", "inf"),
                               "--repetition-penalty must be a finite number > 0; got inf"),
    "eval batch size 0": (lambda f: ["eval", "--checkpoint", str(f / "run"), "--perplexity",
                                     "--batch-size", "0"], "--batch-size must be an integer ≥ 1"),
    # files the command would fail to write only after the work
    "state-out in /proc": (lambda f: gen(f, "--state-out", "/proc/version"),
                           "--state-out /proc/version: cannot create a file in /proc"),
    # a named pipe stands for a device: a broken check must never get to replace /dev/null
    "state-out onto a pipe": (lambda f: gen(f, "--state-out", str(f / "pipe")),
                              "/pipe is not a regular file"),
    # weights of another shape under a config and manifest that agree
    "weights of another shape": (
        lambda f: ["generate", "--checkpoint", str(f / "reshaped"), "--max-new-tokens", "2"],
        "1 weight(s) do not have the shape its config.json gives (embed.weight is [300, 64], "
        "the config makes [258, 64])"),
    "eval of weights of another shape": (
        lambda f: ["eval", "--checkpoint", str(f / "reshaped"), "--perplexity"],
        "1 weight(s) do not have the shape its config.json gives"),
    "export of weights of another shape": (  # every reader goes through load_checkpoint
        lambda f: ["export", "--hf", str(f / "reshaped"), str(f / "out")],
        "1 weight(s) do not have the shape its config.json gives"),
}
LINUX_ONLY = {"state-out in /proc": "/proc/version"}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_invocations_exit_2_with_one_line_naming_the_option(case, files, capsys):
    if case in LINUX_ONLY and not Path(LINUX_ONLY[case]).exists():
        pytest.skip(f"no {LINUX_ONLY[case]} here")
    args, message = CASES[case]
    before = sorted(files.rglob("*"))
    assert main(args(files)) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    # train makes its (empty) run directory before it reads the tokenizer
    written = set(files.rglob("*")) - set(before)
    assert written <= {files / "out"}, written
    shutil.rmtree(files / "out", ignore_errors=True)


@pytest.mark.slow
def test_an_unknown_eval_task_is_one_line(files, capsys):
    """lm-eval's KeyError was a traceback; checked against its task index (slow to build)."""
    pytest.importorskip("lm_eval")
    assert main(["eval", "--checkpoint", str(files / "run"), "--tasks",
                 "retnet_mc,nonexistent_task"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["retnet eval: error: --tasks: no lm-eval task, group or tag named "
                     "'nonexistent_task'; list them with `retnet lm-eval ls tasks`, or pass a "
                     "task YAML file (or a folder of them with --include-path)"]


def test_tokenizer_out_onto_a_directory_leaves_nothing(files, capsys):
    """It failed after training, leaving DIR.tmpPID and naming that temporary file."""
    pytest.importorskip("tokenizers")
    before = sorted(files.rglob("*"))
    out = files / "tokdir"
    assert main(["tokenizer", "train", "--out", str(out), "--data", str(files / "corpus.txt"),
                 "--vocab-size", "300"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"retnet tokenizer: error: --out {out} is a directory; name the file to "
                     f"write, such as {out / 'tokenizer.json'}"]
    assert sorted(files.rglob("*")) == before


@pytest.mark.parametrize("bounds,good,bad,text", [
    (Range(0, low_open=True), [1e-9, 3], [0, -1, float("inf"), float("nan")], "> 0"),
    (Range(0, 1, high_open=True), [0, 0.999], [1, -0.1, float("nan")], "in [0, 1)"),
    (Range(1), [1, 10**400], [0, -(10**400)], "≥ 1"),
])
def test_a_range_accepts_finite_numbers_between_its_ends(bounds, good, bad, text):
    """Ints of any length compare without overflowing (math.isfinite would raise)."""
    assert str(bounds) == text
    assert all(bounds.accepts(v) for v in good) and not any(bounds.accepts(v) for v in bad)
