"""slotsweep core: config, data, models, losses, metrics and training. No Ray, no MLflow."""

__version__ = "0.1.0"
