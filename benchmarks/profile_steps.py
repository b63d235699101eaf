"""`python benchmarks/profile_steps.py`: runs retnet.bench.profile (see docs/benchmarks.md)."""

from retnet.bench.profile import main

if __name__ == "__main__":
    main()
