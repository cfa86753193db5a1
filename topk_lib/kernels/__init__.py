"""The top-k attention and feed-forward kernels (Gupta et al. 2021, section 3) and their exact baselines."""

__all__ = ["attention", "feedforward"]
