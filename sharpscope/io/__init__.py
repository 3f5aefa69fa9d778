"""Loading and saving: checkpoints, model specs, data specs, losses."""
