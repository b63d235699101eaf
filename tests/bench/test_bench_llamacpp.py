"""llama.cpp as a peer of `retnet bench`, without llama.cpp: the interpreter checks, the matched
Llama exported as a transformers folder that llama.cpp's converter takes (Q8_0-ready widths, a
SentencePiece vocabulary of the model's size), and the bench's rounds against a stand-in worker."""

import json
import struct
import sys

import pytest

from retnet.cli import main


@pytest.fixture
def kernels_off():
    """The PyTorch reference decode: the stand-in run needs no compiled kernels."""
    from retnet import kernels

    kernels.set_enabled(False)
    yield
    kernels.set_enabled(None)


def _interpreter(tmp_path, body: str):
    """An executable standing in for another environment's python."""
    script = tmp_path / "stand_in.py"
    script.write_text(body)
    python = tmp_path / "python-llama"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
    python.chmod(0o755)
    return python


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_an_interpreter_without_llama_cpp_fails_before_the_run_with_the_install_command(
        tmp_path, capsys):
    # this interpreter (the project's environment) has no llama_cpp
    assert main(["bench", "--quick", "--only", "llamacpp", "--out", str(tmp_path),
                 "--llamacpp-python", sys.executable]) == 2
    err = _one_line_error(capsys)
    assert "cannot import llama_cpp" in err and "No module named" in err
    install = f'CMAKE_ARGS="-DGGML_NATIVE=ON" {sys.executable} -m pip install llama-cpp-python=='
    assert install in err
    assert not (tmp_path / "results.json").exists()


def test_a_missing_interpreter_or_converter_or_flag_is_a_one_line_error(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["bench", "--quick", "--out", out,
                 "--llamacpp-python", str(tmp_path / "missing")]) == 2
    assert "not an executable file" in _one_line_error(capsys)
    # llama_cpp imports, but the sdist with convert_hf_to_gguf.py is not unpacked
    python = _interpreter(tmp_path, f"print('0.3.36', {str(tmp_path)!r})\n")
    assert main(["bench", "--quick", "--out", out, "--llamacpp-python", str(python)]) == 2
    err = _one_line_error(capsys)
    assert f"no llama.cpp converter at {tmp_path}/src/llama_cpp_python-0.3.36/vendor" in err
    assert "pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36" in err
    assert main(["bench", "--quick", "--only", "llamacpp", "--out", out]) == 2
    assert "--only llamacpp needs --llamacpp-python" in _one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_the_q8_0_width_is_the_matched_width_to_a_multiple_of_32():
    from retnet.bench.llamacpp import gguf_ffn_width
    from retnet.compare.baselines import matched_llama_config
    from retnet.model import RetNetConfig

    for preset, width in (("tiny", 160), ("demo", 672), ("small", 1376)):
        config = RetNetConfig.from_preset(preset)
        matched = matched_llama_config(config).intermediate_size
        assert gguf_ffn_width(config) == width and abs(width - matched) <= 16, preset
    assert matched % 32  # small's parameter-matched width itself (1367) would not quantise


def _pieces(model: bytes) -> tuple[list[tuple[str, int]], bytes]:
    """(piece, type) of each SentencePiece in a ModelProto, and its TrainerSpec bytes."""
    def varint(buf, i):
        n = shift = 0
        while True:
            n |= (buf[i] & 0x7F) << shift
            shift += 7
            i += 1
            if not buf[i - 1] & 0x80:
                return n, i

    def fields(buf):
        i = 0
        while i < len(buf):
            key, i = varint(buf, i)
            if key & 7 == 2:
                size, i = varint(buf, i)
                yield key >> 3, buf[i:i + size]
                i += size
            elif key & 7 == 5:
                yield key >> 3, struct.unpack("<f", buf[i:i + 4])[0]
                i += 4
            else:
                value, i = varint(buf, i)
                yield key >> 3, value

    pieces, trainer = [], b""
    for number, value in fields(model):
        if number == 1:
            piece = dict(fields(value))
            pieces.append((piece[1].decode(), piece[3]))
        elif number == 2:
            trainer = value
    return pieces, trainer


