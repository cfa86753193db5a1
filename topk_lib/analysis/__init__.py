"""What top-k keeps on real activations: metrics, per-head statistics capture, approximations, budgets, layer sensitivity."""

__all__ = ["approximations", "budget", "capture", "metrics", "sensitivity"]
