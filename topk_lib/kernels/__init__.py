"""The top-k attention and feed-forward kernels (Gupta et al. 2021, section 3), their backends and exact baselines."""

__all__ = ["attention", "baselines", "checks", "chunking", "feedforward", "flex", "product", "selection",
           "threshold", "threshold_triton"]
