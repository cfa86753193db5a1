"""What top-k keeps on real activations: metrics, attention and MLP statistics capture, approximations."""

__all__ = ["approximations", "capture", "metrics", "mlp", "recording"]
