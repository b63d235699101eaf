"""`retnet demo` (what `make demo` runs): train a BPE tokenizer and the `demo` model on the
embedded corpus (the Python standard library) for about three minutes on two CPU cores,
report validation loss, perplexity and bits per byte, then sample from the trained model."""

from __future__ import annotations

import time
from pathlib import Path

import torch

DEMO_STEPS = 250  # ≈ 3 minutes on two CPU cores at 2048 tokens per step
VOCAB = 4096


def _tokenizer(out: Path, data: str | None) -> Path:
    from retnet.data import load_documents, split_documents
    from retnet.tokenizer import train_bpe

    path = out / "tokenizer.json"
    if not path.is_file():
        start = time.perf_counter()
        train_docs, _ = split_documents(load_documents(data))
        train_bpe((d.text for d in train_docs), VOCAB).save(path)
        print(f"trained a {VOCAB}-token BPE on the corpus in {time.perf_counter() - start:.0f} s "
              f"-> {path}")
    return path


def run_demo(out: str = "runs/demo", steps: int | None = None, data: str | None = None) -> int:
    from retnet.checkpoint import load_checkpoint
    from retnet.generation import generate
    from retnet.train import TrainConfig, train

    run = Path(out)
    run.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(run, data)
    steps = steps or DEMO_STEPS
    cfg = TrainConfig(preset="demo", data=data, tokenizer=str(tokenizer), out=str(run), steps=steps,
                      batch_size=8, seq_len=256, lr=2e-3, warmup=min(30, steps // 5),
                      eval_every=max(1, steps // 5), eval_batches=16, save_every=steps,
                      mode="chunkwise", chunk_size=64, overwrite=True)  # a fresh run each time
    start = time.perf_counter()
    result = train(cfg)
    minutes = (time.perf_counter() - start) / 60
    ckpt = load_checkpoint(run)
    model, tok = ckpt.build_model(), ckpt.tokenizer
    prompt = "def "
    ids = generate(model, torch.tensor([tok.encode(prompt)]), 120, temperature=0.8, top_p=0.95,
                   seed=0, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    print(f"\ntrained {steps} steps ({steps * 8 * 256:,} tokens) in {minutes:.1f} min: "
          f"validation loss {result['val_loss']:.3f} nats/token, perplexity "
          f"{result['val_ppl']:.1f}, {result['val_bpb']:.3f} bits per byte")
    print(f"checkpoint, metrics.jsonl and loss.png in {run}/")
    print(f"sample (temperature 0.8, top-p 0.95):\n---\n{tok.decode(ids[0].tolist())}\n---")
    return 0
