"""Plumbing every layer may use: where files go, the atomic result cache, notebook parameters, the runner, child processes."""

__all__ = ["cache", "parameters", "paths", "processes", "runner"]
