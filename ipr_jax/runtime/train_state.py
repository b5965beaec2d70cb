"""Training state of an SRM denoiser: live weights, optimizer state, EMA weights and the PRNG.

The state is a plain pytree (no functions inside) so that Orbax can save and restore it as is and
`jax.pmap` can donate it. The optimizer (an optax transformation) is passed to `apply_gradients`
explicitly instead of being stored in the state.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
  """Everything needed to resume training exactly.

  Attributes:
    step: int32 scalar, number of optimizer steps taken so far.
    params: the live U-Net parameters (float32 master weights).
    opt_state: the optax state of `params`.
    ema_params: exponential moving average of `params` (used for sampling).
    rng: uint32 raw key data (`jax.random.key_data`) of the training loop's root key. Raw data,
      not a typed key, so that Orbax can store it; `TrainState.key` rewraps it.
  """

  step: jax.Array
  params: Any
  opt_state: optax.OptState
  ema_params: Any
  rng: jax.Array

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation, key: jax.Array) -> "TrainState":
    """A fresh state at step 0; the EMA starts as a copy of `params`.

    Args:
      params: initial parameters.
      tx: the optimizer whose state is initialised.
      key: a typed PRNG key (`jax.random.key`) used for all training randomness.
    """
    return cls(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema_params=jax.tree_util.tree_map(jnp.array, params),
        rng=jax.random.key_data(key),
    )

  @property
  def key(self) -> jax.Array:
    """The typed root key of the training loop."""
    return jax.random.wrap_key_data(self.rng)

  def apply_gradients(self, grads, tx: optax.GradientTransformation, ema_decay: float):
    """One optimizer step followed by one EMA update.

    The EMA follows torch's `AveragedModel` as the reference uses it (spec §3.4): its first update
    copies the weights, later updates are `ema + (1 - decay) * (params - ema)`, no decay warm-up.

    Args:
      grads: gradients with the structure of `params`.
      tx: the optimizer used in `create`.
      ema_decay: EMA decay, e.g. 0.9999.

    Returns:
      The state after the update, with `step` incremented.
    """
    updates, opt_state = tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    first = self.step == 0
    ema_params = jax.tree_util.tree_map(
        lambda e, p: jnp.where(first, p, e + (1.0 - ema_decay) * (p - e)), self.ema_params, params
    )
    return self.replace(
        step=self.step + 1, params=params, opt_state=opt_state, ema_params=ema_params
    )
