"""Differences between two nested settings dicts, named by dotted keys: one definition for the
messages that list them (`eval_shards.check_settings` for run.json, `pretrained.check_compatible`
for a shipped model's config sections)."""

from typing import Any


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{'a.b.c': leaf} of nested dicts (the leaves as they are; lists are leaves).

  A tree that is not a dict is one leaf, named by `prefix` without its trailing dot.
  """
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def differences(
    old: dict[str, Any], new: dict[str, Any], absent: Any = None
) -> list[tuple[str, Any, Any]]:
  """(dotted key, old value, new value) of every leaf in which the flattened `old` and `new` differ,
  sorted by key. A key one side lacks compares as None there and is reported as `absent`."""
  old, new = flatten(old), flatten(new)
  differing = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
  return [(k, old.get(k, absent), new.get(k, absent)) for k in differing]


def model_record(model: Any) -> dict[str, Any]:
  """A config's model section as runs and checkpoints record it (a dict).

  A U-Net's record leaves out the transformer's fields (`kind`, `dit`), so that it reads as the
  records made before the DiT existed (shipped models, committed runs, older checkpoints); a
  section without `kind` is a U-Net's.
  """
  record = dict(model.to_dict() if hasattr(model, "to_dict") else model)
  if record.get("kind", "unet") == "unet":
    record.pop("kind", None)
    record.pop("dit", None)
  return record


def with_flow(config: dict[str, Any]) -> dict[str, Any]:
  """`config` (a dict) with its flow named: a config without `flow` is the rectified flow's
  (every config before the other flows existed)."""
  return {**config, "flow": config.get("flow", "rectified")} if "task" in config else config
