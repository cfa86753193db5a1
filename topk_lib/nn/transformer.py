"""A small pre-LN transformer whose attention is top-k attention (Gupta et al. 2021, sections 3 and 4).

One model serves two purposes, chosen by :class:`TransformerConfig`:

* **an encoder classifier** (``vocab_size`` and ``n_classes`` set): token and learned position
  embeddings, the blocks, a final LayerNorm, mean pooling over real tokens (or the first
  token) and a linear head; ``forward(ids [B, L], mask [B, L] bool) -> logits [B, n_classes]``.
  The ListOps experiment trains it from scratch with GELU feed-forward layers and every
  Linear and Embedding drawn from N(0, 0.02) (``init_std``).
* **a bare stack of blocks** (both ``None``): ``forward(x [B, L, D]) -> [B, L, D]``. The
  benchmark's 12-layer causal model (ReLU feed-forward, PyTorch's default initialisation,
  optional feed-forward top-k) is this.

Every attention layer calls :func:`topk_lib.kernels.attention.topk_attention` (``topk=None``:
exact attention through the same kernel, whose memory-efficient backward is what trains the
model) unless ``attention`` names a baseline to compare against.

Dimensions: ``B`` batch, ``L`` sequence length, ``D`` model width, ``H`` heads, ``dh = D / H``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from topk_lib._validate import optional_k, positive_int
from topk_lib.kernels.attention import chunked_attention, topk_attention, vanilla_attention
from topk_lib.kernels.feedforward import ACTIVATIONS, topk_feedforward

__all__ = ["TransformerConfig", "SelfAttention", "FeedForward", "Block", "Transformer"]

ATTENTION = ("topk", "chunked", "vanilla", "sdpa")
POOL = ("mean", "cls")


@dataclass
class TransformerConfig:
    """The model's shape and its top-k settings; every combination is checked on creation."""

    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int | None = None  # hidden units per feed-forward layer; None: 4 * d_model
    activation: str = "gelu"  # feed-forward non-linearity, a name in kernels.feedforward.ACTIVATIONS
    dropout: float = 0.0  # on the output of every attention and feed-forward layer
    attention: str = "topk"  # "topk" (k=None: exact), or the baselines "chunked", "vanilla", "sdpa"
    topk: int | None = None  # keys kept per query in every layer; None: exact attention
    ff_k: int | None = None  # hidden units kept per token (topk_feedforward); None: dense layer
    chunk_size: int = 1024  # query rows (and tokens) per chunk of the top-k kernels
    causal: bool = False  # each position attends only to itself and earlier ones
    init_std: float | None = 0.02  # N(0, init_std) for every Linear/Embedding weight, zero biases; None: PyTorch's
    vocab_size: int | None = None  # token embeddings; None: forward takes embeddings [B, L, D]
    max_len: int | None = None  # rows of the learned position table (with vocab_size)
    n_classes: int | None = None  # final LayerNorm, pooling and a linear head; None: return [B, L, D]
    pool: str = "mean"  # "mean" over real tokens or "cls" (the first token), with n_classes

    def __post_init__(self):
        for name in ("d_model", "n_heads", "n_layers", "chunk_size"):
            positive_int(getattr(self, name), name)
        for name in ("vocab_size", "max_len", "n_classes", "d_ff"):
            if getattr(self, name) is not None:
                positive_int(getattr(self, name), name)
        optional_k(self.topk, "topk")
        optional_k(self.ff_k, "ff_k")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        for name, allowed in (("attention", ATTENTION), ("activation", tuple(ACTIVATIONS)), ("pool", POOL)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {getattr(self, name)!r}")
        if (self.vocab_size is None) != (self.max_len is None):
            raise ValueError("vocab_size and max_len go together: both set (token ids in) or both None (embeddings in)")


class SelfAttention(nn.Module):
    """Multi-head self-attention through :func:`topk_attention` (``topk=None``: exact).

    ``forward(x [B, L, D], mask [B, L] bool or None) -> [B, L, D]``; False in ``mask`` marks
    padding, which no query attends. Set :attr:`topk` to change k.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.n_heads, self.topk, self.chunk_size = config.n_heads, config.topk, config.chunk_size
        self.kind, self.causal = config.attention, config.causal
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.out = nn.Linear(config.d_model, config.d_model)

    def _attend(self, q, k, v, keys):
        if self.kind == "topk":
            return topk_attention(q, k, v, topk=self.topk, chunk_size=self.chunk_size, attn_mask=keys,
                                  is_causal=self.causal)
        if self.kind == "chunked":
            return chunked_attention(q, k, v, chunk_size=self.chunk_size, attn_mask=keys, is_causal=self.causal)
        if self.kind == "vanilla":
            return vanilla_attention(q, k, v, attn_mask=keys, is_causal=self.causal)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keys, is_causal=self.causal)

    def forward(self, x, mask=None):
        b, l, d = x.shape
        qkv = self.qkv(x).view(b, l, 3, self.n_heads, d // self.n_heads)  # [B, L, 3, H, dh]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, L, dh]
        keys = None if mask is None else mask[:, None, None, :]  # [B, 1, 1, L] True = real token
        o = self._attend(q, k, v, keys)  # [B, H, L, dh]
        return self.out(o.transpose(1, 2).reshape(b, l, d))  # [B, L, D]


class FeedForward(nn.Module):
    """``w_out(act(w_in(x)))``, or with ``ff_k`` the same layer through :func:`topk_feedforward`."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        d_ff = config.d_ff or 4 * config.d_model
        self.activation, self.ff_k, self.chunk_size = config.activation, config.ff_k, config.chunk_size
        self.w_in = nn.Linear(config.d_model, d_ff)
        self.w_out = nn.Linear(d_ff, config.d_model)

    def forward(self, x):
        if self.ff_k is None:
            return self.w_out(ACTIVATIONS[self.activation](self.w_in(x)))  # [B, L, D]
        return topk_feedforward(x, self.w_in.weight, self.w_out.weight, topk=self.ff_k, activation=self.activation,
                                b_in=self.w_in.bias, b_out=self.w_out.bias, chunk_size=self.chunk_size)  # [B, L, D]


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln1(x))``, then ``x + ff(ln2(x))``."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        # Registration order fixes parameters(), whose gradient norms clipping sums in this order.
        self.ln1, self.ln2 = nn.LayerNorm(config.d_model), nn.LayerNorm(config.d_model)
        self.attn = SelfAttention(config)
        self.ff = FeedForward(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, mask=None):
        x = x + self.drop(self.attn(self.ln1(x), mask))  # [B, L, D]
        return x + self.drop(self.ff(self.ln2(x)))  # [B, L, D]


