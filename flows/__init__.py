"""Prefect flows and the `ilr` command line."""
