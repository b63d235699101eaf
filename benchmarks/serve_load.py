"""`python benchmarks/serve_load.py`: runs retnet.bench.serve_load (see docs/benchmarks.md)."""

from retnet.bench.serve_load import main

if __name__ == "__main__":
    main()
