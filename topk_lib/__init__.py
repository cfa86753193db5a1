"""topk-lab: top-k attention and feed-forward kernels, drop-in patching, and analysis tools."""

from topk_lib.attention import chunked_attention, topk_attention, vanilla_attention
from topk_lib.feedforward import topk_feedforward

__all__ = ["topk_attention", "chunked_attention", "vanilla_attention", "topk_feedforward"]
