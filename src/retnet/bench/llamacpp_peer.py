"""llama.cpp (through llama-cpp-python) measured round by round beside `retnet bench`'s own steps.

A standalone script (it imports llama_cpp and numpy, never retnet): llama-cpp-python compiles
llama.cpp for this CPU in an environment of its own (docs/benchmarks.md, "llama.cpp as a
peer"). `retnet bench --llamacpp-python PATH` starts it with a JSON job as its only argument.
It converts the matched Llama, a transformers folder the bench wrote, to GGUF with llama.cpp's
own converter (F32 and Q8_0), loads both, prints one JSON line (versions, system info), then
answers each JSON request on a stdin line with one JSON line on stdout, so that the bench can
alternate its rounds with ours. Progress goes to stderr. Requests:

- {"op": "fill", "context": C}: each model reads C random tokens into an empty KV cache (a real
  prefill), then takes two untimed decode steps
- {"op": "decode", "model": "f32", "steps": 4}: seconds per step over `steps` steps, each one
  token at position C (the cache cut back to C tokens first, so every step sees the same
  context) with the greedy choice over its logits, as ours is timed
- {"op": "prefill", "model": "f32", "length": T}: seconds to read T tokens into an empty cache
  (last position's logits only)
- {"op": "quit"}
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

GGUF_TYPES = ("f32", "q8_0")


def convert(job: dict) -> dict[str, str]:
    """The folder in GGUF, one file per type, by llama.cpp's convert_hf_to_gguf.py."""
    paths = {}
    for kind in GGUF_TYPES:
        out = Path(job["work_dir"]) / f"llama-{kind}.gguf"
        proc = subprocess.run([sys.executable, job["converter"], job["hf_folder"], "--outtype",
                               kind, "--outfile", str(out)], capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"convert_hf_to_gguf.py --outtype {kind} failed "
                             f"(exit code {proc.returncode})")
        paths[kind] = str(out)
        print(f"llama.cpp: converted to {out.name} ({out.stat().st_size >> 20} MiB)",
              file=sys.stderr)
    return paths


class Peer:
    """Both GGUF models loaded, each with its own context (KV cache) and position."""

    def __init__(self, job: dict, paths: dict[str, str]) -> None:
        import llama_cpp
        import numpy as np

        self.np, self.llama_cpp = np, llama_cpp
        self.rng = np.random.default_rng(0)
        self.vocab = job["vocab_size"]
        self.models = {kind: llama_cpp.Llama(
            model_path=path, n_ctx=job["n_ctx"], n_batch=job["n_batch"],
            n_ubatch=job["n_ubatch"], n_threads=job["threads"],
            n_threads_batch=job["threads"], flash_attn=job["flash_attn"],
            type_k=llama_cpp.GGML_TYPE_F16, type_v=llama_cpp.GGML_TYPE_F16, verbose=False)
            for kind, path in paths.items()}
        self.context = 0

    def _tokens(self, n: int) -> list[int]:
        return self.rng.integers(0, self.vocab, n).tolist()

    def _step(self, llm) -> None:
        """One token at position self.context, then the greedy choice over its logits."""
        llm.n_tokens = self.context  # eval() first drops the cache from n_tokens on
        llm.eval([self.token])
        logits = self.np.ctypeslib.as_array(self.llama_cpp.llama_get_logits(llm.ctx),
                                            shape=(self.vocab,))
        self.token = int(logits.argmax())

    def fill(self, context: int) -> dict:
        self.context, self.token = context, self._tokens(1)[0]
        took = {}
        for kind, llm in self.models.items():
            llm.reset()
            start = time.perf_counter()
            llm.eval(self._tokens(context))
            took[kind] = time.perf_counter() - start
            for _ in range(2):
                self._step(llm)
        return {"fill_s": took}

    def decode(self, model: str, steps: int) -> dict:
        llm = self.models[model]
        start = time.perf_counter()
        for _ in range(steps):
            self._step(llm)
        return {"s": (time.perf_counter() - start) / steps}

    def prefill(self, model: str, length: int) -> dict:
        llm, tokens = self.models[model], self._tokens(length)
        llm.reset()
        start = time.perf_counter()
        llm.eval(tokens)
        took = time.perf_counter() - start
        llm.reset()
        return {"s": took}


def describe(job: dict, paths: dict[str, str]) -> dict:
    import llama_cpp

    return {"versions": {"llama-cpp-python": llama_cpp.__version__,
                         "python": sys.version.split()[0]},
            "system_info": llama_cpp.llama_print_system_info().decode().strip(),
            "gguf_mib": {k: Path(p).stat().st_size / 2**20 for k, p in paths.items()},
            "settings": {k: job[k] for k in ("threads", "n_ctx", "n_batch", "n_ubatch",
                                             "flash_attn")} | {"kv_cache": "f16"}}


def main() -> None:
    job = json.loads(sys.argv[1])
    paths = convert(job)
    peer = Peer(job, paths)
    print(json.dumps(describe(job, paths)), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        if op == "quit":
            break
        answer = {"fill": peer.fill, "decode": peer.decode, "prefill": peer.prefill}[op](
            **request)
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
