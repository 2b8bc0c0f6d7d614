"""The run-folder format: atomic writes, metrics file, status, confusion arrays, checkpoints, loggers."""
