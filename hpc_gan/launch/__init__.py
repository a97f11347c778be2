"""Submitting, monitoring and pulling training jobs (SLURM through submitit, or local)."""
