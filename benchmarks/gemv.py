"""`python benchmarks/gemv.py`: runs retnet.bench.gemv (see docs/benchmarks.md)."""

from retnet.bench.gemv import main

if __name__ == "__main__":
    main()
