"""#35's preparation targets, measured side by side in one run: `retnet.corpus.prepare` with 1
and 2 workers (MB/s, tokens/s, peak RSS of the parent and of its largest worker) against
Hugging Face `datasets.map(batched=True, num_proc=2)` with the same `tokenizers` BPE on the same
JSONL. The corpus is the standard library, repeated in varied document order to --mb MB.

    .venv/bin/python benchmarks/data_prepare.py --mb 60 --scale 20 [--out DIR]

--scale N also prepares the default corpus (the standard library as JSONL, ~32 MB) and N times
it with 2 workers, and trains the tiny preset for a few steps on each prepared corpus: peak RSS
of both against the targets.
"""

from __future__ import annotations

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


def build_corpus(path: Path, mb: float | None, seed: int = 0) -> int:
    """The stdlib's .py files as JSONL records, repeated in shuffled order to `mb` MB (None:
    each file once, in order: the default corpus)."""
    from retnet.data import stdlib_documents

    texts = [d.text for d in stdlib_documents()]
    rng, written = random.Random(seed), 0
    if mb is None:
        with path.open("w") as f:
            for text in texts:
                line = json.dumps({"text": text}) + "\n"
                f.write(line)
                written += len(line)
        return written
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


# `retnet train` in a child of a fresh process: the child's peak RSS (its workers' included,
# as the largest) is what RUSAGE_CHILDREN reports once it has ended.
TRAIN = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
subprocess.run([sys.executable, "-m", "retnet", "train", *sys.argv[1:]], check=True,
               stdout=subprocess.DEVNULL)
print(json.dumps({"seconds": time.perf_counter() - t,
                  "rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def throughput(work: Path, mb: float, tok_path: Path) -> dict:
    """1 and 2 workers against datasets.map(num_proc=2) on one `mb` MB JSONL, side by side."""
    corpus = work / f"corpus-{mb:g}.jsonl"
    size = build_corpus(corpus, mb)
    res: dict = {"corpus_mb": size / 1e6}
    for workers in (1, 2):
        r = run(PREPARE, str(corpus), str(work / f"prepared-{mb:g}-{workers}"), str(tok_path),
                str(workers))
        res[f"workers_{workers}"] = {**r, "mb_s": size / 1e6 / r["seconds"],
                                     "tokens_s": r["tokens"] / r["seconds"]}
    hf = run(HF_MAP, str(corpus), str(tok_path), str(work / "hf-cache"))
    res["datasets_map_num_proc_2"] = {**hf, "mb_s": size / 1e6 / hf["seconds"],
                                      "tokens_s": hf["tokens"] / hf["seconds"]}
    res["speedup_2_over_1"] = res["workers_1"]["seconds"] / res["workers_2"]["seconds"]
    res["ratio_to_datasets_map"] = hf["seconds"] / res["workers_2"]["seconds"]
    corpus.unlink()
    return res


def scale(work: Path, tok_path: Path, times: int, steps: int) -> dict:
    """Peak RSS of preparing the default corpus (the stdlib as JSONL) and `times` × it with 2
    workers, then of `retnet train` on each prepared corpus (the same steps and model)."""
    res: dict = {}
    for name in ("default", f"{times}x"):
        corpus = work / f"corpus-{name}.jsonl"
        size = build_corpus(corpus, None if name == "default"
                            else res["default"]["corpus_mb"] * times)
        prepared = work / f"prepared-{name}"
        r = run(PREPARE, str(corpus), str(prepared), str(tok_path), "2")
        corpus.unlink()
        t = run(TRAIN, "--data", str(prepared), "--tokenizer", str(tok_path), "--preset", "tiny",
                "--steps", str(steps), "--eval-every", str(steps), "--out",
                str(work / f"train-{name}"), "--overwrite")
        res[name] = {"corpus_mb": size / 1e6, "prepare": r, "train": t,
                     "prepare_total_rss_mb": r["rss_mb"] + r["worker_rss_mb"]}
    big, base = res[f"{times}x"], res["default"]
    res["prepare_rss_ratio"] = big["prepare_total_rss_mb"] / base["prepare_total_rss_mb"]
    res["train_rss_ratio"] = big["train"]["rss_mb"] / base["train"]["rss_mb"]
    return res


def report(res: dict) -> list[str]:
    from retnet.bench.machine import header

    lines = [header("tokenizer: BPE, 4096 tokens, trained on 300 stdlib files"), ""]
    if "throughput" in res:
        t = res["throughput"]
        lines += [f"Throughput on {t['corpus_mb']:.0f} MB of JSONL (side by side, one run):", "",
                  "| run | s | MB/s | tokens/s | peak RSS MB (parent / largest worker) |",
                  "|---|---|---|---|---|"]
        for key, label in (("workers_1", "1 worker"), ("workers_2", "2 workers"),
                           ("datasets_map_num_proc_2", "datasets.map, num_proc=2")):
            c = t[key]
            rss = (f"{c['rss_mb']:.0f} / {c['worker_rss_mb']:.0f}" if "rss_mb" in c else "—")
            lines.append(f"| {label} | {c['seconds']:.1f} | {c['mb_s']:.2f} | "
                         f"{c['tokens_s'] / 1e3:.0f}k | {rss} |")
        lines += ["", f"2 workers / 1: {t['speedup_2_over_1']:.2f}× (target ≥ 1.6×); 2 workers / "
                  f"datasets.map: {t['ratio_to_datasets_map']:.2f}× (target ≥ 1.0×)", ""]
    if "scale" in res:
        s = res["scale"]
        lines += ["| corpus | MB | prepare s | prepare peak RSS MB (parent + largest worker) "
                  "| train peak RSS MB |", "|---|---|---|---|---|"]
        for name in (k for k in s if isinstance(s[k], dict)):
            c = s[name]
            lines.append(f"| {name} | {c['corpus_mb']:.0f} | {c['prepare']['seconds']:.0f} | "
                         f"{c['prepare']['rss_mb']:.0f} + {c['prepare']['worker_rss_mb']:.0f} | "
                         f"{c['train']['rss_mb']:.0f} |")
        lines += ["", f"Preparation peak RSS, large / default: {s['prepare_rss_ratio']:.2f}× "
                  "(target ≤ 1.3×, and < 1024 MB); training peak RSS, large / default: "
                  f"{s['train_rss_ratio']:.2f}× (target ≤ 1.2×)"]
    return lines


def main() -> None:
    from retnet.bench.measure import script_parser, write_results

    parser = script_parser(__doc__, out="benchmarks/results/data-prepare")
    parser.add_argument("--mb", type=float, default=20.0, help="throughput corpus size (0: skip)")
    parser.add_argument("--scale", type=int, default=0,
                        help="also prepare and train on N × the default corpus (0: skip)")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="retnet-data-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    from retnet.data import stdlib_documents
    from retnet.tokenizer import train_bpe

    tok_path = work / "tokenizer.json"
    train_bpe((d.text for d in stdlib_documents()[:300]), 4096).save(tok_path)
    res: dict = {}
    if args.mb > 0:
        res["throughput"] = throughput(work, args.mb, tok_path)
    if args.scale > 0:
        res["scale"] = scale(work, tok_path, args.scale, args.train_steps)
    write_results(args.out, "data_prepare", res, report(res))


if __name__ == "__main__":
    main()
