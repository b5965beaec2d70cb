"""Official SRM PyTorch checkpoints into ipr-jax: reading torch files (`torch_files`), the
state_dict <-> Flax mapping (`state_dict`), the checkpoint and classifier conversion
(`converter`)."""
