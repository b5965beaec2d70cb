"""The task configs shipped in the package: one module per task, `get_config(preset)` each.

`--config=<task>[:preset]` names one of them from anywhere (e.g. `--config=mnist_sudoku:demo`,
resolved by `config_base.resolve_config_spec`); in a clone, the top-level `configs/<task>.py`
files are the same configs by path (`--config=configs/mnist_sudoku.py:demo`).
"""
