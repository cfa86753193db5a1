"""Transformers models: loading, layer discovery, and switching their attention and feed-forward layers to top-k."""

__all__ = ["loading", "patching"]
