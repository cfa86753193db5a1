"""topk-lab: top-k attention and feed-forward kernels, drop-in patching, and analysis tools."""

from topk_lib.kernels.attention import chunked_attention, topk_attention, vanilla_attention
from topk_lib.kernels.feedforward import topk_feedforward
from topk_lib.hf.loading import load_model
from topk_lib.hf.patching import use_topk

__all__ = [
    "topk_attention",
    "chunked_attention",
    "vanilla_attention",
    "topk_feedforward",
    "load_model",
    "use_topk",
]
