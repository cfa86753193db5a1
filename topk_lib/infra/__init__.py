"""Plumbing every layer may use: where files go, the atomic result cache, notebook parameters and output folders, the runner, the lab launcher, child processes."""

__all__ = ["cache", "lab", "outputs", "parameters", "paths", "processes", "runner"]
