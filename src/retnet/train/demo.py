"""`retnet demo` (what `make demo` runs): train a BPE tokenizer and the `demo` model on the
embedded corpus (the Python standard library) for about three minutes on two CPU cores,
report validation loss, perplexity and bits per byte, then sample from the trained model."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from retnet.ops import CHUNKWISE
from retnet.options import opt

DEMO_STEPS = 250  # ≈ 3 minutes on two CPU cores at 2048 tokens per step
VOCAB = 4096


@dataclass
class DemoOptions:
    """Options of `retnet demo`."""

    out: str = opt("runs/demo", "run directory (a fresh run each time)")
    steps: int | None = opt(None, f"training steps (default: {DEMO_STEPS}, about 3 minutes)")
    data: str | None = opt(None, "other text instead of the stdlib corpus")


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


def command(opts: DemoOptions) -> int:
    """Tokenizer, training, checkpoint and a sample, with the figures printed."""
    from retnet.generation import generate
    from retnet.loading import load
    from retnet.train import TrainConfig, train

    run = Path(opts.out)
    run.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(run, opts.data)
    steps = opts.steps or DEMO_STEPS
    # a fresh run each time; chunkwise: the same numbers as parallel, with less memory
    cfg = TrainConfig(preset="demo", data=opts.data, tokenizer=str(tokenizer), out=str(run),
                      steps=steps, batch_size=8, seq_len=256, lr=2e-3,
                      warmup=min(30, steps // 5), eval_every=max(1, steps // 5),
                      eval_batches=16, save_every=steps, overwrite=True,
                      **TrainConfig.form_fields(CHUNKWISE))
    start = time.perf_counter()
    result = train(cfg)
    minutes = (time.perf_counter() - start) / 60
    model, tok = load(run)  # the one inference loader, as `retnet generate` reads the run
    prompt = "def "
    ids = generate(model, torch.tensor([tok.encode(prompt)]), 120, temperature=0.8, top_p=0.95,
                   seed=0, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    print(f"\ntrained {steps} steps ({steps * cfg.batch_size * cfg.seq_len:,} tokens) in "
          f"{minutes:.1f} min: validation loss {result['val_loss']:.3f} nats/token, perplexity "
          f"{result['val_ppl']:.1f}, {result['val_bpb']:.3f} bits per byte (window "
          f"perplexity: {cfg.seq_len}-token windows from a zero state; `retnet eval "
          f"--perplexity` reads whole documents)")
    print(f"checkpoint, metrics.jsonl and loss.png in {run}/")
    print(f"sample (temperature 0.8, top-p 0.95):\n---\n{tok.decode(ids[0].tolist())}\n---")
    return 0
