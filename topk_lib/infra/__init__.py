"""Plumbing every layer may use: where files go (paths), the atomic result cache, the notebook runner."""

__all__ = ["cache", "paths", "runner"]
