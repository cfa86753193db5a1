"""Plumbing every layer may use: where files go (paths), the atomic result cache, the notebook runner,
child processes that die with their parent (processes)."""

__all__ = ["cache", "paths", "processes", "runner"]
