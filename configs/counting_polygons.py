"""Counting Polygons: the packaged config `ipr_jax/configs/counting_polygons.py`, in a clone.

`--config=configs/counting_polygons.py[:preset]` loads this file, which is that module's config;
from an installed package, `--config=counting_polygons[:preset]` names the same. Presets, fields
and commands: the docstring of `ipr_jax/configs/counting_polygons.py`.
"""

from ipr_jax.configs import counting_polygons

get_config = counting_polygons.get_config
