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
A feed-forward module is one that matches an entry of :data:`MLP_LAYOUTS`, the table of
where each supported layout keeps its projections and its activation.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import NamedTuple

from torch import nn

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
    mlp: str | None = None  # name of the feed-forward module that ff_k replaces
    d_ff: int | None = None
    tower: str | None = None  # e.g. "model.vision_tower": outside the language model, exact unless named
    switches: dict = field(default_factory=dict)  # module name -> how use_topk switches it (describe_layers)


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
    for name, module in model.named_modules():
        if _calls_attention_registry(module):
            found.append((name, module, None))
        elif (layout := _mlp_layout(module)) is not None:
            found.append((name, module, layout))
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
        elif info.mlp is None:
            info.mlp, info.d_ff = name, layout.part(module, layout.w_in).out_features
            mlps.append((layer, name, module, layout))
    return ModelLayers([layers[i] for i in sorted(layers)], attention, mlps)


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
    what = getattr(layout, "description", None) or layout.kind
    if callable(getattr(layout, "d_ff", None)):
        d_ff = layout.d_ff(module)
    else:
        d_ff = layout.part(module, layout.w_in).out_features
    how = "exact unless named in ff_k" if tower else "topk_feedforward (ff_k)"
    return f"{type(module).__name__}, {what}, d_ff {d_ff} -> {how}"


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
        for name in getattr(info, "dense_ff", []):  # feed-forward-like modules no layout covers
            info.switches[name] = "no supported layout: ff_k refuses this layer"
        if info.mlp is None and not getattr(info, "dense_ff", []):
            info.switches["(feed-forward)"] = "none found: ff_k cannot switch this layer"
    text = [info for info in found.layers if info.tower is None]
    towers = [info for info in found.layers if info.tower is not None]
    title = f"{type(model).__name__}: {len(text)} layers an int attn_k/ff_k switches"
    if towers:
        names = ", ".join(dict.fromkeys(info.tower for info in towers))
        title += f" (the language model); {len(towers)} more in {names}, exact unless a dict names them"
    return LayerList(text, towers, title)
