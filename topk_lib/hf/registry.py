"""One way into a transformers model's attention and MLP calls: the :func:`intercept` context manager.

Everything in the suite that changes what a model computes, or watches what it computes,
goes through :func:`intercept`: top-k attention and feed-forward layers
(:func:`topk_lib.hf.patching.use_topk`), the attention and MLP statistics capture, and the
recording of queries, keys and values. It changes the model only for the ``with`` block
and undoes exactly its own changes in ``finally``, in reverse order, so intercepts nest
like a stack and an exception anywhere leaves the model as it was::

    with intercept(model, name="topk_lab", attention={module: handler}):
        model(ids)   # module's attention calls go to handler; every other module runs exactly

Attention goes through the transformers registry (``integrations/sdpa_attention.py`` is
the model: one registered function with a fixed signature, thin per-call code, and the
call-preparation rules in one place, :func:`prepare_call`). While an intercept with
``attention`` is active, a routing function is registered under ``name`` in
``AttentionInterface`` with ``sdpa_mask`` beside it in ``AttentionMaskInterface``, every
config of the model reads ``_attn_implementation == name``, and each attention module's
call is handed to the handler the intercept gave that module; modules without one run
PyTorch SDPA exactly as ``attn_implementation="sdpa"`` would, or, for calls with
soft-capping or attention sinks (which SDPA refuses or drops), the suite's exact kernel
(:func:`exact_attention`). Before either sees a call, selection indices that
sparse-attention models pass instead of masking under a name other than "eager"/"sdpa"
(DeepSeek-V3.2's ``indices``) become the mask those names would get, and an unknown tensor
keyword raises (:mod:`topk_lib.hf.call_kwargs`). The handlers live on the
modules themselves (an instance attribute keyed by ``name``), set and restored by the
intercept: there is no table of active modules outside the model.

Intercepts restore like a stack, so they must exit in the reverse order of entry (a ``with``
statement or an ``ExitStack`` does). One that exits while intercepts entered after it that
changed the same objects are still open (manual ``__exit__`` calls, two ``ExitStack`` closed
in the order they were opened) closes those first, newest first, so the model is restored
at once and stays restored when they exit later; then it raises a ``RuntimeError`` saying
so (a warning, when the block is already raising, so that its exception goes on).

This is the only module that touches private transformers attributes (the configs'
``_attn_implementation_internal``); each place says why.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from typing import NamedTuple

import torch

from topk_lib.hf.call_kwargs import resolve_selection
from topk_lib.kernels.attention import chunked_attention

__all__ = ["intercept", "attention_handler", "exact_attention", "logit_modifiers", "prepare_call", "PreparedCall"]

_MISSING = object()
# Instance attribute of an attention module: {implementation name: handler}. A fresh dict
# replaces it on every change, so restoring the old dict restores exactly what was there.
_HANDLERS = "_topk_lab_attention_handlers"


# --------------------------------------------------------------------------- the registered function


def logit_modifiers(kwargs, dtype):
    """``(softcap, sinks)`` of an attention call: Gemma-2's ``softcap`` and the sink logits, or Nones.

    Sinks arrive as ``s_aux`` (GPT-OSS, DeepSeek-V4, MiMo-V2: one per query head ``[Hq]``) or
    ``sinks`` (Inkling-2: ``[B, Hq, Lq, 1]``); they are cast to ``dtype``, the query dtype the
    kernels want (DeepSeek-V4 keeps them in float32).
    """
    sinks = kwargs.get("s_aux")
    sinks = kwargs.get("sinks") if sinks is None else sinks
    return kwargs.get("softcap"), None if sinks is None else sinks.to(dtype)


def exact_attention(module, query, key, value, attention_mask, **kwargs):
    """What the model computes exactly: transformers' ``sdpa_attention_forward``, or the suite's kernel.

    Calls with soft-capping or attention sinks run
    :func:`topk_lib.kernels.attention.chunked_attention` with them, since the SDPA function
    refuses ``softcap`` and silently drops ``s_aux``; the kernel applies no dropout, so a
    training-mode dropout is warned about. Every other call runs SDPA as
    ``attn_implementation="sdpa"`` would.
    """
    softcap, sinks = logit_modifiers(kwargs, query.dtype)
    if softcap is None and sinks is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if kwargs.get("dropout"):
        warnings.warn(
            f"{type(module).__name__} is in training mode with attention dropout p={kwargs['dropout']}; its exact "
            "attention (soft-capped or with sinks) runs the suite's kernel, which applies no dropout, so it is "
            "skipped. Call model.eval(), or set that dropout to 0",
            UserWarning,
            stacklevel=3,
        )
    call = prepare_call(
        module, query, key, value, attention_mask, is_causal=kwargs.get("is_causal"),
        position_bias=kwargs.get("position_bias"), dtype=query.dtype,
    )
    out = chunked_attention(
        query, call.key, call.value, attn_mask=call.mask, is_causal=call.causal, scale=kwargs.get("scaling"),
        softcap=softcap, sinks=sinks,
    )  # [B, Hq, Lq, dv]
    return out.transpose(1, 2).contiguous(), None


def attention_handler(module, name):
    """The handler an active intercept under ``name`` gave ``module``, or None (exact attention)."""
    return module.__dict__.get(_HANDLERS, {}).get(name)


def _routing_forward(name):
    """The function registered under ``name``: hands each call to the calling module's handler."""

    # The signature of transformers' sdpa_attention_forward. Every attention module looks its
    # function up in ALL_ATTENTION_FUNCTIONS by config._attn_implementation and calls it as
    # (self, query, key, value, attention_mask, dropout=..., scaling=..., **kwargs), with query
    # [B, Hq, Lq, d] and key/value [B, Hkv, Lk, d] not repeated for grouped-query attention, and
    # expects (output [B, Lq, Hq, dv], weights or None) back.
    def forward(
        module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, position_bias=None,
        **kwargs,
    ):
        # Selection indices become the mask the model builds for eager/SDPA, before either path sees
        # the call; an unknown tensor keyword raises (see topk_lib.hf.call_kwargs).
        attention_mask, kwargs = resolve_selection(module, query, key, attention_mask, is_causal, kwargs)
        handler = attention_handler(module, name)
        if handler is None:
            handler = exact_attention
        return handler(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            position_bias=position_bias,
            **kwargs,
        )

    forward.routes = name  # marks the function, so registering again is a no-op
    return forward


