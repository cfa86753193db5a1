"""The interactive k explorer behind notebook 06: the explorer itself and the widgets' session."""

__all__ = ["explorer", "session"]
