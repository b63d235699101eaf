"""`retnet study`: the experiments researchers run on an architecture — a grid of cells
(architecture × size × seed × variant × learning rate), each a training run on the same
batches with its evaluation and cost, resumable per cell and mid-cell, recorded one JSON line
per cell, with a report and plots regenerated from whatever cells exist.

`grid` holds the grid (TOML or `presets`), `archs` the architectures at matched parameters,
`cell` one run, `store` the folder and its records, `runner` the command (shards, parallel
workers), `report` and `plots` the results."""

from retnet.study.grid import Grid, load
from retnet.study.runner import StudyOptions, command, run

__all__ = ["Grid", "StudyOptions", "command", "load", "run"]
