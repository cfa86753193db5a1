"""Drop-in top-k for pretrained transformers: ``use_topk`` (Gupta et al. 2021, sections 3.1-3.2).

The paper's claim is that top-k attention (and top-k feed-forward) can replace the
vanilla layers of a pretrained model without corrective training. This module makes
that switch for models from ``transformers`` 5.x, inside a context manager that leaves
the model exactly as it was on exit (also on exceptions), with no reload::

    with use_topk(model, attn_k=64, ff_k={0: 384, 1: 384}):
        logits = model(ids).logits

Attention goes through the transformers registry. One function is registered under
the name ``"topk_lab"`` in ``AttentionInterface`` together with its mask function in
``AttentionMaskInterface`` (``sdpa_mask``: boolean, True = may attend, which is our
kernel's polarity). Without the mask function transformers builds no mask for an
unknown implementation and the causal mask silently disappears. While the context is
active every config of the model reads ``_attn_implementation == "topk_lab"``; the
function looks up the per-head k of the calling module and runs
:func:`topk_lib.kernels.attention.topk_attention`. Modules with no k run PyTorch SDPA exactly as
``attn_implementation="sdpa"`` would. Key/value arrive un-repeated for grouped-query
attention (the kernel maps query head ``h`` to KV head ``h // (Hq // Hkv)``); T5's
relative position bias arrives as ``position_bias`` and becomes a float mask.

Feed-forward layers are switched by replacing the ``forward`` of the MLP module on the
instance (Llama-style ``gate_proj/up_proj/down_proj``, T5 ``DenseReluDense`` plain and
gated), or for BERT-style layers the ``intermediate`` forward plus an identity
``output.dense`` (BertOutput keeps its dropout, residual and LayerNorm), so the whole
``W_in -> f -> W_out`` product runs in :func:`topk_lib.kernels.feedforward.topk_feedforward`.

Layers are numbered by their position in the model's stacks of blocks (the outermost
``nn.ModuleList`` above each attention/MLP module): ``0 .. n-1`` for decoders and
encoders; for encoder-decoders the encoder's blocks come first, then the decoder's,
and a decoder block's self- and cross-attention share its layer number and k.
:func:`describe_layers` lists the mapping.

Not covered: dropout inside patched attention or MLPs is skipped (use in eval mode),
``output_attentions``, soft-capping and attention sinks raise or are ignored as noted.
"""

from __future__ import annotations

import contextlib
import inspect
import numbers
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from topk_lib.kernels.attention import topk_attention
from topk_lib.kernels.feedforward import ACTIVATIONS, topk_feedforward

__all__ = ["use_topk", "describe_layers", "register_attention", "LayerInfo", "ATTN_IMPLEMENTATION"]

#: The name under which the top-k attention function is registered in transformers.
ATTN_IMPLEMENTATION = "topk_lab"

# module -> per-query-head k (tuple) and chunk size; read by the registered function.
_SPECS: "weakref.WeakKeyDictionary[nn.Module, _AttnSpec]" = weakref.WeakKeyDictionary()
_MISSING = object()


@dataclass(frozen=True)
class _AttnSpec:
    ks: tuple  # one entry per query head: int k or None (exact)
    chunk_size: int


@dataclass
class LayerInfo:
    """One layer as ``use_topk`` numbers it."""

    layer: int
    block: str  # e.g. "model.layers.3", "decoder.block.1"
    attention: list = field(default_factory=list)  # names of modules that call the attention registry
    heads: int | None = None  # query heads
    mlp: str | None = None  # name of the feed-forward module that ff_k replaces
    d_ff: int | None = None


# --------------------------------------------------------------------------- registration


