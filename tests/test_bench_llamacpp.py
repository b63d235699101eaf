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


STAND_IN = '''import json, sys
from pathlib import Path
if sys.argv[1:3] == ["-I", "-c"]:  # the import probe: llama_cpp's version, the prefix
    print("0.3.36", PREFIX)
    sys.exit(0)
assert sys.argv[1] == "-I" and sys.argv[2].endswith("llamacpp_peer.py")
job = json.loads(sys.argv[3])
folder = Path(job["hf_folder"])
assert {"config.json", "model.safetensors", "tokenizer.model"} <= {p.name for p in folder.iterdir()}
log = open(LOG, "w")
print(json.dumps({"versions": {"llama-cpp-python": "0.3.36"}, "system_info": "AVX2 = 1",
                  "gguf_mib": {"f32": 2.0, "q8_0": 0.5},
                  "settings": {"threads": job["threads"], "n_ctx": job["n_ctx"]}}), flush=True)
for line in sys.stdin:
    request = json.loads(line)
    log.write(line)
    if request["op"] == "quit":
        break
    answer = {"fill": {"fill_s": {"f32": 0.1, "q8_0": 0.1}}, "prefill": {"s": 0.5},
              "decode": {"s": 0.002 if request.get("model") == "f32" else 0.001}}
    print(json.dumps(answer[request["op"]]), flush=True)
'''


def test_llamacpp_rounds_alternate_with_ours_and_are_reported(tmp_path, kernels_off):
    """A stand-in worker answers the requests; each round asks it for 4 steps of each GGUF
    type after ours, and its figures land in results["llamacpp"] and the report."""
    prefix = tmp_path / "env"
    converter = prefix / "src/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py"
    converter.parent.mkdir(parents=True)
    converter.touch()
    log = tmp_path / "requests.jsonl"
    python = _interpreter(tmp_path, f"PREFIX, LOG = {str(prefix)!r}, {str(log)!r}\n" + STAND_IN)
    out = tmp_path / "out"
    assert main(["bench", "--quick", "--only", "llamacpp", "--out", str(out),
                 "--llamacpp-python", str(python)]) == 0  # quick: one round per cell
    requests = [json.loads(line) for line in log.read_text().splitlines()]
    ops = [(r["op"], r.get("context") or r.get("model")) for r in requests]
    decode_round = [("decode", "f32"), ("decode", "q8_0")]
    assert ops == [("fill", 64), *decode_round, ("fill", 256), *decode_round,
                   ("prefill", "f32"), ("prefill", "q8_0"), ("quit", None)]
    assert all(r["steps"] == 4 for r in requests if r["op"] == "decode")
    assert requests[-2]["length"] == 256  # the longest context is the prefill

    results = json.loads((out / "results.json").read_text())
    assert results["decode"] == results["prefill"] == results["train"] == []
    peer = results["llamacpp"]
    assert [c["context"] for c in peer["decode"]] == [64, 256]
    for cell in peer["decode"]:
        assert set(cell["results"]) == {"retnet", "retnet-int8", "llamacpp-f32", "llamacpp-q8_0"}
        assert cell["results"]["llamacpp-f32"]["raw_s"] == [0.002]
        assert len(cell["results"]["retnet-int8"]["raw_s"]) == 1
    assert peer["isa"]["llama.cpp"] == "AVX2 = 1" and peer["isa"]["retnet"]
    info = results["meta"]["backends"]["llama.cpp"]
    assert info["config"]["intermediate_size"] == 160 and "alternated" in info["process"]
    assert "llama.cpp" not in results["meta"]["skipped"]

    from retnet.bench.report import derived

    d = derived(results)["llamacpp_decode_256"]
    ours = results["llamacpp"]["decode"][1]["results"]["retnet-int8"]["median_s"]
    assert d["retnet-int8_vs_llamacpp-q8_0"] == pytest.approx(ours / 0.001)
    prefill = results["llamacpp"]["prefill"][0]["results"]["retnet"]["median_s"]
    assert derived(results)["llamacpp_prefill_256"]["retnet_vs_llamacpp-f32"] == pytest.approx(
        prefill / 0.5)
    report = (out / "report.md").read_text()
    assert "## Against llama.cpp" in report and "`AVX2 = 1`" in report
    assert "| 256 | " in report and "Prefill of 256 tokens" in report
