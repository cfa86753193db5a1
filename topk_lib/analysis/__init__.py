"""What top-k keeps on real activations: metrics, per-head statistics capture, approximations."""

__all__ = ["approximations", "capture", "metrics"]
