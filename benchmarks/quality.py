"""Entry point of retnet.bench.quality: perplexity and teacher-forced decode logits of the
float32, bf16 and int8 weight formats on a trained checkpoint (see its docstring).

    python benchmarks/quality.py --checkpoint runs/demo
"""

from retnet.bench.quality import main

if __name__ == "__main__":
    main()
