"""The evaluation: SRM + IPR on test puzzles (`runner`), what a run computes from its config
(`settings`), its per-batch shards (`store`: the run's shard store; `shards`: the files, run.json,
the code record), the merged results (`results`), the per-budget and per-puzzle reports and
figures (`report`), the compiled memory fit (`fit`)."""
