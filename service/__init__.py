"""The sample server: checkpoints in a directory -> one device worker -> REST."""
