"""Figures: functions take data frames and return a Figure; saving happens in one place."""

__all__ = ["accuracy", "bench", "explorer", "style", "training"]
