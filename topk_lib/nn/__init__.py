"""One small pre-LN transformer with top-k attention and feed-forward, for training and benchmarks."""

from topk_lib.nn.transformer import Block, FeedForward, SelfAttention, Transformer, TransformerConfig

__all__ = ["TransformerConfig", "SelfAttention", "FeedForward", "Block", "Transformer"]
