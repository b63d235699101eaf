"""`python benchmarks/decode.py`: runs retnet.bench.decode (see docs/benchmarks.md)."""

from retnet.bench.decode import main

if __name__ == "__main__":
    main()