def _attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, position_bias=None, **kwargs
):
    """The registered attention function: ``query [B, Hq, Lq, d]``, ``key/value [B, Hkv, Lk, d]`` -> ``[B, Lq, Hq, dv]``."""
    spec = _SPECS.get(module)
    if spec is None:  # a layer the user did not name: exactly what attn_implementation="sdpa" does
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
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
    if kwargs.get("softcap") is not None:
        raise ValueError("use_topk: attention soft-capping (softcap) is not supported by the top-k kernel")
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise ValueError("use_topk: attention sinks are not supported by the top-k kernel")
    hq, lq, lk = query.shape[1], query.shape[2], key.shape[2]
    if hq != len(spec.ks):
        raise RuntimeError(
            f"use_topk: {type(module).__name__} has {hq} query heads at run time but {len(spec.ks)} were "
            "expected when patching; open a new use_topk context after changing the model"
        )
    # Same rule as transformers' SDPA integration: a None mask means causal for decoders
    # during prefill, and "attend to everything" for one decoding row or encoders.
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and lq > 1 and attention_mask is None
    if causal and lk > lq:
        # Prefill into an empty static cache: keys past Lq are unused slots (SDPA crops them too).
        key, value = key[:, :, :lq], value[:, :, :lq]  # [B, Hkv, Lq, d]
        position_bias = position_bias[..., :lq] if position_bias is not None else None
    mask = _compact_mask(attention_mask)
    if position_bias is not None:
        bias = position_bias.to(query.dtype)  # [1|B, H, Lq, Lk]
        if mask is None:
            mask = bias
        elif mask.dtype == torch.bool:
            mask = bias.masked_fill(~mask, float("-inf"))  # [B, H, Lq, Lk]
        else:
            mask = bias + mask.to(query.dtype)
    elif mask is not None and mask.is_floating_point():
        mask = mask.to(query.dtype)
    out = _per_head_groups(query, key, value, mask, spec, causal, scaling)  # [B, Hq, Lq, dv]
    return out.transpose(1, 2).contiguous(), None  # [B, Lq, Hq, dv]


def _compact_mask(mask):
    """Shrink broadcast (stride-0) dims of an expanded mask to size 1, so no copy is made."""
    if mask is None:
        return None
    for dim in range(mask.dim()):
        if mask.shape[dim] > 1 and mask.stride(dim) == 0:
            mask = mask.narrow(dim, 0, 1)
    return mask


def _per_head_groups(query, key, value, mask, spec, causal, scale):
    """Run the kernel once per distinct k over the heads that share it."""
    ks = spec.ks
    kw = dict(chunk_size=spec.chunk_size, is_causal=causal, scale=scale)
    if len(set(ks)) == 1:
        return topk_attention(query, key, value, topk=ks[0], attn_mask=mask, **kw)
    b, hq, lq, _ = query.shape
    g = hq // key.shape[1]
    out = query.new_empty(b, hq, lq, value.shape[-1])  # [B, Hq, Lq, dv]
    for k in dict.fromkeys(ks):  # distinct ks, in head order
        heads = torch.tensor([h for h, kh in enumerate(ks) if kh == k], device=query.device)
        kv_heads = heads // g  # the KV head each query head reads
        m = mask
        if m is not None and m.dim() >= 3 and m.shape[-3] > 1:
            m = m.index_select(-3, heads)  # [B, h, Lq, Lk]
        out[:, heads] = topk_attention(
            query.index_select(1, heads),  # [B, h, Lq, d]
            key.index_select(1, kv_heads),  # [B, h, Lk, d]
            value.index_select(1, kv_heads),  # [B, h, Lk, dv]
            topk=k,
            attn_mask=m,
            **kw,
        )
    return out


