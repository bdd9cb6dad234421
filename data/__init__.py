"""Datasets: formats -> manifest, the embedded synthetic dataset, validation (GX), versioning (DVC)."""
