"""Sharded checkpoints (DESIGN §9): `sl.checkpoint.save(path, tree)`, `sl.checkpoint.load(path, like)`."""
