"""llama.cpp as a peer of `retnet bench`: the matched Llama (retnet.compare.baselines) saved as a
transformers folder, converted to GGUF (F32 and Q8_0) by llama.cpp's own converter and measured
by `llamacpp_peer.py` under another interpreter, its rounds alternated with our float32 and int8
decode and our chunkwise prefill (batch 1). Its results land in results["llamacpp"]."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from retnet.bench.measure import summary, timed
from retnet.memory import reset_peak

if TYPE_CHECKING:  # report.py imports this module: it stays as light as the report
    from retnet.bench.backends import Backend
    from retnet.model import RetNetConfig

WORKER = Path(__file__).with_name("llamacpp_peer.py")
VERSION = "0.3.36"  # the llama-cpp-python release the docs' environment was built with
INSTALL = (f'CMAKE_ARGS="-DGGML_NATIVE=ON" {{python}} -m pip install llama-cpp-python=={VERSION} '
           "gguf numpy torch==2.13.0 transformers==5.24.0 sentencepiece safetensors")
Q8_BLOCK = 32  # Q8_0 quantises rows in blocks of 32 weights: every row length must divide
OURS = ("retnet", "retnet-int8")  # each timed against the GGUF type of its weights
PAIRS = {"retnet": "llamacpp-f32", "retnet-int8": "llamacpp-q8_0"}
# llama.cpp's own defaults (common.h): a 2048-token logical batch, 512-token physical batches
N_BATCH, N_UBATCH = 2048, 512


def converter_path(prefix: str, version: str) -> Path:
    """Where the docs put llama.cpp's converter: the llama-cpp-python sdist of the installed
    version, unpacked into the environment's src/ (the wheel does not ship it)."""
    return (Path(prefix) / "src" / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
            / "convert_hf_to_gguf.py")


def check_llamacpp_python(python: str) -> Path:
    """Fail fast (before a long run) unless `python` has llama_cpp and what the converter
    needs; the converter's path."""
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise ValueError(f"--llamacpp-python {python}: not an executable file; give the "
                         "interpreter of an environment with llama-cpp-python (docs/"
                         "benchmarks.md, \"llama.cpp as a peer\")")
    probe = subprocess.run([python, "-I", "-c", "import sys, llama_cpp, sentencepiece, torch; "
                            "print(llama_cpp.__version__, sys.prefix)"],
                           capture_output=True, text=True)
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        raise ValueError(f"--llamacpp-python {python} cannot import llama_cpp and the GGUF "
                         f"converter's needs ({last}); install them there: "
                         + INSTALL.format(python=python))
    version, prefix = probe.stdout.split()
    converter = converter_path(prefix, version)
    if not converter.is_file():
        raise ValueError(
            f"--llamacpp-python {python}: no llama.cpp converter at {converter}; unpack the "
            f"llama-cpp-python {version} sdist there: {python} -m pip download --no-deps "
            f"--no-binary :all: llama-cpp-python=={version} -d {prefix}/src && tar xzf "
            f"{prefix}/src/llama_cpp_python-{version}.tar.gz -C {prefix}/src")
    return converter


def gguf_ffn_width(config: RetNetConfig) -> int:
    """The matched SwiGLU width rounded to a multiple of Q8_BLOCK (the FFN's down projection
    has rows of this length): `small` 1367 -> 1376, 0.4% more non-embedding parameters."""
    from retnet.compare.baselines import matched_llama_config

    matched = matched_llama_config(config).intermediate_size
    return Q8_BLOCK * max(1, round(matched / Q8_BLOCK))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def sentencepiece_vocab(vocab_size: int) -> bytes:
    """A SentencePiece model (its protobuf bytes, tokenizer.model) of exactly vocab_size
    pieces: <unk>, <s>, </s>, the 256 byte pieces, then placeholders ▁t0, ▁t1, ... . The bench
    feeds token ids, never text, so any vocabulary of the model's size serves; llama.cpp's
    converter needs one (the project's byte-level BPE has neither the size nor a pre-tokenizer
    the converter knows)."""
    if vocab_size < 260:
        raise ValueError(f"vocab_size {vocab_size}: a SentencePiece vocabulary here has the 3 "
                         "special and 256 byte pieces, so at least 260")
    normal, unknown, control, byte = 1, 2, 3, 6  # SentencePiece.Type
    pieces = [("<unk>", unknown), ("<s>", control), ("</s>", control),
              *((f"<0x{b:02X}>", byte) for b in range(256)),
              *((f"\u2581t{i}", normal) for i in range(vocab_size - 259))]
    out = bytearray()
    for i, (text, kind) in enumerate(pieces):
        score = -float(i) if kind == normal else 0.0
        # SentencePiece: piece = 1 (string), score = 2 (float), type = 3 (enum)
        out += _field(1, _field(1, text.encode()) + b"\x15" + struct.pack("<f", score)
                      + b"\x18" + _varint(kind))
    # TrainerSpec (2): model_type = 3 (UNIGRAM = 1), vocab_size = 4, byte_fallback = 35
    out += _field(2, bytes([0x18, 1, 0x20]) + _varint(vocab_size) + _varint(35 << 3) + b"\x01")
    out += _field(3, _field(1, b"identity"))  # NormalizerSpec: name = 1
    return bytes(out)


