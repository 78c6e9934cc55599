"""The network: a classifier by name with its weights, new head and freezing; exact evaluation, metrics,
calibration."""
