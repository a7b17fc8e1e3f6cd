"""slotsweep orchestrator: the `slotsweep` command, sweeps on Ray Tune, MLflow runs."""

from pathlib import Path

# The project checkout (or installed tree): sweeps/, core/ and the git history live under it.
PROJECT_DIR = Path(__file__).resolve().parents[1]
