"""How the suite numbers a transformers model's layers and finds their attention and feed-forward modules.

Layers are numbered by their position in the model's stacks of blocks (the outermost
``nn.ModuleList`` above each attention/MLP module): ``0 .. n-1`` for decoders and
encoders; for encoder-decoders the encoder's blocks come first, then the decoder's,
and a decoder block's self- and cross-attention share its layer number.

Image-text models (Gemma-3 4B+, LLaVA-likes, Qwen2-VL: a config with a ``text_config`` and
a model that generates text; not dual encoders like CLIP) number their language model's
layers first, ``0 .. n-1`` as the model card counts them; the layers of the other parts
(the vision tower, an audio tower) come after, ``n ..``, with :attr:`LayerInfo.tower`
naming the part. An int ``attn_k``/``ff_k`` switches only the language model's layers, so
the towers stay exact unless a dict names their layer numbers.

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

__all__ = [
    "LayerInfo", "LayerList", "MLPLayout", "MLP_LAYOUTS", "ModelLayers", "describe_layers", "find_layers",
    "language_model", "mlp_line", "num_heads",
]


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
    tower: str | None = None  # e.g. "model.vision_tower": outside the language model, exact unless named
    switches: dict = field(default_factory=dict)  # module name -> how use_topk switches it (describe_layers)


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


def _generates_text(model, config):
    """An image-text model (transformers' image-text-to-text table) or any model with a language-model head.

    Dual encoders (CLIP, SigLIP) have a ``text_config`` too, but their text and vision
    encoders are peers: they keep the plain numbering.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if getattr(config, "model_type", None) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return True
    head = getattr(model, "get_output_embeddings", None)
    try:
        return callable(head) and head() is not None
    except (AttributeError, NotImplementedError):
        return False


def language_model(model):
    """Qualified name of the language model inside an image-text model, or None.

    An image-text model is one with a ``text_config`` that generates text (see
    :func:`_generates_text`); its language model is the outermost module that reads the text
    config itself (``model.language_model`` in Gemma-3, LLaVA, Qwen2-VL), else what
    ``get_decoder()`` returns.
    """
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None)
    if text is None or text is config or not _generates_text(model, config):
        return None
    names = {id(m): n for n, m in model.named_modules()}
    for name, module in model.named_modules():
        if name and getattr(module, "config", None) is text:
            return name
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return names.get(id(decoder)) or None


def _tower_of(name, lm):
    """The outermost module above ``name`` that does not contain the language model ``lm``."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if not (lm == prefix or lm.startswith(prefix + ".")):
            return prefix
    return name


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
    lm = language_model(model)
    towers = {}  # name -> tower, for the modules outside the language model
    if lm is not None:
        towers = {name: _tower_of(name, lm) for name, _, _ in found if not name.startswith(lm + ".")}
        found.sort(key=lambda item: item[0] in towers)  # stable: the language model's modules first
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
        info = layers.setdefault(layer, LayerInfo(layer=layer, block=block, tower=towers.get(name)))
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


# --------------------------------------------------------------------------- description


class LayerList(list):
    """:func:`describe_layers`'s answer: a list of :class:`LayerInfo` that prints as a table.

    The list holds the layers an int ``attn_k``/``ff_k`` switches (all of them, except in
    image-text models, where those of the language model); ``towers`` holds the layers of the
    other parts (a vision tower), exact unless a dict names them. ``str()`` and
    :meth:`table` list every layer with its modules and how ``use_topk`` switches each.
    """

    def __init__(self, layers, towers=(), title=""):
        super().__init__(layers)
        self.towers = list(towers)
        self.title = title

    def table(self):
        lines, rows = [self.title], []
        for info in [*self, *self.towers]:
            where = f"   [{info.tower}: exact unless named]" if info.tower else ""
            rows.append((f"layer {info.layer:<3} {info.block}{where}", None))
            for name, how in info.switches.items():
                rows.append((name[len(info.block) + 1 :] if name.startswith(info.block + ".") else name, how))
        width = max([len(short) for short, how in rows if how is not None] + [0])
        lines += [short if how is None else f"    {short:<{width}}  {how}" for short, how in rows]
        return "\n".join(lines)

    def __str__(self):
        return self.table()


def _kv_heads(module, heads):
    for attr in ("num_key_value_heads", "num_kv_heads"):
        for owner in (module, getattr(module, "config", None)):
            if isinstance(getattr(owner, attr, None), int):
                return getattr(owner, attr)
    groups = getattr(module, "num_key_value_groups", None)
    return heads // groups if isinstance(groups, int) and heads else heads


def _attention_line(name, module, info):
    """``"Class, H query / Hkv KV heads, <features> -> how use_topk runs it"``."""
    heads = num_heads(module)
    parts = [type(module).__name__, f"{heads} query / {_kv_heads(module, heads)} KV heads"]
    config = getattr(module, "config", None)
    window = getattr(module, "sliding_window", None)
    if isinstance(window, int) and window > 0:
        parts.append(f"sliding window {window}")
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap:
        parts.append(f"softcap {softcap:g}")
    if isinstance(getattr(module, "sinks", None), nn.Parameter):
        parts.append("attention sinks")
    if getattr(module, "indexer", None) is not None:
        parts.append("indexer selection (top-k within it)")
    if getattr(module, "is_cross_attention", False) or "cross" in name.lower() or "encdec" in name.lower():
        parts.append("cross-attention")
    how = "exact unless named in attn_k" if info.tower else "top-k attention kernel (attn_k)"
    return f"{', '.join(parts)} -> {how}"


def mlp_line(module, layout, tower=None):
    """``"Class, <layout description>, d_ff N -> how use_topk runs it"`` for one feed-forward module."""
    how = "exact unless named in ff_k" if tower else "topk_feedforward (ff_k)"
    return f"{type(module).__name__}, {layout.description}, d_ff {layout.d_ff(module)} -> {how}"


def describe_layers(model):
    """How ``use_topk`` numbers and switches the layers of ``model``: a :class:`LayerList`.

    Each :class:`LayerInfo` has ``switches``, ``{module name: description}`` for every
    attention and feed-forward module found in that layer; ``print(describe_layers(model))``
    shows them as a table.
    """
    found = find_layers(model)
    by_layer = {info.layer: info for info in found.layers}
    for layer, name, module in found.attention:
        by_layer[layer].switches[name] = _attention_line(name, module, by_layer[layer])
    for layer, name, module, layout in found.mlps:
        by_layer[layer].switches[name] = mlp_line(module, layout, by_layer[layer].tower)
    for info in found.layers:
        for name in info.dense_ff:  # feed-forward-like modules no layout covers
            info.switches[name] = "no supported layout: ff_k refuses this layer"
        if info.mlp is None and not info.dense_ff:
            info.switches["(feed-forward)"] = "none found: ff_k cannot switch this layer"
    text = [info for info in found.layers if info.tower is None]
    towers = [info for info in found.layers if info.tower is not None]
    title = f"{type(model).__name__}: {len(text)} layers an int attn_k/ff_k switches"
    if towers:
        names = ", ".join(dict.fromkeys(info.tower for info in towers))
        title += f" (the language model); {len(towers)} more in {names}, exact unless a dict names them"
    return LayerList(text, towers, title)
