"""Cost benchmarks (`retnet bench`): RetNet against a matched Transformer and other RetNet code."""