class Transformer(nn.Module):
    """The blocks of ``config``, with embeddings and a classifier head where it asks for them.

    ``forward(x, mask=None)``: ``x`` is token ids ``[B, L]`` when ``config.vocab_size`` is set,
    else embeddings ``[B, L, D]``; ``mask [B, L]`` (bool, True = real token) keeps padding out
    of attention and of mean pooling. Returns logits ``[B, n_classes]`` when
    ``config.n_classes`` is set, else the hidden states ``[B, L, D]``.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        if config.vocab_size is not None:
            self.tok = nn.Embedding(config.vocab_size, d)
            self.pos = nn.Embedding(config.max_len, d)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        if config.n_classes is not None:
            self.ln = nn.LayerNorm(d)
            self.head = nn.Linear(d, config.n_classes)
        if config.init_std is not None:
            self.apply(self._init)

    def _init(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def topk(self):
        """Keys kept per query; setting it changes every layer (e.g. to test a swap)."""
        return self.blocks[0].attn.topk

    @topk.setter
    def topk(self, k):
        optional_k(k, "topk")
        for block in self.blocks:
            block.attn.topk = k

    def forward(self, x, mask=None):
        if self.config.vocab_size is not None:
            length = x.shape[1]
            if length > self.config.max_len:
                raise ValueError(f"ids: sequence length {length} exceeds max_len={self.config.max_len} "
                                 "of the position table")
            x = self.tok(x) + self.pos(torch.arange(length, device=x.device))  # [B, L, D]
        for block in self.blocks:
            x = block(x, mask)  # [B, L, D]
        if self.config.n_classes is None:
            return x
        x = self.ln(x)
        if self.config.pool == "cls":
            pooled = x[:, 0]  # [B, D]
        elif mask is None:
            pooled = x.mean(1)  # [B, D] every token is real
        else:
            w = mask.unsqueeze(-1).to(x.dtype)  # [B, L, 1]
            pooled = (x * w).sum(1) / w.sum(1).clamp(min=1.0)  # [B, D]
        return self.head(pooled)  # [B, n_classes]
