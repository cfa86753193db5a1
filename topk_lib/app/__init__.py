"""The interactive k explorer behind notebook 06: the explorer, continuations, the widgets' session and widgets."""

__all__ = ["explorer", "continuations", "session", "widgets"]
