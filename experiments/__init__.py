"""Experiment runner and configs: `python -m experiments.run --flagfile=...`."""
