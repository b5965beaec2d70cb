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

Block starts may repeat (e.g. p = 5, overlap 0.9, n = 64 gives starts 0, 0, 1,
1, 2, ...). The precomputed schedules (fixed, random_sequential,
graph_sequential) then start several blocks in one step, as the SRM reference's
scheduling matrix has them. The adaptive schedule starts one block per step, as
the reference's sequential_adaptive sampler does: after a repeated start it
selects nothing more, and the patches behind it jump from pure noise to the
prediction in the last step. `check_block_starts` refuses that for the adaptive
schedule (it needs p * (1 - overlap) >= 1, up to rounding), and for every kind
a schedule with no denoiser pass or a block length of 0.

Because each puzzle of a batch has its own `n` inside a jitted sampler,
`schedule_table` tabulates every n in 0..N on the host as numpy arrays that the
sampler indexes with each puzzle's n.
"""

import dataclasses
import fractions
import functools
import math
from typing import Optional

import numpy as np

_F32 = np.float32


def _check_args(n: int, steps_per_patch: int, overlap: float) -> None:
  if int(n) != n or n < 0:
    raise ValueError(f"n must be a non-negative integer, got {n!r}.")
  if int(steps_per_patch) != steps_per_patch or steps_per_patch < 1:
    raise ValueError(f"steps_per_patch must be a positive integer, got {steps_per_patch!r}.")
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
    block_starts: `[blocks + 1]` int64, the step at which the k-th block starts (its patches
      are picked); the last entry is the -1 sentinel that no step ever matches. blocks is n
      (one patch per block), ceil(n / top_k) (adaptive), 1 (fixed), or min(n, M) for the
      sequential schedules with M steps (the reference plans at most M blocks; the patches
      it leaves unplanned start at step 0).
    prototype: `[block_len]` float32, (L - j) / L for j = 0..L-1.
  """

  n: int
  max_steps: int
  ideal_block_len: float
  block_len: int
  block_starts: np.ndarray
  prototype: np.ndarray


BLOCK_SCHEDULES = ("adaptive", "fixed", "random_sequential", "graph_sequential")
# The SRM authors' framework's schedules: per-patch time maps without blocks (`sampling.time_maps`);
# they have no block table and nothing for `check_block_starts` to refuse.
TIME_MAP_SCHEDULES = ("raster", "adaptive_inverse", "adaptive_softmax", "mask_git")
SCHEDULES = BLOCK_SCHEDULES + TIME_MAP_SCHEDULES
# The schedules whose patch order is planned before sampling (`sampling.planning`).
PLANNED = ("random_sequential", "graph_sequential")


def _empty_schedule() -> Schedule:
  return Schedule(
      n=0,
      max_steps=0,
      ideal_block_len=0.0,
      block_len=0,
      block_starts=np.full([1], -1, np.int64),
      prototype=np.zeros([0], _F32),
  )


def _float32_block_len(blocks: int, om: np.float32, total_steps: int) -> np.float32:
  """The reference's `max_steps / ((blocks - 1) * (1 - overlap) + 1)` in float32 (torch
  evaluates `int / tensor` as reciprocal(tensor) * int)."""
  denom = _F32(blocks - 1) * om + _F32(1)
  return (_F32(1) / denom) * _F32(total_steps)


def _float32_schedule(
    n: int, p: int, overlap: float, blocks: Optional[int] = None, total_steps: int = 0
) -> Schedule:
  """Emulates the reference's float32 torch arithmetic, operation by operation.

  `blocks` (default n) patch groups; `total_steps` > 0 fixes the step count (the SRM reference's
  `max_steps`; the loop then ends when the last block's prototype has ended), 0 derives it from
  p as the IPR reference does.
  """
  blocks = n if blocks is None else blocks
  om = _F32(1.0 - overlap)  # Python double 1 - overlap, cast to float32.
  if total_steps:
    steps = int(total_steps)
  else:
    fp = _F32(p)
    steps = int(math.ceil(fp + (_F32(blocks - 1) * om) * fp))
  ideal = _float32_block_len(blocks, om, steps)
  block_len = int(math.ceil(ideal))
  k = np.arange(blocks, dtype=_F32)
  starts = np.floor((k * ideal) * om).astype(np.int64)
  if total_steps:  # The SRM reference stops once every time of the next row is 0.
    steps = min(steps, int(starts[-1]) + block_len)
  fl = _F32(block_len)
  j = np.arange(block_len, dtype=_F32)
  proto = np.clip((fl - j) / fl, _F32(0), _F32(1)).astype(_F32)
  return Schedule(
      n=n,
      max_steps=steps,
      ideal_block_len=float(ideal),
      block_len=block_len,
      block_starts=np.append(starts, -1).astype(np.int64),
      prototype=proto,
  )


