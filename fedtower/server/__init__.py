"""Server side: the run directory (config, metrics, checkpoints) and the run report."""
