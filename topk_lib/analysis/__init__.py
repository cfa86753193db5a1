"""What top-k keeps on real activations: metrics, attention and MLP statistics capture, approximations, budgets, layer sensitivity."""

__all__ = ["approximations", "budget", "capture", "metrics", "mlp", "recording", "selection", "sensitivity"]
