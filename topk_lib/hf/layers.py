"""How the suite numbers a transformers model's layers and finds their attention and feed-forward modules.

Layers are numbered by their position in the model's stacks of blocks (the outermost
``nn.ModuleList`` above each attention/MLP module): ``0 .. n-1`` for decoders and
encoders; for encoder-decoders the encoder's blocks come first, then the decoder's,
and a decoder block's self- and cross-attention share its layer number.

An attention module is one whose ``forward`` dispatches through transformers'
``ALL_ATTENTION_FUNCTIONS`` (so the registry in :mod:`topk_lib.hf.registry` can reach it).
A feed-forward module is one that matches an entry of :data:`MLP_LAYOUTS`, the table of
where each supported layout keeps its projections and its activation.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import NamedTuple

from torch import nn

__all__ = ["LayerInfo", "MLPLayout", "MLP_LAYOUTS", "ModelLayers", "describe_layers", "find_layers", "num_heads"]


@dataclass
class LayerInfo:
    """One layer as ``use_topk`` numbers it."""

    layer: int
    block: str  # e.g. "model.layers.3", "decoder.block.1"
    attention: list = field(default_factory=list)  # names of modules that call the attention registry
    heads: int | None = None  # query heads
    mlp: str | None = None  # name of the feed-forward module that ff_k replaces
    d_ff: int | None = None


@dataclass(frozen=True)
class MLPLayout:
    """Where one feed-forward layout keeps its parts, as attribute paths inside the MLP module.

    ``w_in`` makes the hidden pre-activation (the "up" projection of a gated MLP), ``w_gate``
    the gate of a gated MLP, ``w_out`` maps the hidden activation ``h`` back (its input is
    ``h``). ``entry`` is the submodule whose ``forward`` a replacement takes over (``""``: the
    MLP itself); when it is not the whole MLP, the block still calls ``w_out`` after it, so a
    replacement that applies ``W_out`` itself makes ``w_out``'s forward the identity.
    """

    kind: str
    w_in: str
    w_out: str
    activation: str
    w_gate: str | None = None
    entry: str = ""

    def part(self, module, path):
        """The submodule or attribute at ``path`` (dotted) inside ``module``, or None."""
        for name in path.split("."):
            module = getattr(module, name, None)
        return module

    def matches(self, module):
        linears = [self.w_in, self.w_out] + ([self.w_gate] if self.w_gate else [])
        return all(isinstance(self.part(module, p), nn.Linear) for p in linears) and (
            self.part(module, self.activation) is not None
        )


#: Supported feed-forward layouts, tried in this order.
MLP_LAYOUTS = (
    # Llama-style SwiGLU/GeGLU: down(act(gate(x)) * up(x))
    MLPLayout("gated_llama", w_in="up_proj", w_gate="gate_proj", w_out="down_proj", activation="act_fn"),
    # T5 DenseGatedActDense: wo(act(wi_0(x)) * wi_1(x))
    MLPLayout("gated_t5", w_in="wi_1", w_gate="wi_0", w_out="wo", activation="act"),
    # T5 DenseReluDense: wo(act(wi(x)))
    MLPLayout("t5", w_in="wi", w_out="wo", activation="act"),
    # BERT: intermediate computes act(dense(x)); output.dense, dropout, residual and LayerNorm follow
    MLPLayout(
        "bert",
        w_in="intermediate.dense",
        w_out="output.dense",
        activation="intermediate.intermediate_act_fn",
        entry="intermediate",
    ),
)


class ModelLayers(NamedTuple):
    """What :func:`find_layers` finds: the layers, and the modules in them with their layer number."""

    layers: list  # [LayerInfo], by layer number
    attention: list  # [(layer, name, module)]
    mlps: list  # [(layer, name, module, MLPLayout)], one per layer at most


def _calls_attention_registry(module):
    """True for modules whose forward dispatches through ``ALL_ATTENTION_FUNCTIONS``."""
    forward = inspect.unwrap(type(module).forward)
    code = getattr(forward, "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def _mlp_layout(module):
    return next((layout for layout in MLP_LAYOUTS if layout.matches(module)), None)


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
    for name, module in model.named_modules():
        if _calls_attention_registry(module):
            found.append((name, module, None))
        elif (layout := _mlp_layout(module)) is not None:
            found.append((name, module, layout))
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
        elif info.mlp is None:
            info.mlp, info.d_ff = name, layout.part(module, layout.w_in).out_features
            mlps.append((layer, name, module, layout))
    return ModelLayers([layers[i] for i in sorted(layers)], attention, mlps)


def describe_layers(model):
    """How ``use_topk`` numbers the layers of ``model``: a list of :class:`LayerInfo`."""
    return find_layers(model).layers
