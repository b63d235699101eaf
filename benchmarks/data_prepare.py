"""#35's preparation targets, measured side by side in one run: `retnet.corpus.prepare` with 1
and 2 workers (MB/s, tokens/s, peak RSS of the parent and of its largest worker) against
Hugging Face `datasets.map(batched=True, num_proc=2)` with the same `tokenizers` BPE on the same
JSONL. The corpus is the standard library, repeated in varied document order to --mb MB.

    .venv/bin/python benchmarks/data_prepare.py --mb 20 [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# One measured preparation in a fresh process, so its peak RSS is its own.
PREPARE = """
import json, resource, sys, time
from retnet.corpus import prepare
from retnet.tokenizer import load_tokenizer
def hwm_mb():  # this process's peak RSS (ru_maxrss would carry the parent's over exec)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    return int(line.split()[1]) / 1024
t = time.perf_counter()
c = prepare([sys.argv[1]], sys.argv[2], load_tokenizer(sys.argv[3]), workers=int(sys.argv[4]),
            progress=False)
print(json.dumps({"seconds": time.perf_counter() - t, "tokens": c.tokens,
                  "rss_mb": hwm_mb(),
                  "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""

HF_MAP = """
import json, sys, time
from datasets import load_dataset
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[2])
data = load_dataset("json", data_files=sys.argv[1], split="train", cache_dir=sys.argv[3])
t = time.perf_counter()
out = data.map(lambda b: {"ids": [e.ids for e in tok.encode_batch(b["text"])]}, batched=True,
               num_proc=2, remove_columns=["text"])
tokens = sum(len(x) + 1 for x in out["ids"])
print(json.dumps({"seconds": time.perf_counter() - t, "tokens": tokens}))
"""


def build_corpus(path: Path, mb: float, seed: int = 0) -> int:
    """The stdlib's .py files as JSONL records, repeated in shuffled order to `mb` MB."""
    from retnet.data import stdlib_documents

    texts = [d.text for d in stdlib_documents()]
    rng, written = random.Random(seed), 0
    with path.open("w") as f:
        while written < mb * 1e6:
            for text in rng.sample(texts, len(texts)):
                line = json.dumps({"text": text}) + "\n"
                f.write(line)
                written += len(line)
                if written >= mb * 1e6:
                    break
    return written


def run(script: str, *args: str) -> dict:
    env_path = {"PYTHONPATH": str(ROOT / "src")}
    import os

    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          env={**os.environ, **env_path}, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=20.0)
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="retnet-data-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    size = build_corpus(corpus, args.mb)
    from retnet.data import stdlib_documents
    from retnet.tokenizer import train_bpe

    tok_path = work / "tokenizer.json"
    train_bpe((d.text for d in stdlib_documents()[:300]), 4096).save(tok_path)
    results = {"corpus_mb": size / 1e6}
    for workers in (1, 2):
        r = run(PREPARE, str(corpus), str(work / f"prepared-{workers}"), str(tok_path),
                str(workers))
        results[f"workers_{workers}"] = {**r, "mb_s": size / 1e6 / r["seconds"],
                                         "tokens_s": r["tokens"] / r["seconds"]}
    hf = run(HF_MAP, str(corpus), str(tok_path), str(work / "hf-cache"))
    results["datasets_map_num_proc_2"] = {**hf, "mb_s": size / 1e6 / hf["seconds"],
                                          "tokens_s": hf["tokens"] / hf["seconds"]}
    results["speedup_2_over_1"] = (results["workers_1"]["seconds"]
                                   / results["workers_2"]["seconds"])
    results["ratio_to_datasets_map"] = (hf["seconds"] / results["workers_2"]["seconds"])
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
