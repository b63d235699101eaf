"""Benchmark code, in one home: the cost benchmark (`retnet bench`: cost, backends, peers,
report, machine) and the scripts under benchmarks/ (forms, decode, gemv, serve_load, profile;
each `python benchmarks/NAME.py` is a thin entry point of the module here), all measuring
through `measure` (timing, summaries, cells in their own processes) and `retnet.memory`."""