def export_hf_llama(config: RetNetConfig, folder: Path) -> Any:
    """The matched Llama with its FFN width a multiple of 32 (`gguf_ffn_width`), random weights
    (seed 0) in float32, saved as a transformers LlamaForCausalLM folder with a tokenizer.model;
    its LlamaConfig."""
    from retnet.compare.baselines import matched_llama

    torch.manual_seed(0)
    model = matched_llama(config, intermediate_size=gguf_ffn_width(config))
    model.save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(sentencepiece_vocab(config.vocab_size))
    return model.config


class LlamaCppPeer:
    """The worker under another interpreter: one JSON request and one JSON answer per line."""

    def __init__(self, python: str, job: dict) -> None:
        # -I: the worker's folder is not put on sys.path (retnet/bench/profile.py would shadow
        # the standard library's profile); its stderr (progress) goes to the terminal
        self.proc = subprocess.Popen([python, "-I", str(WORKER), json.dumps(job)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._answer()

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the llama.cpp worker exited with code {self.proc.wait()} "
                               "(its error is in the run's log)")
        return json.loads(line)

    def ask(self, op: str, **args: Any) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write('{"op": "quit"}\n')
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def ours_isa() -> str:
    """The vector back end our loaded kernels were compiled for; without them, the CPU's
    flags (the kernels build with -march=native)."""
    from retnet.kernels import build

    isa = build.vector_isa()
    if isa != "none":
        return f"kernels {isa}"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags |= set(line.split(":", 1)[1].split())
    except OSError:
        pass
    found = [f for f in ("avx512f", "avx2", "neon", "asimd") if f in flags]
    return "no kernels loaded; CPU flags " + (", ".join(found) or "without avx512f, avx2, neon")


def _decode_cell(peer: LlamaCppPeer, ours: list[Backend], context: int, repeats: int) -> dict:
    """Batch 1 after `context` tokens: a round is 4 steps of each of ours, then 4 of each GGUF
    type (timed inside the worker: the pipe is not in its figure)."""
    fill = peer.ask("fill", context=context)
    steps = {}
    with torch.no_grad():
        for b in ours:
            steps[b.name] = b.decode_setup(1, context)
            for _ in range(2):  # warm-up
                steps[b.name]()
        times: dict[str, list[float]] = {name: [] for name in (*steps, *PAIRS.values())}
        for _ in range(repeats):
            for name, step in steps.items():
                times[name].append(timed(lambda s=step: [s() for _ in range(4)]) / 4)
            for kind in peer.info["gguf_mib"]:
                times[f"llamacpp-{kind}"].append(peer.ask("decode", model=kind, steps=4)["s"])
    return {"batch": 1, "context": context, "llamacpp_fill_s": fill["fill_s"],
            "results": {name: {"status": "ok", **summary(ts)} for name, ts in times.items()}}


def _prefill_cell(peer: LlamaCppPeer, ours: Backend, length: int, vocab: int,
                  repeats: int) -> dict:
    """Batch 1, `length` tokens: ours (float32, chunkwise) and each GGUF type in turn."""
    ids = torch.randint(0, vocab, (1, length))  # [1, T]
    times: dict[str, list[float]] = {ours.name: [], **{f"llamacpp-{k}": []
                                                       for k in peer.info["gguf_mib"]}}
    for _ in range(repeats):
        times[ours.name].append(timed(lambda: ours.prefill(ids)))
        reset_peak()
        for kind in peer.info["gguf_mib"]:
            times[f"llamacpp-{kind}"].append(peer.ask("prefill", model=kind, length=length)["s"])
    return {"T": length, "results": {name: {"status": "ok", **summary(ts)}
                                     for name, ts in times.items()}}


def run_llamacpp(python: str, converter: Path, config: RetNetConfig, backends: list[Backend],
                 contexts: list[int], repeats: int, results: dict, bar) -> None:
    """Export, convert, and measure the decode cells and one prefill of the longest context,
    into results["llamacpp"]; a worker that fails is recorded under meta's skipped."""
    meta = results["meta"]
    ours = [b for b in backends if b.name in OURS]
    with tempfile.TemporaryDirectory(prefix="retnet-llamacpp-") as work:
        folder = Path(work) / "hf"
        llama = export_hf_llama(config, folder)
        job = {"hf_folder": str(folder), "work_dir": work, "converter": str(converter),
               "vocab_size": config.vocab_size, "threads": torch.get_num_threads(),
               "n_ctx": max(contexts) + 256, "n_batch": N_BATCH, "n_ubatch": N_UBATCH,
               "flash_attn": True}
        try:
            peer = LlamaCppPeer(python, job)
        except RuntimeError as err:
            meta["skipped"]["llama.cpp"] = f"under {python}: {err}"
            return
        bar.update(1)
        try:
            decode = []
            for context in contexts:
                decode.append(_decode_cell(peer, ours, context, repeats))
                bar.update(1)
            float32 = next(b for b in ours if b.name == "retnet")
            prefill = [_prefill_cell(peer, float32, max(contexts), config.vocab_size,
                                     max(1, repeats // 2))]
            bar.update(1)
        except RuntimeError as err:
            meta["skipped"]["llama.cpp"] = f"under {python}: {err}"
            return
        finally:
            peer.close()
    info = peer.info
    meta["backends"]["llama.cpp"] = {
        "config": {"hidden_size": llama.hidden_size, "layers": llama.num_hidden_layers,
                   "heads": llama.num_attention_heads, "head_dim": llama.head_dim,
                   "intermediate_size": llama.intermediate_size, "vocab_size": llama.vocab_size,
                   "tied": llama.tie_word_embeddings, "gguf": {k: f"{v:.0f} MiB" for k, v in
                                                               info["gguf_mib"].items()}},
        "non_embedding": _llama_non_embedding(llama),
        "process": (f"separate process, its rounds alternated with ours: {python}, "
                    + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + "; "
                    + ", ".join(f"{k} {v}" for k, v in info["settings"].items()))}
    results["llamacpp"] = {"isa": {"retnet": ours_isa(), "llama.cpp": info["system_info"]},
                           "decode": decode, "prefill": prefill}


def _llama_non_embedding(llama) -> int:
    d, f, layers = llama.hidden_size, llama.intermediate_size, llama.num_hidden_layers
    return layers * (4 * d * d + 3 * d * f + 2 * d) + d


def _ms(cell: dict, name: str) -> float | None:
    r = cell["results"].get(name, {})
    return 1e3 * r["median_s"] if r.get("status") == "ok" else None


def derived(results: dict) -> dict[str, Any]:
    """Ours / llama.cpp per context (decode: float32 / F32, int8 / Q8_0; prefill: our float32
    against each type): under 1 we are faster."""
    out: dict[str, Any] = {}
    peer = results.get("llamacpp")
    if not peer:
        return out
    for cell in peer["decode"]:
        entry = {}
        for ours, theirs in PAIRS.items():
            a, b = _ms(cell, ours), _ms(cell, theirs)
            entry[f"{ours}_ms"], entry[f"{theirs}_ms"] = a, b
            entry[f"{ours}_vs_{theirs}"] = a / b if a and b else None
        out[f"llamacpp_decode_{cell['context']}"] = entry
    for cell in peer["prefill"]:
        ours = _ms(cell, "retnet")
        out[f"llamacpp_prefill_{cell['T']}"] = {
            f"retnet_vs_{k}": ours / _ms(cell, k) for k in cell["results"]
            if k != "retnet" and ours and _ms(cell, k)}
    return out


def report_lines(results: dict) -> list[str]:
    """The report's llama.cpp section: medians, ours / llama.cpp, and each side's ISA."""
    peer = results.get("llamacpp")
    if not peer:
        return []
    d = derived(results)

    def f(x: float | None, digits: int = 2) -> str:
        return "—" if x is None else f"{x:.{digits}f}"

    lines = ["", "## Against llama.cpp (batch 1, rounds alternated with ours)", "",
             f"ISA: ours {peer['isa']['retnet']}; llama.cpp `{peer['isa']['llama.cpp']}`.", "",
             "| context | retnet ms | llama.cpp F32 ms | ours / llama.cpp | retnet-int8 ms | "
             "llama.cpp Q8_0 ms | ours / llama.cpp |", "|---|---|---|---|---|---|---|"]
    for cell in peer["decode"]:
        e = d[f"llamacpp_decode_{cell['context']}"]
        lines.append(f"| {cell['context']} | " + " | ".join(
            f"{f(e[f'{o}_ms'])} | {f(e[f'{t}_ms'])} | {f(e[f'{o}_vs_{t}'], 3)}"
            for o, t in PAIRS.items()) + " |")
    for cell in peer["prefill"]:
        r = {k: v["median_s"] for k, v in cell["results"].items()}
        e = d[f"llamacpp_prefill_{cell['T']}"]
        lines += ["", f"Prefill of {cell['T']} tokens: ours (float32, chunkwise) "
                  f"{f(r['retnet'], 3)} s, llama.cpp F32 {f(r.get('llamacpp-f32'), 3)} s, "
                  f"Q8_0 {f(r.get('llamacpp-q8_0'), 3)} s; ours / llama.cpp "
                  f"{f(e.get('retnet_vs_llamacpp-f32'), 3)} (F32), "
                  f"{f(e.get('retnet_vs_llamacpp-q8_0'), 3)} (Q8_0)."]
    return lines
