"""The evaluation: SRM + IPR on test puzzles (`runner`), its per-batch shard store (`shards`), the
per-budget and per-puzzle reports and figures (`report`), the compiled memory fit (`fit`)."""