def _exact_schedule(
    n: int, p: int, overlap: float, blocks: Optional[int] = None, total_steps: int = 0
) -> Schedule:
  """The same formulas in exact rational arithmetic (the `clean` mode)."""
  blocks = n if blocks is None else blocks
  om = 1 - _overlap_fraction(overlap)
  steps = int(total_steps) if total_steps else math.ceil(p + (blocks - 1) * om * p)
  ideal = fractions.Fraction(steps) / ((blocks - 1) * om + 1)
  block_len = math.ceil(ideal)
  starts = [math.floor(k * ideal * om) for k in range(blocks)]
  if total_steps:
    steps = min(steps, starts[-1] + block_len)
  proto = np.array([(block_len - j) / block_len for j in range(block_len)], dtype=_F32)
  return Schedule(
      n=n,
      max_steps=steps,
      ideal_block_len=float(ideal),
      block_len=block_len,
      block_starts=np.array(starts + [-1], dtype=np.int64),
      prototype=proto,
  )


def _sequential_schedule(n: int, p: int, overlap: float, clean: bool, total_steps: int) -> Schedule:
  """The SRM reference's graph_sequential time scheduler (random_sequential is its max_order 0)
  for n patches in blocks of one patch: M steps (total_steps, or the adaptive schedule's step
  count + 1, so that both take the same passes); b = min(n, M) blocks (the reference's planning
  loop stops after M blocks; the patches it leaves unplanned keep start step 0); block length
  L = floor(M / ((b - 1)(1 - overlap) + 1)), block k starting at floor(k L (1 - overlap)) (starts
  may repeat: those blocks start together), prototype (L - j) / L; the last of the M time rows
  is 0, so the loop takes M - 1 passes."""
  steps = int(total_steps) if total_steps else make_schedule(n, p, overlap, clean).max_steps + 1
  if steps < 2:
    raise ValueError(
        f"max_steps={steps} leaves no denoiser pass (the last of the max_steps time rows is 0); "
        "use max_steps >= 2."
    )
  blocks = min(n, steps)
  if clean:
    exact_om = 1 - _overlap_fraction(overlap)
    block_len = math.floor(fractions.Fraction(steps) / ((blocks - 1) * exact_om + 1))
    starts = [math.floor(k * block_len * exact_om) for k in range(blocks)]
  else:
    om = _F32(1.0 - overlap)
    block_len = int(np.floor(_float32_block_len(blocks, om, steps)))
    starts = [int(s) for s in np.floor((np.arange(blocks, dtype=_F32) * _F32(block_len)) * om)]
  if block_len < 1:
    given = f"max_steps={steps}" if total_steps else f"steps_per_patch={p} ({steps} steps)"
    raise ValueError(
        f"{given} and overlap={overlap} leave a block length of 0 for n={n} patches in "
        f"{blocks} blocks (float32 rounding of {steps} / {blocks}: the reference would divide "
        f"by 0); use {'another max_steps' if total_steps else 'more steps_per_patch'}."
    )
  fl = _F32(block_len)
  proto = ((fl - np.arange(block_len, dtype=_F32)) / fl).astype(_F32)
  return Schedule(
      n=n,
      max_steps=steps - 1,
      ideal_block_len=float(block_len),
      block_len=block_len,
      block_starts=np.array(starts + [-1], np.int64),
      prototype=proto,
  )


def _fixed_schedule(n: int, p: int, overlap: float, clean: bool, total_steps: int) -> Schedule:
  """The SRM reference's fixed sampler: every unknown patch on one shared ramp 1 -> 0 over M
  steps (total_steps, or the adaptive schedule's step count, for equal passes), one block of all
  patches at step 0. The ramp is linspace(1, 0, M + 1) in float64 rounded to float32 (torch's
  float32 linspace agrees to within an ulp)."""
  steps = int(total_steps) if total_steps else make_schedule(n, p, overlap, clean).max_steps
  ramp = np.linspace(1.0, 0.0, steps + 1).astype(_F32)
  return Schedule(
      n=n,
      max_steps=steps,
      ideal_block_len=float(steps),
      block_len=steps,
      block_starts=np.array([0, -1], np.int64),
      prototype=ramp[:steps],
  )


