"""Sweeps over settings of k with cached results: accuracy, analysis inputs, training."""

__all__ = ["accuracy", "inputs", "training"]
