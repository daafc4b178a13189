"""Launchers: what SLURM and Kubernetes run is built here, once, from the trainer config."""
