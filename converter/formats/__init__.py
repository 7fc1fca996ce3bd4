"""One reader per checkpoint format; each returns a ``CheckpointContents`` under TF1 names."""
