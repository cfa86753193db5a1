"""The interactive explorer behind notebook 06."""

__all__ = ["explorer"]
