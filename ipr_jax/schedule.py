"""Scheduling constants of the SRM greedy sampler (reference spec §4.3).

The greedy sampler generates `n` unknown patches one after another. Each patch
follows the same time prototype (1, (L-1)/L, ..., 1/L, then 0) of length
`block_len` L, and the k-th patch is picked at step `block_starts[k]`, so that
consecutive patches overlap by a fraction `overlap` of their steps:

  max_steps  = ceil(p + (n - 1) * (1 - overlap) * p)
  ideal      = max_steps / ((n - 1) * (1 - overlap) + 1)
  block_len  = ceil(ideal)
  start[k]   = floor(k * ideal * (1 - overlap)),  k = 0..n-1;  start[n] = -1
  proto[j]   = (block_len - j) / block_len,       j = 0..block_len-1

with p = steps_per_patch. The reference evaluates this in float32 (its `n` is an
int32 tensor), and the rounding changes some schedules: for MS init (p=3,
overlap 0) n = 56, 60, 63 get block_len 4 and n = 61 gets starts 0, 2, 5, ...;
for MS IPR (p=10, overlap 0.8) k = 13, 14, 19 get starts 0, 1, 3, ... and k = 17
gets block_len 11. By default this module reproduces that float32 arithmetic
operation by operation, so the anomalies happen exactly as in the reference.
With `clean=True` the same formulas are evaluated in exact rational arithmetic
(`overlap` read as the nearest fraction with denominator <= 10**6, so 0.9 is
9/10); this is a deliberate deviation from the reference.

`n = 0` (nothing to generate) is defined here as an empty schedule: zero steps,
block_len 0 and starts [-1]. The reference never builds that case (it would
run ceil(p * overlap) forwards that change nothing).

A schedule whose block starts repeat (e.g. p = 5, overlap 0.9, n = 64 gives
starts 0, 0, 1, 1, 2, ...) is degenerate: the greedy loop selects one patch
per step, so a repeated start is never matched again and the patches behind it
jump from pure noise to the prediction in the last step. `check_block_starts`
refuses such settings; it needs p * (1 - overlap) >= 1, up to rounding.

Because each puzzle of a batch has its own `n` inside a jitted sampler,
`schedule_table` tabulates every n in 0..N on the host as numpy arrays that the
sampler indexes with each puzzle's n.
"""

import dataclasses
import fractions
import functools
import math

import numpy as np

_F32 = np.float32


def _check_args(n: int, steps_per_patch: int, overlap: float) -> None:
  if int(n) != n or n < 0:
    raise ValueError(f"n must be a non-negative integer, got {n!r}.")
  if int(steps_per_patch) != steps_per_patch or steps_per_patch < 1:
    raise ValueError(
        f"steps_per_patch must be a positive integer, got {steps_per_patch!r}.")
  if not 0.0 <= overlap < 1.0:
    raise ValueError(f"overlap must lie in [0, 1), got {overlap!r}.")


