"""`python benchmarks/forms.py`: runs retnet.bench.forms (see docs/benchmarks.md)."""

from retnet.bench.forms import main

if __name__ == "__main__":
    main()
