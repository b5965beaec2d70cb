"""Converts the shard directories' run.json files of format 1 to format 2
(ipr_jax/evaluation/shards.py).

    python experiments/migrate_run_json.py                      # every shards/run.json below
                                                                # experiments/results
    python experiments/migrate_run_json.py PATH ...             # run.json files or folders

Format 1 (before the "format" field) recorded the settings with the IPR variant fields at the
paper's values left out, without eval.unique_solution, SamplerConfig.clamp_noise or the batching,
and without the code. Format 2 records every field resolved, the batching and the code. The
conversion rebuilds the run's config from the recorded sections, resolves it with today's
`runner.resolved_settings` (the omitted fields take the values they had: the paper's variant
values and the dataclass defaults; the batching that `runner.puzzle_batches` gives, unchanged
since these runs) and refuses if that changes any recorded value. The parameters' digest is kept.

The code that computed a format-1 run is unknown, so its "code" record is null: shards under such
a run.json are never reused (a rerun recomputes them; with no shards present, the rerun records
its own code). `--assume_current_code` records this checkout's code instead: only for shards you
know this very code computed (e.g. a run cut while nothing changed since).

Files of format 2 written before the SRM sampler family (ipr-jax 0.1.0 up to the commit that added
`sampler.schedule`) lack its fields; they get them at the values that computation had
(`SCHEDULE_FIELDS`: the adaptive schedule, one patch per block, steps from steps_per_patch),
which are the defaults. Their shards stay refused for reuse (other code), as before. Likewise
files written before several chains per puzzle (`ipr.query_cells`, `ipr.chains`) get
`CHAIN_FIELDS`: one chain, the query scoring the candidates, the defaults.
"""

import argparse
import json
import pathlib
import sys

import ml_collections

from ipr_jax.evaluation import runner
from ipr_jax.evaluation import shards as eval_shards

_RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def config_of(stored: dict) -> ml_collections.ConfigDict:
  """The config whose settings a run.json records (eval.name is not recorded)."""
  return ml_collections.ConfigDict(
      {
          "task": stored["task"],
          **{section: stored[section] for section in ("data", "model", "sampler", "ipr")},
          "eval": {**stored["eval"], "name": ""},
      }
  )


def migrate(stored: dict, assume_current_code: bool = False) -> dict:
  """A format-1 run.json's content as format 2 (see the module docstring)."""
  resolved = {
      **runner.resolved_settings(config_of(stored)),
      "params": stored["params"],
      "params_sha256": stored["params_sha256"],
  }
  migrated = eval_shards.migrate_format_1(stored, resolved)
  if assume_current_code:
    migrated["code"] = eval_shards.code_record()
  return migrated


# The fields the SRM sampler family added, at the values every earlier run computed with.
SCHEDULE_FIELDS = {
    "sampler": {"schedule": "adaptive", "max_steps": 0, "max_order": 1, "certainty_decay": 0.5},
    "ipr": {"schedule": "adaptive", "top_k": 1, "max_order": 1, "certainty_decay": 0.5},
}


# The fields that several chains per puzzle added, likewise.
CHAIN_FIELDS = {"ipr": {"query_cells": "candidates", "chains": 1}}
ADDED_FIELDS = (SCHEDULE_FIELDS, CHAIN_FIELDS)


def add_missing_fields(stored: dict) -> list[str]:
  """Adds the missing fields of `ADDED_FIELDS` to a format-2 run.json's content; returns their
  names."""
  added = []
  for added_fields in ADDED_FIELDS:
    for section, fields in added_fields.items():
      for name, value in fields.items():
        if name not in stored[section]:
          stored[section][name] = value
          added.append(f"{section}.{name}")
  return added


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
      "paths",
      nargs="*",
      default=[str(_RESULTS)],
      help="run.json files, or folders searched for shards/run.json",
  )
  parser.add_argument(
      "--assume_current_code",
      action="store_true",
      help="record this checkout's code (only if it computed the shards)",
  )
  parser.add_argument("--dry_run", action="store_true", help="only list what would change")
  args = parser.parse_args(argv)
  files = []
  for path in map(pathlib.Path, args.paths):
    files += [path] if path.is_file() else list(eval_shards.iter_settings_files(path))
  for path in files:
    stored = json.loads(path.read_text())
    if stored.get("format", 1) != 1:
      added = add_missing_fields(stored)
      if added and not args.dry_run:
        eval_shards.write_settings(path.parent, stored)
      print(
          f"{path}: format {stored['format']}, "
          + (f"added {', '.join(added)}" if added else "left as it is")
          + (" (dry run)" if args.dry_run and added else "")
      )
      continue
    migrated = migrate(stored, args.assume_current_code)
    if not args.dry_run:
      eval_shards.write_settings(path.parent, migrated)
    print(f"{path}: format 1 -> {eval_shards.FORMAT}" + (" (dry run)" if args.dry_run else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