def _overlap_fraction(overlap: float) -> fractions.Fraction:
  return fractions.Fraction(overlap).limit_denominator(10**6)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The schedule constants for one number of unknown patches.

  Attributes:
    n: number of patches to generate.
    max_steps: number of denoiser passes (steps) of the greedy loop.
    ideal_block_len: the real-valued block length (float32 in the faithful
      mode, float64 of the exact value in the clean mode).
    block_len: ceil(ideal_block_len), the prototype length L.
    block_starts: `[n + 1]` int64, the step at which the k-th patch is picked;
      the last entry is the -1 sentinel that no step ever matches.
    prototype: `[block_len]` float32, (L - j) / L for j = 0..L-1.
  """
  n: int
  max_steps: int
  ideal_block_len: float
  block_len: int
  block_starts: np.ndarray
  prototype: np.ndarray


def _empty_schedule() -> Schedule:
  return Schedule(n=0, max_steps=0, ideal_block_len=0.0, block_len=0,
                  block_starts=np.full([1], -1, np.int64),
                  prototype=np.zeros([0], _F32))


def _float32_schedule(n: int, p: int, overlap: float) -> Schedule:
  """Emulates the reference's float32 torch arithmetic, operation by operation."""
  om = _F32(1.0 - overlap)  # Python double 1 - overlap, cast to float32.
  nm1 = _F32(n - 1)
  fp = _F32(p)
  max_steps = int(math.ceil(fp + (nm1 * om) * fp))
  denom = nm1 * om + _F32(1)
  # torch evaluates `int / tensor` as reciprocal(tensor) * int.
  ideal = (_F32(1) / denom) * _F32(max_steps)
  block_len = int(math.ceil(ideal))
  k = np.arange(n, dtype=_F32)
  starts = np.floor((k * ideal) * om).astype(np.int64)
  fl = _F32(block_len)
  j = np.arange(block_len, dtype=_F32)
  proto = np.clip((fl - j) / fl, _F32(0), _F32(1)).astype(_F32)
  return Schedule(n=n, max_steps=max_steps, ideal_block_len=float(ideal),
                  block_len=block_len,
                  block_starts=np.append(starts, -1).astype(np.int64),
                  prototype=proto)


def _exact_schedule(n: int, p: int, overlap: float) -> Schedule:
  """The same formulas in exact rational arithmetic (the `clean` mode)."""
  om = 1 - _overlap_fraction(overlap)
  max_steps = math.ceil(p + (n - 1) * om * p)
  ideal = fractions.Fraction(max_steps) / ((n - 1) * om + 1)
  block_len = math.ceil(ideal)
  starts = [math.floor(k * ideal * om) for k in range(n)] + [-1]
  proto = np.array([(block_len - j) / block_len for j in range(block_len)],
                   dtype=_F32)
  return Schedule(n=n, max_steps=max_steps, ideal_block_len=float(ideal),
                  block_len=block_len,
                  block_starts=np.array(starts, dtype=np.int64),
                  prototype=proto)


def make_schedule(n: int, steps_per_patch: int, overlap: float,
                  clean: bool = False) -> Schedule:
  """Schedule constants for `n` unknown patches (top_k = 1).

  Args:
    n: number of patches to generate (>= 0).
    steps_per_patch: p, steps each patch spends going from t = 1 to t = 0.
    overlap: fraction of a patch's steps shared with the next patch, [0, 1).
    clean: exact arithmetic instead of the reference's float32 arithmetic.

  Returns:
    A `Schedule`.
  """
  _check_args(n, steps_per_patch, overlap)
  if n == 0:
    return _empty_schedule()
  if clean:
    return _exact_schedule(int(n), int(steps_per_patch), float(overlap))
  return _float32_schedule(int(n), int(steps_per_patch), float(overlap))


def check_block_starts(n_values, steps_per_patch: int, overlap: float, clean: bool = False,
                       name: str = "sampler") -> None:
  """Raises ValueError unless every n in `n_values` has strictly increasing block starts.

  Args:
    n_values: the patch counts the schedule is used for (0 and 1 always pass).
    steps_per_patch, overlap, clean: as in `make_schedule`.
    name: the config section the setting comes from, for the message (e.g. 'ipr').
  """
  for n in sorted({int(n) for n in n_values}):
    starts = make_schedule(n, steps_per_patch, overlap, clean).block_starts[:-1]
    if np.any(np.diff(starts) <= 0):
      shown = ", ".join(str(s) for s in starts[:8]) + (", ..." if n > 8 else "")
      raise ValueError(
          f"{name}: steps_per_patch={steps_per_patch} and overlap={overlap} give repeated block "
          f"starts for n={n} patches ({shown}): the greedy loop would select only some of them "
          f"and jump the others from noise to the prediction. Use steps_per_patch * "
          f"(1 - overlap) >= 1 (e.g. a smaller overlap or more steps per patch).")