def register_attention(name, forward):
    """Register ``forward`` under ``name`` in transformers' attention registry, with SDPA's mask
    function beside it (without a mask function the causal mask silently disappears). Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if AttentionInterface._global_mapping.get(name) is not forward:
        AttentionInterface.register(name, forward)
    if AttentionMaskInterface._global_mapping.get(name) is not sdpa_mask:
        AttentionMaskInterface.register(name, sdpa_mask)


# --------------------------------------------------------------------------- discovery


def _calls_attention_registry(module):
    """True for modules whose forward dispatches through ``ALL_ATTENTION_FUNCTIONS``."""
    forward = inspect.unwrap(type(module).forward)
    code = getattr(forward, "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def _is_linear(m):
    return isinstance(m, nn.Linear)


def _mlp_kind(module):
    """Which feed-forward layout a module has, or None."""
    has = lambda *names: all(_is_linear(getattr(module, n, None)) for n in names)  # noqa: E731
    if has("gate_proj", "up_proj", "down_proj") and hasattr(module, "act_fn"):
        return "gated_llama"
    if has("wi_0", "wi_1", "wo") and hasattr(module, "act"):
        return "gated_t5"
    if has("wi", "wo") and hasattr(module, "act"):
        return "t5"
    inter, out = getattr(module, "intermediate", None), getattr(module, "output", None)
    if (
        inter is not None
        and out is not None
        and _is_linear(getattr(inter, "dense", None))
        and hasattr(inter, "intermediate_act_fn")
        and _is_linear(getattr(out, "dense", None))
    ):
        return "bert"
    return None


def _d_ff(module, kind):
    return {
        "gated_llama": lambda: module.up_proj.out_features,
        "gated_t5": lambda: module.wi_1.out_features,
        "t5": lambda: module.wi.out_features,
        "bert": lambda: module.intermediate.dense.out_features,
    }[kind]()


def _num_heads(module):
    for obj, attr in ((module, "num_heads"), (module, "n_heads"), (module, "num_attention_heads")):
        if isinstance(getattr(obj, attr, None), int):
            return getattr(obj, attr)
    config = getattr(module, "config", None)
    for attr in ("num_attention_heads", "num_heads", "n_head"):
        if isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    return None


def _block_of(model, name):
    """The outermost ``nn.ModuleList`` above ``name`` and the item index in it."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        if parts[i].isdigit() and isinstance(model.get_submodule(prefix), nn.ModuleList):
            return prefix, int(parts[i])
    return None, None


def _discover(model):
    """``(layers, attention, mlps)``: LayerInfo list, ``[(layer, name, module)]`` for attention and MLPs."""
    found = []  # (name, module, "attention" | mlp kind)
    for name, module in model.named_modules():
        if _calls_attention_registry(module):
            found.append((name, module, "attention"))
        elif (kind := _mlp_kind(module)) is not None:
            found.append((name, module, kind))
    offsets, slots = {}, {}  # stack -> first layer number; (stack, index) -> layer
    next_layer = 0
    for name, module, _ in found:
        stack, index = _block_of(model, name)
        if stack is None:  # no block list: each such module is a layer of its own
            stack, index, size = name, 0, 1
        else:
            size = len(model.get_submodule(stack))
        if stack not in offsets:
            offsets[stack] = next_layer
            next_layer += size
        slots[name] = (offsets[stack] + index, f"{stack}.{index}" if stack != name else name)
    layers = {}
    attention, mlps = [], []
    for name, module, kind in found:
        layer, block = slots[name]
        info = layers.setdefault(layer, LayerInfo(layer=layer, block=block))
        if kind == "attention":
            info.attention.append(name)
            if info.heads is None:
                info.heads = _num_heads(module)
            attention.append((layer, name, module))
        elif info.mlp is None:
            info.mlp, info.d_ff = name, _d_ff(module, kind)
            mlps.append((layer, name, module, kind))
    return [layers[i] for i in sorted(layers)], attention, mlps


def describe_layers(model):
    """How ``use_topk`` numbers the layers of ``model``: a list of :class:`LayerInfo`."""
    return _discover(model)[0]


# --------------------------------------------------------------------------- k specs


def _check_k(value, arg, where, *, allow_none=True):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{arg}{where} must be a positive int (or None for exact), got {value!r}")
    return int(value)


def _parse_spec(spec, arg, layers, *, per_head):
    """Normalise ``spec`` to ``{layer: k}`` or, with ``per_head``, ``{layer: {head|None: k}}``."""
    n = len(layers)
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        k = _check_k(spec, arg, "", allow_none=False)
        return {layer.layer: ({None: k} if per_head else k) for layer in layers}
    out = {}
    for key, value in spec.items():
        where = f"[{key!r}]"
        if isinstance(key, tuple):
            if not per_head:
                raise ValueError(f"{arg} takes {{layer: k}}; per-head keys like {key!r} are for attn_k only")
            if len(key) != 2:
                raise ValueError(f"{arg} keys must be a layer or a (layer, head) pair, got {key!r}")
            layer, head = key
        else:
            layer, head = key, None
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not 0 <= layer < n:
            raise ValueError(f"{arg}: layer {layer!r} is out of range; the model has layers 0..{n - 1}")
        layer = int(layer)
        k = _check_k(value, arg, where)
        if not per_head:
            out[layer] = k
            continue
        if head is not None:
            heads = layers[layer].heads
            if isinstance(head, bool) or not isinstance(head, numbers.Integral) or heads is None or not 0 <= head < heads:
                raise ValueError(
                    f"{arg}: head {head!r} is out of range for layer {layer}, which has heads 0..{(heads or 0) - 1}"
                )
            head = int(head)
        out.setdefault(layer, {})[head] = k
    return out


