"""Sweeps over settings of k with cached results: settings, sweeps, accuracy, summaries, inputs, perplexity, training."""

__all__ = ["accuracy", "inputs", "perplexity", "selector_summaries", "selectors", "settings", "summaries", "sweep",
           "training"]
