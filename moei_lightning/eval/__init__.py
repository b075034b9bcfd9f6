"""Evaluation: benchmark loaders and scorers."""
