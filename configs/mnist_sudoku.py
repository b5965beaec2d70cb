"""MNIST Sudoku: the packaged config `ipr_jax/configs/mnist_sudoku.py`, by path in a clone.

`--config=configs/mnist_sudoku.py[:preset]` loads this file, which is that module's config; from an
installed package, `--config=mnist_sudoku[:preset]` names the same. Presets, fields and commands:
the docstring of `ipr_jax/configs/mnist_sudoku.py`.
"""

from ipr_jax.configs import mnist_sudoku

get_config = mnist_sudoku.get_config
DEMO_TRAIN_STEPS = mnist_sudoku.DEMO_TRAIN_STEPS