# --------------------------------------------------------------------------- feed-forward


def _activation_name(act, arg):
    """Match an activation module or function to one of the kernel's by probing it."""
    probe = torch.linspace(-8.0, 8.0, 4001, dtype=torch.float64)  # [P]
    with torch.no_grad():
        try:
            ref = act(probe)
        except Exception as err:  # noqa: BLE001 - any failure means "not a plain elementwise activation"
            raise ValueError(f"{arg}: cannot evaluate the MLP activation {act!r}: {err}") from err
        for name, fn in ACTIVATIONS.items():
            if torch.allclose(ref, fn(probe), atol=1e-6, rtol=0):
                return name
    raise ValueError(
        f"{arg}: the MLP activation {act!r} is none of {sorted(ACTIVATIONS)} supported by topk_feedforward"
    )


def _ff_forward(module, kind, k, chunk_size, arg):
    """The replacement forward for one MLP module (see the module docstring)."""
    if kind == "gated_llama":
        if module.gate_proj.bias is not None:
            raise ValueError(f"{arg}: gated MLPs with a bias on gate_proj are not supported by topk_feedforward")
        act = _activation_name(module.act_fn, arg)

        def forward(x):
            return topk_feedforward(
                x,
                module.up_proj.weight,
                module.down_proj.weight,
                topk=k,
                activation=act,
                w_gate=module.gate_proj.weight,
                select="magnitude",
                b_in=module.up_proj.bias,
                b_out=module.down_proj.bias,
                chunk_size=chunk_size,
            )

    elif kind == "gated_t5":
        act = _activation_name(module.act, arg)

        def forward(x):
            return topk_feedforward(
                x,
                module.wi_1.weight,
                module.wo.weight,
                topk=k,
                activation=act,
                w_gate=module.wi_0.weight,
                select="magnitude",
                chunk_size=chunk_size,
            )

    elif kind == "t5":
        act = _activation_name(module.act, arg)

        def forward(x):
            return topk_feedforward(
                x,
                module.wi.weight,
                module.wo.weight,
                topk=k,
                activation=act,
                select="value" if act == "relu" else "magnitude",
                chunk_size=chunk_size,
            )

    else:  # bert: intermediate computes the whole product, output.dense becomes the identity
        act = _activation_name(module.intermediate.intermediate_act_fn, arg)
        inter, dense_out = module.intermediate, module.output.dense

        def forward(x):
            return topk_feedforward(
                x,
                inter.dense.weight,
                dense_out.weight,
                topk=k,
                activation=act,
                select="value" if act == "relu" else "magnitude",
                b_in=inter.dense.bias,
                b_out=dense_out.bias,
                chunk_size=chunk_size,
            )

    return forward


def _identity(h):
    return h


# --------------------------------------------------------------------------- the context manager


class _Undo:
    """Records attribute and mapping changes and reverts them in reverse order."""

    def __init__(self):
        self._log = []

    def setattr(self, obj, name, value):
        old = obj.__dict__.get(name, _MISSING)
        self._log.append(("attr", obj, name, old))
        if value is _MISSING:
            obj.__dict__.pop(name, None)
        else:
            object.__setattr__(obj, name, value)  # instance attribute; bypasses nn.Module's registration

    def setspec(self, module, spec):
        self._log.append(("spec", module, None, _SPECS.get(module, _MISSING)))
        if spec is None:
            _SPECS.pop(module, None)
        else:
            _SPECS[module] = spec

    def revert(self):
        while self._log:
            kind, obj, name, old = self._log.pop()
            if kind == "attr":
                if old is _MISSING:
                    obj.__dict__.pop(name, None)
                else:
                    object.__setattr__(obj, name, old)
            elif old is _MISSING:
                _SPECS.pop(obj, None)
            else:
                _SPECS[obj] = old


