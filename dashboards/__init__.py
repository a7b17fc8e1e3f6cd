"""slotsweep dashboards: sweep reports built from MLflow data."""
