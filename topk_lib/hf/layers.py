"""How the suite numbers a transformers model's layers and finds their attention and feed-forward modules.

Layers are numbered by their position in the model's stacks of blocks (the outermost
``nn.ModuleList`` above each attention/MLP module): ``0 .. n-1`` for decoders and
encoders; for encoder-decoders the encoder's blocks come first, then the decoder's,
and a decoder block's self- and cross-attention share its layer number.

An attention module is one whose ``forward`` dispatches through transformers'
``ALL_ATTENTION_FUNCTIONS`` (so the registry in :mod:`topk_lib.hf.registry` can reach it).
A feed-forward module is one that matches an entry of :data:`topk_lib.hf.mlps.MLP_LAYOUTS`,
the table of where each supported MLP shape keeps its projections and its activation: plain
and gated MLP modules (Llama, T5, GPT-2's ``Conv1D``, GPT-NeoX, GPT-J, StarCoder2, Phi, ViT,
DistilBERT, fused Phi-3 and ModernBERT, Falcon-H1's multipliers, Gemma-3n's activation
sparsity), feed-forward parts on the block (BERT, OPT, BART/Whisper) and the routed experts of
mixture-of-experts layers (3D ``gate_up_proj/down_proj``) beside their shared experts. A layer
can hold several (a MoE layer's shared and routed experts). Modules that look like
feed-forward modules but match no entry are listed in ``dense_ff``, so ``ff_k`` can refuse
to leave them dense.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import NamedTuple

from torch import nn

from topk_lib.hf.mlps import MLP_LAYOUTS, MLPLayout, dense_ff_modules, match_layout

__all__ = ["LayerInfo", "MLPLayout", "MLP_LAYOUTS", "ModelLayers", "describe_layers", "find_layers", "num_heads"]


@dataclass
class LayerInfo:
    """One layer as ``use_topk`` numbers it."""

    layer: int
    block: str  # e.g. "model.layers.3", "decoder.block.1"
    attention: list = field(default_factory=list)  # names of modules that call the attention registry
    heads: int | None = None  # query heads
    mlp: str | None = None  # name of the (first) feed-forward module that ff_k replaces
    d_ff: int | None = None  # the widest of the layer's feed-forward modules (per expert for experts)
    mlps: dict = field(default_factory=dict)  # every feed-forward module ff_k switches: name -> how (layout)
    dense_ff: list = field(default_factory=list)  # "name (Class)" of feed-forward-like modules ff_k cannot switch


class ModelLayers(NamedTuple):
    """What :func:`find_layers` finds: the layers, and the modules in them with their layer number."""

    layers: list  # [LayerInfo], by layer number
    attention: list  # [(layer, name, module)]
    mlps: list  # [(layer, name, module, MLPLayout)]; a MoE layer has several
    dense_ff: list  # [(layer or None, name, module)] feed-forward-like modules no layout covers


def _calls_attention_registry(module):
    """True for modules whose forward dispatches through ``ALL_ATTENTION_FUNCTIONS``."""
    forward = inspect.unwrap(type(module).forward)
    code = getattr(forward, "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def num_heads(module):
    """Query heads of an attention module (from the module or its config), or None."""
    for attr in ("num_heads", "n_heads", "num_attention_heads"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
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


def find_layers(model) -> ModelLayers:
    """Every attention and feed-forward module of ``model`` with its layer number (see the module docstring)."""
    found = []  # (name, module, None for attention | MLPLayout)
    matched = []  # names of matched feed-forward modules: nothing inside one is matched again
    for name, module in model.named_modules():
        if _calls_attention_registry(module):
            found.append((name, module, None))
        elif not any(name.startswith(m + ".") for m in matched) and (layout := match_layout(module)) is not None:
            found.append((name, module, layout))
            matched.append(name)
    offsets, slots = {}, {}  # stack -> first layer number; name -> (layer, block)
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
    for name, module, layout in found:
        layer, block = slots[name]
        info = layers.setdefault(layer, LayerInfo(layer=layer, block=block))
        if layout is None:
            info.attention.append(name)
            if info.heads is None:
                info.heads = num_heads(module)
            attention.append((layer, name, module))
        else:
            d_ff = layout.d_ff(module)
            info.mlp = info.mlp or name
            info.d_ff = max(info.d_ff or 0, d_ff)
            info.mlps[name] = layout.description
            mlps.append((layer, name, module, layout))
    dense = []
    for name, module in dense_ff_modules(model, matched):
        stack, index = _block_of(model, name)
        layer = offsets[stack] + index if stack in offsets else None  # unnumbered outside the known stacks
        if layer in layers:
            layers[layer].dense_ff.append(f"{name} ({type(module).__name__})")
        dense.append((layer, name, module))
    return ModelLayers([layers[i] for i in sorted(layers)], attention, mlps, dense)


def describe_layers(model):
    """How ``use_topk`` numbers the layers of ``model``: a list of :class:`LayerInfo`."""
    return find_layers(model).layers