def _configs(model):
    """Every distinct config object the model's modules read (T5 stacks hold deep copies)."""
    seen = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            seen[id(config)] = config
    return list(seen.values())


@contextlib.contextmanager
def use_topk(model, attn_k=None, ff_k=None, chunk_size=1024):
    """Switch ``model``'s attention and/or feed-forward layers to top-k inside a ``with`` block.

    ``attn_k``: None (attention unchanged), an int (every layer), ``{layer: k}`` or
    ``{(layer, head): k}`` (query head; the two kinds can be mixed, per-head entries win).
    ``ff_k``: None, an int or ``{layer: k}``. A dict value of None means exact/dense for
    that layer or head. ``k >= L`` (or ``>= d_ff``) is exact. Layers and heads not named
    keep what they had, so contexts nest: the inner one overrides what it names.
    ``chunk_size``: query rows (attention) and tokens (feed-forward) per chunk.
    The model is restored on exit, also when the block raises.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    chunk_size = int(chunk_size)
    layers, attention, mlps = _discover(model)
    if attn_k is not None and not attention:
        raise ValueError(
            f"attn_k: {type(model).__name__} has no attention modules that dispatch through the transformers "
            "attention registry (ALL_ATTENTION_FUNCTIONS), so use_topk cannot switch them"
        )
    if ff_k is not None and not mlps:
        raise ValueError(f"ff_k: found no supported feed-forward modules in {type(model).__name__}")
    attn_spec = _parse_spec(attn_k, "attn_k", layers, per_head=True)
    ff_spec = _parse_spec(ff_k, "ff_k", layers, per_head=False)
    for layer in attn_spec:
        if not layers[layer].attention:
            raise ValueError(f"attn_k: layer {layer} has no attention module that use_topk can switch")
    for layer in ff_spec:
        if layers[layer].mlp is None:
            raise ValueError(f"ff_k: layer {layer} has no supported feed-forward module")

    # Build every replacement before touching the model, so bad input leaves it untouched.
    new_specs = []
    for layer, name, module in attention:
        if layer not in attn_spec:
            continue
        heads = _num_heads(module)
        if heads is None:
            raise ValueError(f"attn_k: cannot tell how many query heads {name} ({type(module).__name__}) has")
        current = _SPECS.get(module)
        ks = list(current.ks) if current is not None and len(current.ks) == heads else [None] * heads
        entry = attn_spec[layer]
        if None in entry:  # whole-layer k first, per-head entries override it
            ks = [entry[None]] * heads
        for head, k in entry.items():
            if head is not None:
                if head >= heads:
                    raise ValueError(f"attn_k: head {head} is out of range for {name}, which has {heads} heads")
                ks[head] = k
        new_specs.append((module, None if all(k is None for k in ks) else _AttnSpec(tuple(ks), chunk_size)))
    new_ff = []
    for layer, name, module, kind in mlps:
        if layer not in ff_spec:
            continue
        k = ff_spec[layer]
        new_ff.append((module, kind, None if k is None else _ff_forward(module, kind, k, chunk_size, "ff_k")))

    undo = _Undo()
    try:
        if new_specs:
            register_attention(ATTN_IMPLEMENTATION, _attention_forward)
            for config in _configs(model):
                undo.setattr(config, "_attn_implementation_internal", ATTN_IMPLEMENTATION)
            for module, spec in new_specs:
                undo.setspec(module, spec)
        for module, kind, forward in new_ff:
            if kind == "bert":
                undo.setattr(module.intermediate, "forward", _MISSING if forward is None else forward)
                undo.setattr(module.output.dense, "forward", _MISSING if forward is None else _identity)
            else:
                undo.setattr(module, "forward", _MISSING if forward is None else forward)
        yield model
    finally:
        undo.revert()