def max_steps(n, steps_per_patch, overlap, clean=False) -> int:
  """Number of greedy steps (denoiser passes) for n unknown patches."""
  return make_schedule(n, steps_per_patch, overlap, clean).max_steps


def ideal_block_len(n, steps_per_patch, overlap, clean=False) -> float:
  """Real-valued block length max_steps / ((n - 1)(1 - overlap) + 1)."""
  return make_schedule(n, steps_per_patch, overlap, clean).ideal_block_len


def block_len(n, steps_per_patch, overlap, clean=False) -> int:
  """Prototype length L = ceil(ideal block length)."""
  return make_schedule(n, steps_per_patch, overlap, clean).block_len


def block_starts(n, steps_per_patch, overlap, clean=False) -> np.ndarray:
  """`[n + 1]` steps at which each patch is picked, then the -1 sentinel."""
  return make_schedule(n, steps_per_patch, overlap, clean).block_starts


def prototype(n, steps_per_patch, overlap, clean=False) -> np.ndarray:
  """`[L]` float32 time prototype 1, (L-1)/L, ..., 1/L of a generated patch."""
  return make_schedule(n, steps_per_patch, overlap, clean).prototype


@dataclasses.dataclass(frozen=True, eq=False)
class ScheduleTable:
  """Schedules for every n in 0..num_patches, as arrays indexed by n.

  Attributes:
    num_patches: N, the largest n tabulated.
    max_steps: `[N + 1]` int32.
    block_len: `[N + 1]` int32.
    block_starts: `[N + 1, N + 1]` int32; row n holds starts for k = 0..n-1,
      -1 at index n and -1 padding after it.
    prototypes: `[N + 1, L_max]` float32; row n holds its prototype, 0 padding.
  """
  num_patches: int
  max_steps: np.ndarray
  block_len: np.ndarray
  block_starts: np.ndarray
  prototypes: np.ndarray

  def steps_bound(self, n_values=None) -> int:
    """Largest max_steps over `n_values` (default: all n): a static loop length."""
    steps = self.max_steps if n_values is None else self.max_steps[
        np.asarray(n_values)]
    return int(np.max(steps)) if np.size(steps) else 0


@functools.lru_cache(maxsize=64)
def schedule_table(num_patches: int, steps_per_patch: int, overlap: float,
                   clean: bool = False, start_time: float = 1.0) -> ScheduleTable:
  """Tabulates `make_schedule` for n = 0..num_patches (cached per argument set).

  With `start_time` t0 < 1 (IPR's partial re-noising) every prototype is scaled by t0, so a
  patch goes t0, t0 (L-1)/L, ..., t0 / L, then 0; the steps are those of `steps_per_patch`.
  """
  if int(num_patches) != num_patches or num_patches < 1:
    raise ValueError(f"num_patches must be a positive integer, got {num_patches!r}.")
  if not 0.0 < start_time <= 1.0:
    raise ValueError(f"start_time must lie in (0, 1], got {start_time!r}.")
  schedules = [make_schedule(n, steps_per_patch, overlap, clean)
               for n in range(num_patches + 1)]
  max_len = max(1, max(s.block_len for s in schedules))
  starts = np.full([num_patches + 1, num_patches + 1], -1, np.int32)
  protos = np.zeros([num_patches + 1, max_len], np.float32)
  for s in schedules:
    starts[s.n, :s.n + 1] = s.block_starts
    protos[s.n, :s.block_len] = s.prototype
  if start_time != 1.0:
    protos = (protos * _F32(start_time)).astype(_F32)
  table = ScheduleTable(
      num_patches=int(num_patches),
      max_steps=np.array([s.max_steps for s in schedules], np.int32),
      block_len=np.array([s.block_len for s in schedules], np.int32),
      block_starts=starts,
      prototypes=protos)
  for a in (table.max_steps, table.block_len, table.block_starts,
            table.prototypes):
    a.setflags(write=False)
  return table
