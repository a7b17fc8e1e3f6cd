"""slotsweep orchestrator: the `slotsweep` command, sweeps on Ray Tune, MLflow runs."""