def _register(name):
    """Register the routing function and ``sdpa_mask`` under ``name`` unless they already are.

    Without a mask function transformers builds no mask for an unknown implementation and
    the causal and padding masks silently disappear; ``sdpa_mask`` gives a bool mask
    (True = may attend), or None where SDPA's own ``is_causal`` rule covers it.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if getattr(ALL_ATTENTION_FUNCTIONS.get(name), "routes", None) != name:
        AttentionInterface.register(name, _routing_forward(name))
    if ALL_MASK_ATTENTION_FUNCTIONS.get(name) is not sdpa_mask:
        AttentionMaskInterface.register(name, sdpa_mask)


# --------------------------------------------------------------------------- preparing a call


class PreparedCall(NamedTuple):
    """An attention call after :func:`prepare_call`: what a kernel needs besides the queries."""

    key: torch.Tensor  # [B, Hkv, Lk, d]
    value: torch.Tensor  # [B, Hkv, Lk, dv]
    mask: torch.Tensor | None  # bool (True = may attend) or float (added to the scores), [B|1, H|1, Lq, Lk]
    causal: bool  # query i sits at Lk - Lq + i and attends keys at positions <= its own


def _compact_mask(mask):
    """Shrink broadcast (stride-0) dims of an expanded mask to size 1, so no copy is made."""
    if mask is None:
        return None
    for dim in range(mask.dim()):
        if mask.shape[dim] > 1 and mask.stride(dim) == 0:
            mask = mask.narrow(dim, 0, 1)
    return mask


def prepare_call(module, query, key, value, attention_mask, *, is_causal, position_bias, dtype) -> PreparedCall:
    """The rules of transformers' ``sdpa_attention_forward`` for turning a registry call into a kernel call.

    ``dtype`` is the dtype of the float mask handed to the kernel.
    """
    lq, lk = query.shape[2], key.shape[2]
    # A None mask means causal for decoders during prefill, and "attend to everything" for one
    # decoding row or for encoders; the is_causal argument overrides the module's attribute.
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and lq > 1 and attention_mask is None
    if causal and lk > lq:
        # Prefill into an empty static cache: keys past Lq are unused slots (SDPA crops them too).
        key, value = key[:, :, :lq], value[:, :, :lq]  # [B, Hkv, Lq, d]
        position_bias = position_bias[..., :lq] if position_bias is not None else None
    mask = _compact_mask(attention_mask)
    if position_bias is not None:  # T5: the relative position bias is part of the scores
        bias = position_bias.to(dtype)  # [1|B, H, Lq, Lk]
        if mask is None:
            mask = bias
        elif mask.dtype == torch.bool:
            mask = torch.where(mask, bias, -math.inf)  # [B, H, Lq, Lk]
        else:
            mask = bias + mask.to(dtype)
    elif mask is not None and mask.is_floating_point():
        mask = mask.to(dtype)
    return PreparedCall(key, value, mask, causal)


# --------------------------------------------------------------------------- the context manager


def _configs(model):
    """Every distinct config object the model's modules read (T5 stacks hold deep copies).

    A config is recognised by ``_attn_implementation_internal``, the attribute behind the
    ``_attn_implementation`` property that attention modules and mask builders read.
    """
    seen = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            seen[id(config)] = config
    return list(seen.values())


class _Changes:
    """What one intercept changed, undone in reverse order, and the ids of the objects it changed."""

    def __init__(self):
        self._undo = []
        self.touched = set()  # ids of the objects whose attributes were set (alive: the undo steps hold them)

    def set_attribute(self, obj, name, value):
        """Set (or with ``_MISSING`` remove) an instance attribute, bypassing ``nn.Module``'s registration."""
        old = obj.__dict__.get(name, _MISSING)
        self._undo.append(lambda: _put(obj, name, old))
        self.touched.add(id(obj))
        _put(obj, name, value)

    def on_undo(self, undo):
        self._undo.append(undo)

    def undo(self):
        while self._undo:
            self._undo.pop()()


