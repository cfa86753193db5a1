"""Figures: functions take data frames and return a Figure; saving happens in one place."""

__all__ = ["style", "analysis", "accuracy", "bench", "explorer"]
