"""Transformers models: loading, layer discovery, one interception mechanism, and switching layers to top-k."""

__all__ = ["call_kwargs", "layers", "loading", "mlps", "patching", "registry"]
