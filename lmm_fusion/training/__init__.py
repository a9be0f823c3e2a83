"""Datasets from bags, training, evaluation and INT8 calibration."""
