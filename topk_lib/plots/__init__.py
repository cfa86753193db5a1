"""Figures: functions take data frames and return a Figure; saving happens in one place."""

__all__ = ["accuracy", "analysis", "bench", "explorer", "selectors", "style", "training"]