def make_schedule(
    n: int,
    steps_per_patch: int,
    overlap: float,
    clean: bool = False,
    *,
    kind: str = "adaptive",
    top_k: int = 1,
    total_steps: int = 0,
) -> Schedule:
  """Schedule constants for `n` unknown patches.

  Args:
    n: number of patches to generate (>= 0).
    steps_per_patch: p, steps each patch spends going from t = 1 to t = 0.
    overlap: fraction of a patch's steps shared with the next patch, [0, 1).
    clean: exact arithmetic instead of the reference's float32 arithmetic.
    kind: one of `SCHEDULES`: 'adaptive' (the greedy SRM schedule, blocks of `top_k` patches),
      'fixed' (one shared ramp), 'random_sequential' / 'graph_sequential' (the reference's
      graph_sequential time scheduler; one patch per block).
    top_k: patches per block of the adaptive schedule (ceil(n / top_k) blocks).
    total_steps: > 0: the reference SRM samplers' `max_steps`; 0: derived from steps_per_patch
      (the IPR reference's rule; the other kinds then take the adaptive schedule's passes).

  Returns:
    A `Schedule` (its max_steps: the denoiser passes; block_starts: one start per block).
  """
  _check_args(n, steps_per_patch, overlap)
  if kind not in BLOCK_SCHEDULES:
    raise ValueError(f"kind must be one of {BLOCK_SCHEDULES}, got {kind!r}.")
  if int(top_k) != top_k or top_k < 1:
    raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
  if int(total_steps) != total_steps or total_steps < 0:
    raise ValueError(f"total_steps must be a non-negative integer, got {total_steps!r}.")
  if n == 0:
    return _empty_schedule()
  n, p, overlap = int(n), int(steps_per_patch), float(overlap)
  if kind == "fixed":
    return _fixed_schedule(n, p, overlap, clean, int(total_steps))
  if kind in PLANNED:
    return _sequential_schedule(n, p, overlap, clean, int(total_steps))
  blocks = -(-n // int(top_k))
  build = _exact_schedule if clean else _float32_schedule
  return build(n, p, overlap, blocks, int(total_steps))


def _setting(steps_per_patch: int, overlap: float, top_k: int, total_steps: int) -> str:
  """The fields that set an adaptive schedule's block starts, as `name=value`s."""
  fields = [f"max_steps={total_steps}" if total_steps else f"steps_per_patch={steps_per_patch}"]
  fields.append(f"overlap={overlap}")
  if top_k != 1:
    fields.append(f"top_k={top_k}")
  return ", ".join(fields[:-1]) + " and " + fields[-1]


def check_block_starts(
    n_values,
    steps_per_patch: int,
    overlap: float,
    clean: bool = False,
    name: str = "sampler",
    *,
    kind: str = "adaptive",
    top_k: int = 1,
    total_steps: int = 0,
) -> None:
  """Raises ValueError if the schedule is degenerate for some n in `n_values`.

  Degenerate: the adaptive schedule with repeated block starts (it starts one block per step,
  as the reference's sequential_adaptive sampler, so the blocks behind a repeated start are
  never selected and jump from noise to the prediction in the last step); any schedule with no
  denoiser pass or a block length of 0. The precomputed schedules (fixed, random_sequential,
  graph_sequential) start repeated blocks together, as the reference does: allowed.

  Args:
    n_values: the patch counts the schedule is used for (0 and 1 always pass).
    steps_per_patch, overlap, clean: as in `make_schedule`.
    name: the config section the setting comes from, for the message (e.g. 'ipr').
    kind, top_k, total_steps: as in `make_schedule`; the message names the fields that set the
      block starts (max_steps instead of steps_per_patch when total_steps > 0, top_k when it
      is not 1). A time-map kind (`TIME_MAP_SCHEDULES`) has no block starts: nothing to check.
  """
  if kind in TIME_MAP_SCHEDULES:
    return
  for n in sorted({int(n) for n in n_values}):
    try:
      made = make_schedule(
          n, steps_per_patch, overlap, clean, kind=kind, top_k=top_k, total_steps=total_steps
      )
    except ValueError as e:
      raise ValueError(f"{name}: {e}") from e
    starts = made.block_starts[:-1]
    if kind != "adaptive" or not np.any(np.diff(starts) <= 0):
      continue
    shown = ", ".join(str(s) for s in starts[:8]) + (", ..." if len(starts) > 8 else "")
    blocks = f" in {len(starts)} blocks" if top_k != 1 else ""
    if total_steps:
      remedy = "more max_steps or a smaller overlap"
    else:
      remedy = (
          "steps_per_patch * (1 - overlap) >= 1 (e.g. a smaller overlap or more steps per patch)"
      )
    raise ValueError(
        f"{name}: {_setting(steps_per_patch, overlap, top_k, total_steps)} give repeated block "
        f"starts for n={n} patches{blocks} ({shown}): the adaptive schedule starts one block "
        f"per step (as the reference's sequential_adaptive sampler), so it would select only "
        f"some of them and jump the others from noise to the prediction. Use {remedy}, or a "
        f"precomputed schedule (fixed, random_sequential, graph_sequential), which starts "
        f"such blocks together."
    )


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
    block_starts: `[N + 1, N + 1]` int32; row n holds the starts of its blocks (non-decreasing;
      repeated starts begin together), then -1 (the sentinel) and -1 padding.
    prototypes: `[N + 1, L_max]` float32; row n holds its prototype, 0 padding.
    patches_per_block: patches the greedy loop selects at each block start (lowest sigma
      first): top_k of the adaptive schedule, N of the fixed one (all at once), 1 otherwise.
    planned: True if the patch of each block is planned before sampling (random_sequential,
      graph_sequential: `sampling.planning`), not chosen by sigma.
  """

  num_patches: int
  max_steps: np.ndarray
  block_len: np.ndarray
  block_starts: np.ndarray
  prototypes: np.ndarray
  patches_per_block: int = 1
  planned: bool = False

  @property
  def num_blocks(self) -> np.ndarray:
    """`[N + 1]` int32 blocks of each n: its starts before the -1 sentinel (the sequential
    schedules plan at most this many patches; the rest start at step 0)."""
    return np.sum(self.block_starts >= 0, axis=1).astype(np.int32)

  def steps_bound(self, n_values=None) -> int:
    """Largest max_steps over `n_values` (default: all n): a static loop length."""
    steps = self.max_steps if n_values is None else self.max_steps[np.asarray(n_values)]
    return int(np.max(steps)) if np.size(steps) else 0


@functools.lru_cache(maxsize=64)
def schedule_table(
    num_patches: int,
    steps_per_patch: int,
    overlap: float,
    clean: bool = False,
    start_time: float = 1.0,
    *,
    kind: str = "adaptive",
    top_k: int = 1,
    total_steps: int = 0,
) -> ScheduleTable:
  """Tabulates `make_schedule` for n = 0..num_patches (cached per argument set).

  With `start_time` t0 < 1 (IPR's partial re-noising) every prototype is scaled by t0, so a
  patch goes t0, t0 (L-1)/L, ..., t0 / L, then 0; the steps are those of `steps_per_patch`.
  kind, top_k, total_steps: as in `make_schedule`.
  """
  if int(num_patches) != num_patches or num_patches < 1:
    raise ValueError(f"num_patches must be a positive integer, got {num_patches!r}.")
  if not 0.0 < start_time <= 1.0:
    raise ValueError(f"start_time must lie in (0, 1], got {start_time!r}.")
  schedules = [
      make_schedule(
          n, steps_per_patch, overlap, clean, kind=kind, top_k=top_k, total_steps=total_steps
      )
      for n in range(num_patches + 1)
  ]
  max_len = max(1, max(s.block_len for s in schedules))
  starts = np.full([num_patches + 1, num_patches + 1], -1, np.int32)
  protos = np.zeros([num_patches + 1, max_len], np.float32)
  for s in schedules:
    starts[s.n, : len(s.block_starts)] = s.block_starts
    protos[s.n, : s.block_len] = s.prototype
  if start_time != 1.0:
    protos = (protos * _F32(start_time)).astype(_F32)
  table = ScheduleTable(
      num_patches=int(num_patches),
      max_steps=np.array([s.max_steps for s in schedules], np.int32),
      block_len=np.array([s.block_len for s in schedules], np.int32),
      block_starts=starts,
      prototypes=protos,
      patches_per_block=int(num_patches) if kind == "fixed" else int(top_k),
      planned=kind in PLANNED,
  )
  for a in (table.max_steps, table.block_len, table.block_starts, table.prototypes):
    a.setflags(write=False)
  return table
