"""Even Pixels: the packaged config `ipr_jax/configs/even_pixels.py`, by path in a clone.

`--config=configs/even_pixels.py[:preset]` loads this file, which is that module's config; from an
installed package, `--config=even_pixels[:preset]` names the same. Presets, fields and commands:
the docstring of `ipr_jax/configs/even_pixels.py`.
"""

from ipr_jax.configs import even_pixels

get_config = even_pixels.get_config
