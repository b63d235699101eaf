"""`python benchmarks/gpu.py`: runs retnet.bench.gpu (see docs/benchmarks.md)."""

from retnet.bench.gpu import main

if __name__ == "__main__":
    main()
