"""Drop-in top-k for pretrained transformers: ``use_topk`` (Gupta et al. 2021, sections 3.1-3.2).

The paper's claim is that top-k attention (and top-k feed-forward) can replace the
vanilla layers of a pretrained model without corrective training. This module makes
that switch for models from ``transformers`` 5.x, inside a context manager that leaves
the model exactly as it was on exit (also on exceptions), with no reload::

    with use_topk(model, attn_k=64, ff_k={0: 384, 1: 384}):
        logits = model(ids).logits

Both switches go through :func:`topk_lib.hf.registry.intercept`. Attention: while the
context is active every config of the model reads ``_attn_implementation == "topk_lab"``,
and each attention module given a k hands its calls to a handler that runs
:func:`topk_lib.kernels.attention.topk_attention` with that module's per-head k. Modules
with no k run exactly: PyTorch SDPA as ``attn_implementation="sdpa"`` would, or the suite's
exact kernel for soft-capped or sink calls (:func:`topk_lib.hf.registry.exact_attention`).
Key/value arrive un-repeated for grouped-query attention (the kernel maps query head ``h``
to KV head ``h // (Hq // Hkv)``); T5's relative position bias arrives as ``position_bias``
and becomes a float mask; Gemma-2's soft-capping (``softcap``) and attention sinks
(GPT-OSS's ``s_aux``, Inkling-2's ``sinks``) go to the kernel, which caps the scores before
the mask and the selection and adds the sink to each row's softmax denominator.

Feed-forward layers are switched by replacing the ``forward`` of one module of the MLP on
the instance (and making the parts the block calls after it the identity), as the layout
table :data:`topk_lib.hf.mlps.MLP_LAYOUTS` says, so the whole ``W_in -> f -> W_out`` product
runs in :func:`topk_lib.kernels.feedforward.topk_feedforward`; a MoE layer's routed experts
run it per expert and its shared experts are switched with it. Each replacement is checked
at switch-on against the module's own forward (:func:`topk_lib.hf.mlps.ff_forwards`), and a
layer that ``ff_k`` names but that holds a feed-forward module no layout covers is refused.

Layers are numbered as :func:`topk_lib.hf.layers.describe_layers` lists them; a decoder
block's self- and cross-attention share its layer number and k.

Not covered: the kernels apply no dropout, so in training mode attention dropout and dropout
inside a replaced MLP (T5's ``DenseReluDense.dropout``) are skipped, with one warning per
context that names it (use eval mode, or set that dropout to 0); ``output_attentions=True``
raises ``ValueError`` (the kernel forms no attention matrix:
:func:`topk_lib.analysis.capture.capture_attention_stats` measures the weights instead).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from topk_lib._validate import index, optional_k, positive_int
from topk_lib.hf.layers import find_layers, num_heads
from topk_lib.hf.mlps import ff_forwards
from topk_lib.hf.registry import attention_handler, exact_attention, intercept, logit_modifiers, prepare_call
from topk_lib.kernels.attention import topk_attention

__all__ = ["use_topk", "use_sparse", "ATTN_IMPLEMENTATION"]

#: The name under which the top-k attention function is registered in transformers.
ATTN_IMPLEMENTATION = "topk_lab"


# --------------------------------------------------------------------------- attention


class _WarnOnce:
    """A warning given at most once: one per ``use_topk`` context, however many layers and calls."""

    def __init__(self):
        self.given = False

    def __call__(self, message):
        if not self.given:
            self.given = True
            warnings.warn(message, UserWarning, stacklevel=3)


def _dropout_attribute(module, p):
    """The attribute of an attention module that holds its dropout probability ``p``, for messages."""
    for attr in ("attention_dropout", "dropout", "dropout_prob", "attn_dropout"):
        value = getattr(module, attr, None)
        if isinstance(value, nn.Dropout) and value.p == p:
            return f"{attr}.p"
        if isinstance(value, float) and value == p:
            return attr
    return "attention dropout"


def _refuse_weights_and_warn_dropout(handler, module, dropout, kwargs):
    """What every replacing handler does first: no attention weights to return; skipped dropout warned once."""
    if kwargs.get("output_attentions"):
        raise ValueError(
            "use_topk/use_sparse: output_attentions=True is not supported: the top-k kernel never forms the "
            "attention matrix, so there are no weights to return. Measure them with "
            "topk_lib.capture_attention_stats (kept mass, entropy, error per layer and head), or call the "
            "model without output_attentions"
        )
    if dropout:  # transformers passes the module's dropout only in training mode
        handler.skipped_dropout(
            f"use_topk/use_sparse: {handler.name or type(module).__name__} is in training mode with attention "
            f"dropout p={dropout} ({type(module).__name__}.{_dropout_attribute(module, dropout)}); the top-k kernel "
            "applies no dropout, so it is skipped in every patched layer (warned once per context). "
            "Call model.eval(), or set that dropout to 0 to train without it"
        )


@dataclass(frozen=True)
class _TopkAttention:
    """The attention handler of one module: top-k with one k (or None, exact) per query head."""

    ks: tuple  # one entry per query head: int k or None (exact)
    chunk_size: int
    name: str = ""  # the module's qualified name, for messages
    skipped_dropout: _WarnOnce = field(default_factory=_WarnOnce, compare=False)

    # The signature of transformers' sdpa_attention_forward (see topk_lib.hf.registry).
    def __call__(
        self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, position_bias=None,
        **kwargs,
    ):
        """``query [B, Hq, Lq, d]``, ``key/value [B, Hkv, Lk, d]`` -> ``([B, Lq, Hq, dv], None)``."""
        _refuse_weights_and_warn_dropout(self, module, dropout, kwargs)
        if query.shape[1] != len(self.ks):
            raise RuntimeError(
                f"use_topk: {type(module).__name__} has {query.shape[1]} query heads at run time but {len(self.ks)} "
                "were expected when patching; open a new use_topk context after changing the model"
            )
        call = prepare_call(
            module, query, key, value, attention_mask, is_causal=is_causal, position_bias=position_bias,
            dtype=query.dtype,
        )
        softcap, sinks = logit_modifiers(kwargs, query.dtype)
        out = self._per_head_groups(query, call, scaling, softcap, sinks)  # [B, Hq, Lq, dv]
        return out.transpose(1, 2).contiguous(), None  # [B, Lq, Hq, dv]

    def _per_head_groups(self, query, call, scale, softcap, sinks):
        """Run the kernel once per distinct k over the heads that share it (sinks ``[Hq]`` or ``[B, Hq, Lq, 1]``)."""
        ks, key, value, mask = self.ks, call.key, call.value, call.mask
        kw = dict(chunk_size=self.chunk_size, is_causal=call.causal, scale=scale, softcap=softcap)
        if len(set(ks)) == 1:
            return topk_attention(query, key, value, topk=ks[0], attn_mask=mask, sinks=sinks, **kw)
        b, hq, lq, _ = query.shape
        group = hq // key.shape[1]  # query heads per KV head
        out = query.new_empty(b, hq, lq, value.shape[-1])  # [B, Hq, Lq, dv]
        for k in dict.fromkeys(ks):  # distinct ks, in head order
            heads = torch.tensor([h for h, kh in enumerate(ks) if kh == k], device=query.device)
            kv_heads = heads // group  # the KV head each query head reads
            head_mask = mask
            if head_mask is not None and head_mask.dim() >= 3 and head_mask.shape[-3] > 1:
                head_mask = head_mask.index_select(-3, heads)  # [B, h, Lq, Lk]
            head_sinks, dim = sinks, (0 if sinks is None or sinks.dim() == 1 else -3)  # the heads' dim
            if head_sinks is not None and head_sinks.shape[dim] > 1:
                head_sinks = head_sinks.index_select(dim, heads)  # [h] or [B, h, Lq, 1]
            out[:, heads] = topk_attention(
                query.index_select(1, heads),  # [B, h, Lq, d]
                key.index_select(1, kv_heads),  # [B, h, Lk, d]
                value.index_select(1, kv_heads),  # [B, h, Lk, dv]
                topk=k,
                attn_mask=head_mask,
                sinks=head_sinks,
                **kw,
            )
        return out


# --------------------------------------------------------------------------- k specs


def _parse_spec(spec, arg, layers, *, per_head):
    """Normalise ``spec`` to ``{layer: k}`` or, with ``per_head``, ``{layer: {head|None: k}}``."""
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        k = positive_int(spec, arg)
        # An int is for the language model: towers of image-text models stay exact unless named.
        return {layer.layer: ({None: k} if per_head else k) for layer in layers if layer.tower is None}
    out = {}
    for key, value in spec.items():
        if isinstance(key, tuple):
            if not per_head:
                raise ValueError(f"{arg} takes {{layer: k}}; per-head keys like {key!r} are for attn_k only")
            if len(key) != 2:
                raise ValueError(f"{arg} keys must be a layer or a (layer, head) pair, got {key!r}")
            layer, head = key
        else:
            layer, head = key, None
        layer = index(layer, f"{arg} layer", len(layers), "layers")
        k = optional_k(value, f"{arg}[{key!r}]")
        if not per_head:
            out[layer] = k
            continue
        if head is not None:
            heads = layers[layer].heads
            if heads is None:
                raise ValueError(f"{arg}: layer {layer} has no known number of heads, so head {head!r} cannot be set")
            head = index(head, f"{arg} head of layer {layer}", heads, "heads")
        out.setdefault(layer, {})[head] = k
    return out


def _topk_handler(module, name, entry, chunk_size, skipped_dropout):
    """The handler for one attention module: ``entry`` ``{head|None: k}`` over what it had."""
    heads = num_heads(module)
    if heads is None:
        raise ValueError(f"attn_k: cannot tell how many query heads {name} ({type(module).__name__}) has")
    current = attention_handler(module, ATTN_IMPLEMENTATION)  # an enclosing use_topk's, or None
    ks = list(current.ks) if current is not None and len(current.ks) == heads else [None] * heads
    if None in entry:  # whole-layer k first, per-head entries override it
        ks = [entry[None]] * heads
    for head, k in entry.items():
        if head is not None:
            if head >= heads:
                raise ValueError(f"attn_k: head {head} is out of range for {name}, which has {heads} heads")
            ks[head] = k
    return None if all(k is None for k in ks) else _TopkAttention(tuple(ks), chunk_size, name, skipped_dropout)


# --------------------------------------------------------------------------- the context manager


@contextlib.contextmanager
def use_topk(model, attn_k=None, ff_k=None, chunk_size=1024):
    """Switch ``model``'s attention and/or feed-forward layers to top-k inside a ``with`` block.

    Arguments:
        model: a transformers model (``nn.Module``).
        attn_k: None (attention unchanged), an int (every layer; in image-text models every
            layer of the language model, the vision tower staying exact), ``{layer: k}`` or
            ``{(layer, head): k}`` (query head; the two kinds can be mixed, per-head entries win).
        ff_k: None, an int or ``{layer: k}``; a layer's k applies to every feed-forward module
            in it (a MoE layer's shared expert and each of its routed experts alike).
        chunk_size: query rows (attention) and tokens (feed-forward) per chunk.

    A dict value of None means exact/dense for that layer or head. ``k >= L`` (or ``>= d_ff``)
    is exact. Layers and heads not named keep what they had, so contexts nest: the inner one
    overrides what it names. The model is restored on exit, also when the block raises.
    Nested contexts (also the statistics captures) exit in the reverse order of entry; one
    that exits before the contexts opened inside it closes them too and raises a
    ``RuntimeError`` (:func:`topk_lib.hf.registry.intercept`), leaving the model restored.
    Inside the block, a forward with ``output_attentions=True`` raises ``ValueError`` (no
    attention matrix is formed), and in training mode the dropout the kernels skip is warned
    about once per context. ``ff_k`` raises ``ValueError`` before touching the model when a
    layer it names holds a feed-forward module of no supported shape (it would stay dense),
    or when a replacement at ``k = d_ff`` does not reproduce its module on a probe batch.

    Returns:
        A context manager that yields ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    chunk_size = positive_int(chunk_size, "chunk_size")
    found = find_layers(model)
    layers, attention, mlps = found.layers, found.attention, found.mlps
    if attn_k is not None and not attention:
        raise ValueError(
            f"attn_k: {type(model).__name__} has no attention modules that dispatch through the transformers "
            "attention registry (ALL_ATTENTION_FUNCTIONS), so use_topk cannot switch them"
        )
    if ff_k is not None and not mlps:
        dense = [f"{name} ({type(m).__name__})" for _, name, m in found.dense_ff]
        more = f" and {len(dense) - 3} more" if len(dense) > 3 else ""
        dense = f"; these are of no supported shape: {', '.join(dense[:3])}{more}" if dense else ""
        raise ValueError(f"ff_k: found no supported feed-forward modules in {type(model).__name__}{dense}")
    attn_spec = _parse_spec(attn_k, "attn_k", layers, per_head=True)
    ff_spec = _parse_spec(ff_k, "ff_k", layers, per_head=False)
    for layer in attn_spec:
        if not layers[layer].attention:
            raise ValueError(f"attn_k: layer {layer} has no attention module that use_topk can switch")
    for layer, k in ff_spec.items():
        if k is not None and layers[layer].dense_ff:
            raise ValueError(
                f"ff_k: layer {layer} has feed-forward modules of no supported shape, which would stay dense: "
                f"{', '.join(layers[layer].dense_ff)}; leave layer {layer} out of ff_k"
            )
        if layers[layer].mlp is None:
            raise ValueError(f"ff_k: layer {layer} has no supported feed-forward module")

    # Build every replacement before touching the model, so bad input leaves it untouched.
    attn_dropout, ff_dropout = _WarnOnce(), _WarnOnce()  # each skipped dropout is reported once per context
    handlers = {
        module: _topk_handler(module, name, attn_spec[layer], chunk_size, attn_dropout)
        for layer, name, module in attention
        if layer in attn_spec
    }
    forwards = {}
    for layer, name, module, layout in mlps:
        if layer in ff_spec:
            forwards.update(ff_forwards(module, layout, ff_spec[layer], chunk_size, "ff_k", name, ff_dropout))
    with intercept(model, name=ATTN_IMPLEMENTATION, attention=handlers, forwards=forwards):
        yield model


# --------------------------------------------------------------------------- any selector


@dataclass(frozen=True)
class _SparseAttention:
    """The attention handler of one module under :func:`use_sparse`: its layer's selector, or exact."""

    selector: object  # a topk_lib.selectors Selector (anything with .attend), or None: exact
    budget: int
    layer: int
    chunk_size: int
    name: str = ""
    observe: object = None
    log: object = None
    skipped_dropout: _WarnOnce = field(default_factory=_WarnOnce, compare=False)

    # The signature of transformers' sdpa_attention_forward (see topk_lib.hf.registry).
    def __call__(
        self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, position_bias=None,
        **kwargs,
    ):
        """``query [B, Hq, Lq, d]``, ``key/value [B, Hkv, Lk, d]`` -> ``([B, Lq, Hq, dv], None)``."""
        if self.selector is not None:
            _refuse_weights_and_warn_dropout(self, module, dropout, kwargs)
        call = prepare_call(
            module, query, key, value, attention_mask, is_causal=is_causal, position_bias=position_bias,
            dtype=query.dtype,
        )
        if self.observe is not None:
            self.observe(self.layer, query, call.key, call.value)
        if self.selector is None:
            return exact_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                   is_causal=is_causal, position_bias=position_bias, **kwargs)
        softcap, sinks = logit_modifiers(kwargs, query.dtype)
        out = self.selector.attend(
            query, call.key, call.value, budget=self.budget, layer=self.layer, attn_mask=call.mask,
            is_causal=call.causal, scale=scaling, chunk_size=self.chunk_size, softcap=softcap, sinks=sinks,
            log=self.log,
        )  # [B, Hq, Lq, dv]
        return out.transpose(1, 2).contiguous(), None  # [B, Lq, Hq, dv]


