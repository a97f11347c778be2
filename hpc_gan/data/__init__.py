"""Datasets: synthetic phantoms, NIfTI loading, patch extraction and sharding."""
