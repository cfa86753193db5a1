"""Plumbing every layer may use: where files go (paths), the atomic result cache, notebook parameters, the notebook runner."""

__all__ = ["cache", "parameters", "paths", "runner"]