@contextlib.contextmanager
def use_sparse(model, selector, budget, *, layers=None, chunk_size=1024, observe=None, log=None):
    """Run ``selector`` in ``model``'s attention layers inside a ``with`` block, prefill and decoding alike.

    Arguments:
        model: a transformers model (``nn.Module``).
        selector: a :class:`topk_lib.selectors.base.Selector` (anything with its ``attend`` and
            ``reset`` methods); its state is reset on entry and on exit, and per layer at each
            prefill (a call whose queries are the whole sequence, as the first call of
            ``generate``).
        budget: keys per query, a positive int (the cap, for adaptive selectors).
        layers: None (every layer of the language model) or the layer numbers to switch (as
            :func:`topk_lib.hf.layers.describe_layers` numbers them); the others run exactly.
        chunk_size: query rows per chunk of the kernel.
        observe: None, or ``observe(layer, query [B, Hq, Lq, d], key [B, Hkv, Lk, d], value)``
            called with every attention call of every layer (switched or not), for analyses.
        log: None, or a :class:`topk_lib.selectors.base.SelectionLog` that counts the keys kept.

    The selector's calls go through the same interception as :func:`use_topk`
    (:func:`topk_lib.hf.registry.intercept`), so the model is restored on exit, also on
    exceptions, and contexts nest the same way. ``output_attentions=True`` raises in a
    switched layer.

    Returns:
        A context manager that yields ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    if not (callable(getattr(selector, "attend", None)) and callable(getattr(selector, "reset", None))):
        raise TypeError(f"selector must be a topk_lib.selectors Selector, got {type(selector).__name__}")
    budget, chunk_size = positive_int(budget, "budget"), positive_int(chunk_size, "chunk_size")
    found = find_layers(model)
    if not found.attention:
        raise ValueError(f"{type(model).__name__} has no attention modules that dispatch through the transformers "
                         "attention registry (ALL_ATTENTION_FUNCTIONS), so use_sparse cannot switch them")
    lm_layers = {info.layer for info in found.layers if info.tower is None and info.attention}
    chosen = lm_layers if layers is None else {index(l, "layers", len(found.layers), "layers") for l in layers}
    for layer in chosen - lm_layers:
        if not found.layers[layer].attention:
            raise ValueError(f"layers: layer {layer} has no attention module that use_sparse can switch")
    dropout = _WarnOnce()
    handlers = {
        module: _SparseAttention(selector if layer in chosen else None, budget, layer, chunk_size, name, observe, log,
                                 dropout)
        for layer, name, module in found.attention
        if layer in chosen or observe is not None
    }
    selector.reset()
    try:
        with intercept(model, name=ATTN_IMPLEMENTATION, attention=handlers):
            yield model
    finally:
        selector.reset()
