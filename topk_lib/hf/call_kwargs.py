"""What the keyword arguments of an attention call mean, and which of them the suite must act on.

Every attention module calls its registry function as ``(module, query, key, value,
attention_mask, dropout=..., scaling=..., **kwargs)``; the extra keywords differ by model.
A scan of the calls in every transformers 5.24 modeling file (and of every
``eager_attention_forward``, which reads no keyword beyond its own parameters) sorts them:

* Handled by the suite: ``dropout``, ``scaling``, ``is_causal``, ``position_bias`` (T5
  family: a float mask), ``output_attentions`` (the top-k handler refuses it),
  ``softcap``, ``s_aux`` and ``sinks`` (passed on to the kernel), and the selection indices
  below.
* Selection indices, turned here into the mask the model builds itself for "eager"/"sdpa"
  (those models fold their selection into the mask only for those two names, and pass the
  indices instead under any other, for FlashMLA-style kernels):

  - ``indices``, int ``[B, Lq, n]`` key positions (or ``[B, H, Lq, n]``; entries < 0 or
    >= Lk mean "none"): DeepSeek-V3.2, GLM-MoE-DSA, Mistral-Large-4, HY-V4 (+VL), dots3,
    AXK2. The keys not named are masked out of ``attention_mask``, so the top-k kernel
    then selects within the model's own selection.
  - ``block_indices``, ``[B, H_idx, Lq, n]`` key blocks (MiniMax-M3-VL): the mask comes
    from the module's own ``indexer.build_block_mask``.

* Known harmless (the mask already says what they say, or only flash kernels read them):
  ``sliding_window`` (the mask carries the window), ``cu_seq_lens_q/k``,
  ``max_length_q/k``, ``seq_idx``, ``position_ids``, ``cache_position`` (packed
  sequences: the mask carries the packing), ``deterministic``, ``use_cache``,
  ``output_hidden_states``, ``output_router_logits``, ``num_items_in_batch``, ``query``/
  ``key``/``value``/``attention_mask`` passed by name.
* Anything else that arrives as a tensor raises ``ValueError`` naming it and the module's
  class: a tensor handed to the attention function is data some kernel consumes (as the
  indices above are), and dropping it would be silently wrong. Other non-tensor values
  (flags, ints, None) pass.
"""

from __future__ import annotations

import torch

__all__ = ["HANDLED", "HARMLESS", "SELECTION", "resolve_selection"]

#: Keywords the suite's handler or exact fallback acts on.
HANDLED = frozenset(
    {"dropout", "scaling", "is_causal", "position_bias", "output_attentions", "softcap", "s_aux", "sinks"}
)
#: Keywords carrying a selection that becomes part of the mask (see the module docstring).
SELECTION = frozenset({"indices", "block_indices"})
#: Tensor keywords known to change nothing the mask does not already say.
HARMLESS = frozenset(
    {"position_ids", "cache_position", "cu_seq_lens_q", "cu_seq_lens_k", "seq_idx", "max_length_q", "max_length_k"}
)


def _causal_keep(lq, lk, device):
    """SDPA's ``is_causal`` rule (upper-left aligned), as a bool mask [Lq, Lk] (True = may attend)."""
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril()


def _intersect(attention_mask, keep, dtype):
    """``attention_mask`` with the keys outside ``keep`` (bool, True = selected) masked, as the models do it."""
    if attention_mask.dtype == torch.bool:
        return attention_mask & keep
    return torch.where(keep, attention_mask, torch.finfo(dtype).min)  # broadcasts a [1, ...] mask too


def _indices_mask(module, indices, query, key, attention_mask, is_causal):
    """The mask a DSA model builds from its indexer's ``indices`` for eager/SDPA."""
    name = type(module).__name__
    b, _, lq, _ = query.shape
    lk = key.shape[2]
    if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.dim() not in (3, 4):
        raise ValueError(
            f"use_topk: {name} passes indices= to its attention function in a form the suite cannot turn into a "
            f"mask (expected integer key positions [B, Lq, n] or [B, H, Lq, n], got "
            f"{getattr(indices, 'shape', type(indices).__name__)})"
        )
    if indices.dim() == 3:
        indices = indices.unsqueeze(1)  # [B, 1, Lq, n]
    if indices.shape[-2] != lq or indices.shape[0] not in (1, b):
        raise ValueError(
            f"use_topk: {name} passes indices of shape {tuple(indices.shape)} for queries of shape "
            f"{tuple(query.shape)}; expected [B, Lq, n] key positions with B={b}, Lq={lq}"
        )
    indices = indices.long()
    # Entries outside [0, Lk) land in a throwaway last column, so they cannot overwrite a real one.
    slots = indices.masked_fill((indices < 0) | (indices >= lk), lk)
    keep = torch.zeros(*indices.shape[:-1], lk + 1, dtype=torch.bool, device=indices.device)
    keep = keep.scatter_(-1, slots, True)[..., :lk]  # [B, H|1, Lq, Lk]
    if attention_mask is not None:
        return _intersect(attention_mask, keep, query.dtype)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if causal and lq > 1:  # the None mask stood for SDPA's causal rule, which a mask now replaces
        keep = keep & _causal_keep(lq, lk, keep.device)
    return keep


def _block_indices_mask(module, block_indices, query, key, attention_mask, position_ids):
    """The mask a block-sparse model (MiniMax-M3) builds with its own indexer for eager/SDPA."""
    build = getattr(getattr(module, "indexer", None), "build_block_mask", None)
    if build is None:
        raise ValueError(
            f"use_topk: {type(module).__name__} passes block_indices= to its attention function but has no "
            "indexer.build_block_mask to turn them into a mask, so the suite cannot honour its block selection"
        )
    lq, lk = query.shape[2], key.shape[2]
    if position_ids is None:  # what the module itself assumes: the queries are the last Lq positions
        position_ids = torch.arange(lk - lq, lk, device=query.device)
    position_ids = (position_ids if position_ids.ndim > 1 else position_ids.unsqueeze(0)).expand(query.shape[0], -1)
    return build(block_indices, attention_mask, lk, query.dtype, query.device, position_ids)


def resolve_selection(module, query, key, attention_mask, is_causal, kwargs):
    """Fold selection keywords into the mask and refuse unknown tensor keywords.

    Returns ``(attention_mask, kwargs)`` with ``indices``/``block_indices`` removed from
    ``kwargs`` and applied to the mask (see the module docstring).

    Raises:
        ValueError: for selection indices in a form the suite cannot honour, and for any
            tensor keyword the scan did not classify, naming it and the module's class.
    """
    unknown = [
        k for k, v in kwargs.items()
        if isinstance(v, torch.Tensor) and k not in HANDLED | SELECTION | HARMLESS
    ]
    if unknown:
        raise ValueError(
            f"use_topk: {type(module).__name__} passes {', '.join(f'{k}=' for k in unknown)} (a tensor) to its "
            "attention function, which the suite does not know; it refuses rather than drop it, since under "
            "another implementation name than eager/sdpa a model may hand over as a tensor what it would otherwise "
            "have put into the mask. Teach topk_lib.hf.call_kwargs what it means, or use the model without use_topk"
        )
    rest = {k: v for k, v in kwargs.items() if k not in SELECTION}
    if kwargs.get("indices") is not None:
        attention_mask = _indices_mask(module, kwargs["indices"], query, key, attention_mask, is_causal)
    if kwargs.get("block_indices") is not None:
        attention_mask = _block_indices_mask(
            module, kwargs["block_indices"], query, key, attention_mask, kwargs.get("position_ids")
        )
    return attention_mask, rest
