"""Datasets and procedural worlds."""