def test_the_matched_llama_is_exported_as_a_hf_folder_the_gguf_converter_takes(tmp_path):
    from safetensors import safe_open

    from retnet.bench.llamacpp import export_hf_llama
    from retnet.model import RetNetConfig

    config = RetNetConfig.from_preset("tiny", vocab_size=1000)
    export_hf_llama(config, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["model_type"] == "llama"
    assert (hf["hidden_size"], hf["num_hidden_layers"], hf["vocab_size"]) == (64, 2, 1000)
    assert hf["head_dim"] == 64 and hf["num_attention_heads"] == hf["num_key_value_heads"] == 1
    assert hf["intermediate_size"] == 160 and hf["tie_word_embeddings"] is True
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert "lm_head.weight" not in shapes  # tied: llama.cpp reads the table as the head
    assert shapes["model.embed_tokens.weight"] == (1000, 64)
    assert shapes["model.layers.1.mlp.down_proj.weight"] == (64, 160)
    # every matrix's rows (the quantised dimension) split into Q8_0 blocks of 32
    assert all(s[-1] % 32 == 0 for s in shapes.values() if len(s) == 2)
    pieces, trainer = _pieces((tmp_path / "tokenizer.model").read_bytes())
    assert len(pieces) == 1000 and len({p for p, _ in pieces}) == 1000
    assert pieces[:4] == [("<unk>", 2), ("<s>", 3), ("</s>", 3), ("<0x00>", 6)]
    assert pieces[258] == ("<0xFF>", 6) and pieces[259] == ("\u2581t0", 1)
    assert trainer.startswith(bytes([0x18, 1, 0x20]))  # model_type UNIGRAM, then vocab_size


# Stand-ins for llama.cpp's converter and llama_cpp, so that the real worker
# (llamacpp_peer.py) runs under the real peer class: the GGUF "file" names its type and the
# folder's config; the model records each eval's position and token count.
CONVERTER = '''import json, sys
from pathlib import Path
folder, kind, out = Path(sys.argv[1]), sys.argv[3], Path(sys.argv[5])
assert sys.argv[2] == "--outtype" and sys.argv[4] == "--outfile"
assert (folder / "tokenizer.model").stat().st_size > 0
config = json.loads((folder / "config.json").read_text())
out.write_text(json.dumps({"type": kind, "config": config}))
'''

LLAMA_CPP = '''import ctypes, json
from pathlib import Path
__version__ = "0.3.36"
GGML_TYPE_F16 = 1
LOG = open(LOG_PATH, "a")

def llama_print_system_info():
    return b"CPU : AVX2 = 1 | "

def llama_get_logits(ctx):
    return ctypes.cast(ctx, ctypes.POINTER(ctypes.c_float))

class Llama:
    def __init__(self, model_path, **settings):
        gguf = json.loads(Path(model_path).read_text())
        self.kind, self.n_tokens = gguf["type"], 0
        assert settings["type_k"] == settings["type_v"] == GGML_TYPE_F16
        LOG.write(json.dumps({"load": self.kind, **settings}) + "\\n")
        self.ctx = (ctypes.c_float * gguf["config"]["vocab_size"])()
        self.ctx[7] = 1.0  # the greedy choice

    def reset(self):
        self.n_tokens = 0

    def eval(self, tokens):
        LOG.write(json.dumps({"model": self.kind, "pos": self.n_tokens, "n": len(tokens),
                              "tokens": sorted(set(tokens))[:3]}) + "\\n")
        self.n_tokens += len(tokens)
'''


@pytest.mark.slow
def test_the_worker_alternates_with_ours_and_its_figures_are_reported(tmp_path, kernels_off):
    """The real worker under a stand-in llama_cpp: each decode step is one token at the
    context's position, each round asks for 4 steps of each GGUF type after ours, and its
    figures land in results["llamacpp"] and the report."""
    prefix, fake = tmp_path / "env", tmp_path / "fake"
    converter = prefix / "src/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py"
    converter.parent.mkdir(parents=True)
    converter.write_text(CONVERTER)
    fake.mkdir()
    log = tmp_path / "llama.jsonl"
    (fake / "llama_cpp.py").write_text(f"LOG_PATH = {str(log)!r}\n" + LLAMA_CPP)
    python = tmp_path / "python-llama"  # answers the probe; runs the worker beside the fake
    python.write_text(f"#!/bin/sh\nif [ \"$2\" = -c ]; then echo 0.3.36 {prefix}; exit 0; fi\n"
                      f"shift\nPYTHONPATH={fake} exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    out = tmp_path / "out"
    assert main(["bench", "--quick", "--only", "llamacpp", "--out", str(out),
                 "--llamacpp-python", str(python)]) == 0  # quick: one round per cell
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    loads = [c for c in calls if "load" in c]
    assert [c["load"] for c in loads] == ["f32", "q8_0"]
    assert loads[0]["n_ctx"] >= 256 + 1 and loads[0]["n_threads"] == loads[0]["n_threads_batch"]
    evals = [(c["model"], c["pos"], c["n"]) for c in calls if "model" in c]
    both = ("f32", "q8_0")
    # fill: the context, then two warm-up steps; a round: 4 steps of each type at the context
    cell = [(m, p, n) for c in (64, 256) for m, p, n in (
        *((k, pos, n) for k in both for pos, n in ((0, c), (c, 1), (c, 1))),
        *((k, c, 1) for k in both for _ in range(4)))]
    assert evals == [*cell, ("f32", 0, 256), ("q8_0", 0, 256)]  # then each prefills 256
    assert all(c["tokens"][0] < 32000 for c in calls if "model" in c)
    assert any(7 in c["tokens"] for c in calls if "model" in c)  # the greedy token is fed back

    results = json.loads((out / "results.json").read_text())
    assert results["decode"] == results["prefill"] == results["train"] == []
    peer = results["llamacpp"]
    assert [c["context"] for c in peer["decode"]] == [64, 256]
    for c in peer["decode"]:
        assert set(c["results"]) == {"retnet", "retnet-int8", "llamacpp-f32", "llamacpp-q8_0"}
        assert all(len(r["raw_s"]) == 1 and r["median_s"] > 0 for r in c["results"].values())
    assert peer["isa"]["llama.cpp"] == "CPU : AVX2 = 1 |" and peer["isa"]["retnet"]
    info = results["meta"]["backends"]["llama.cpp"]
    assert info["config"]["intermediate_size"] == 160 and "alternated" in info["process"]
    assert "llama.cpp" not in results["meta"]["skipped"]

    from retnet.bench.report import derived

    d, cells = derived(results), peer["decode"][1]["results"]
    assert d["llamacpp_decode_256"]["retnet-int8_vs_llamacpp-q8_0"] == pytest.approx(
        cells["retnet-int8"]["median_s"] / cells["llamacpp-q8_0"]["median_s"])
    prefill = peer["prefill"][0]["results"]
    assert d["llamacpp_prefill_256"]["retnet_vs_llamacpp-f32"] == pytest.approx(
        prefill["retnet"]["median_s"] / prefill["llamacpp-f32"]["median_s"])
    report = (out / "report.md").read_text()
    assert "## Against llama.cpp" in report and "`CPU : AVX2 = 1 |`" in report
    assert "| 256 | " in report and "Prefill of 256 tokens" in report