def _put(obj, name, value):
    if value is _MISSING:
        obj.__dict__.pop(name, None)
    else:
        object.__setattr__(obj, name, value)


# The open intercepts' changes, oldest first. Each restores what it found on entry, which is
# right only while no later intercept that changed the same objects is still open.
_OPEN: list[_Changes] = []
_OPEN_LOCK = threading.Lock()


def _close(changes):
    """Undo ``changes``, and first every later open intercept that depends on it; returns how many of those.

    A later intercept depends on ``changes`` when it changed one of its objects, or one of an
    intercept that does. An intercept closed that way finds nothing to undo when it exits.
    """
    with _OPEN_LOCK:
        if not any(c is changes for c in _OPEN):
            return 0
        start = next(i for i, c in enumerate(_OPEN) if c is changes)
        closing, touched = [changes], set(changes.touched)
        for later in _OPEN[start + 1 :]:
            if later.touched & touched:
                closing.append(later)
                touched |= later.touched
        for c in reversed(closing):  # newest first: each puts back what it found
            c.undo()
        _OPEN[:] = [c for c in _OPEN if all(c is not x for x in closing)]
    return len(closing) - 1


def _out_of_order(model, n_inner):
    return (
        f"a context on {type(model).__name__} (use_topk, a statistics capture, record_qkv) exited before "
        f"{n_inner} context(s) entered after it on the same model; those were closed with it, so the model "
        "is back to its state before this context. Nested contexts must exit in the reverse order of entry "
        "(a with statement or one ExitStack does that)"
    )


@contextlib.contextmanager
def intercept(model, *, name=None, attention=None, forwards=None, pre_hooks=None):
    """Route ``model``'s calls for the ``with`` block; everything is restored on exit, also on exceptions.

    Arguments:
        model: a transformers ``nn.Module``.
        name: the attention implementation name to register and switch the model's configs to
            (needed with ``attention``).
        attention: ``{attention module: handler or None}``. A handler has the signature of
            transformers' ``sdpa_attention_forward`` (``module, query [B, Hq, Lq, d], key/value
            [B, Hkv, Lk, d], attention_mask, *, dropout, scaling, is_causal, position_bias,
            **kwargs``) and returns ``(output [B, Lq, Hq, dv], weights or None)``; None runs
            :func:`exact_attention`. Modules not named keep the handler an enclosing intercept
            under the same name gave them, or run :func:`exact_attention`.
        forwards: ``{module: forward or None}``: an instance ``forward`` that replaces the
            class's (None removes an instance ``forward``, so the class's runs).
        pre_hooks: ``{module: hook}``: forward pre-hooks (``hook(module, args)``), removed on exit.

    Returns:
        A context manager that yields ``model``.

    Raises:
        RuntimeError: on exit, when intercepts entered after this one on the same objects are
            still open (they are closed with it first; see the module docstring).
    """
    attention, forwards, pre_hooks = dict(attention or {}), dict(forwards or {}), dict(pre_hooks or {})
    if attention and not name:
        raise ValueError("intercept: attention handlers need the implementation name to register them under")
    changes = _Changes()
    with _OPEN_LOCK:
        _OPEN.append(changes)
    try:
        if attention:
            _register(name)
            # Every config the modules read is switched through the attribute behind the
            # _attn_implementation property, the one PreTrainedModel.set_attn_implementation
            # writes too; the public setter also checks the name and recurses into sub-configs,
            # which a restore would have to mirror, so the attribute is saved and put back as is.
            for config in _configs(model):
                changes.set_attribute(config, "_attn_implementation_internal", name)
            for module, handler in attention.items():
                changes.set_attribute(module, _HANDLERS, {**module.__dict__.get(_HANDLERS, {}), name: handler})
        for module, forward in forwards.items():
            changes.set_attribute(module, "forward", _MISSING if forward is None else forward)
        for module, hook in pre_hooks.items():
            changes.on_undo(module.register_forward_pre_hook(hook).remove)
        yield model
    except BaseException:
        n_inner = _close(changes)
        if n_inner:  # the block's own exception goes on; the misuse is reported beside it
            warnings.warn(_out_of_order(model, n_inner), RuntimeWarning, stacklevel=2)
        raise
    n_inner = _close(changes)
    if n_inner:
        raise RuntimeError(_out_of_order(model, n_inner))
