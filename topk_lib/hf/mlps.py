"""How ``use_topk`` switches a transformers feed-forward module to top-k (Gupta et al. 2021, section 3.2).

One table, :data:`MLP_LAYOUTS`, says for each MLP *shape* where its projections and its
activation are; one builder, :func:`ff_forwards`, turns a matched module into instance
``forward`` replacements that run the whole ``W_in -> f -> W_out`` product in
:func:`topk_lib.kernels.feedforward.topk_feedforward`. Shapes:

- plain ``W_out f(W_in x)`` MLP modules: T5 ``DenseReluDense``, GPT-2 (``Conv1D``, weights
  stored ``[in, out]``, passed transposed), GPT-NeoX, GPT-J, StarCoder2, Phi and ViT
  (``fc1/fc2``), DistilBERT (``lin1/lin2``);
- gated ``W_out (f(W_gate x) * W_in x)``: Llama-style ``gate/up/down_proj`` (also the shared
  experts of MoE layers), T5 gated, and fused ``[gate; up]`` projections (Phi-3
  ``gate_up_proj``, ModernBERT ``Wi``: the first half goes through the activation), passed
  as row slices so gradients reach the fused weight;
- the two with more than ``act(gate) * up -> down``: Falcon-H1's ``gate_multiplier`` and
  ``down_multiplier`` (folded into the weights) and Gemma-3n's activation sparsity (a
  Gaussian top-k on the gate pre-activation, which needs the whole row: those layers compute
  ``h`` densely and keep its top k, so their backward saves ``[T, d_ff]``);
- feed-forward parts that sit on the block itself: BERT (``intermediate`` is taken over and
  ``output.dense`` made the identity, so BertOutput keeps its dropout, residual and
  LayerNorm), OPT and BART/Whisper/(M)BART-likes (``fc1`` runs the whole product, the
  block's ``activation_fn`` and ``fc2`` become the identity);
- routed experts stored as 3D parameters (``gate_up_proj [E, 2 d_ff, d]``,
  ``down_proj [E, d, d_ff]``, transformers' ``use_experts_implementation``; Aria's transposed
  variant too): each expert's tokens run the top-k product with that expert's weight slices,
  weighted and summed as the module does; the router is untouched.

Anything that looks like a feed-forward module (its class name ends in MLP, FFN, Experts,
MoE, ...) that no entry covers is reported by :func:`dense_ff_modules`, so ``ff_k`` can
refuse instead of leaving it dense: GPT-OSS's experts (interleaved gate/up, clamping, a
custom GLU with biases), Llama-4's and DBRX's batched experts, experts with a custom
``_apply_gate`` or a post-expert norm.

The safeguard: before a replacement is used, :func:`ff_forwards` runs it at ``k = d_ff`` on
a small seeded probe batch and compares it with the module's own forward (for block-level
layouts, the chain of parts it replaces; for experts, under a random routing). An MLP whose
forward does more than the layout says is refused with a ``ValueError`` naming it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from topk_lib.kernels.feedforward import ACTIVATIONS, topk_feedforward

__all__ = ["MLPLayout", "MLP_LAYOUTS", "dense_ff_modules", "ff_forwards", "match_layout"]


@dataclass(frozen=True)
class MLPLayout:
    """Where one feed-forward shape keeps its parts, as attribute paths inside the matched module.

    ``w_in`` makes the linear pre-activation (the "up" of a gated MLP; with ``fused``, one
    projection whose first half is the gate and whose second half is ``w_in``), ``w_gate`` the
    gate that goes through ``activation``, ``w_out`` maps ``h`` back. ``transposed``: weights
    stored ``[in, out]`` (``Conv1D``; 3D experts ``[E, in, out]``). ``entry`` is the part whose
    ``forward`` the replacement takes over (``""``: the module itself); ``identities`` are the
    parts the block calls after it, in call order, made the identity. ``dropouts``: float
    dropout attributes the replacement skips. ``gate_scale``/``out_scale``: attributes holding
    scalar multipliers of the gate pre-activation and of the output. ``pre_gate``: a method
    applied to the gate pre-activation while the attribute ``pre_gate_when`` is positive.
    ``experts``: the parameters are 3D, one slice per routed expert. ``activation`` may be a
    tuple of alternative attribute names (models spell it ``act_fn``, ``activation_fn``, ...).
    """

    kind: str
    description: str
    w_in: str
    w_out: str
    activation: str | tuple
    w_gate: str | None = None
    fused: bool = False
    transposed: bool = False
    entry: str = ""
    identities: tuple = ()
    dropouts: tuple = ()
    gate_scale: str | None = None
    out_scale: str | None = None
    pre_gate: str | None = None
    pre_gate_when: str | None = None
    experts: bool = False

    def part(self, module, path):
        """The submodule or attribute at ``path`` (dotted) inside ``module``, or None."""
        for name in path.split("."):
            module = getattr(module, name, None)
        return module

    def act(self, module):
        """The activation module or function of ``module`` (the first of the alternatives present), or None."""
        names = (self.activation,) if isinstance(self.activation, str) else self.activation
        return next((a for a in (self.part(module, n) for n in names) if a is not None), None)

    def matches(self, module):
        """True when ``module`` has every part this layout names, of the right kind."""
        paths = [self.w_in, self.w_out] + ([self.w_gate] if self.w_gate else [])
        if self.experts:
            return _matches_experts(self, module, paths)
        want = _CONV1D if self.transposed else nn.Linear
        if not all(isinstance(self.part(module, p), want) for p in paths):
            return False
        if self.act(module) is None:
            return False
        if not all(isinstance(self.part(module, p), nn.Module) for p in self.identities):
            return False
        if any(not isinstance(getattr(module, a, None), (int, float)) for a in (self.gate_scale, self.out_scale) if a):
            return False
        if self.pre_gate and not callable(getattr(module, self.pre_gate, None)):
            return False
        if self.pre_gate and not hasattr(module, self.pre_gate_when):
            return False
        if not self.entry:  # a whole module holds nothing with weights beyond its named parts
            named = {p.split(".")[0] for p in paths}
            return all(n in named for n, c in module.named_children() if any(True for _ in c.parameters()))
        # a block only counts when its code calls the entry, or the replacement would never run
        return f"self.{self.entry.split('.')[0]}(" in _class_source(type(module))

    def d_ff(self, module):
        """Hidden units (per expert for experts)."""
        return self.weights(module, 0 if self.experts else None)[0].shape[0]

    def weights(self, module, expert=None):
        """``(w_in, w_gate, w_out, b_in, b_gate, b_out)`` as ``[out, in]`` views of the parameters (None: absent)."""

        def matrix(path):
            part = self.part(module, path)
            w = part if isinstance(part, torch.Tensor) else part.weight
            w = w if expert is None else w[expert]
            return w.t() if self.transposed else w  # [out, in]

        def bias(path):
            part = self.part(module, path)
            return None if isinstance(part, torch.Tensor) else part.bias

        w_in, b_in = matrix(self.w_in), bias(self.w_in)
        w_gate, b_gate = (matrix(self.w_gate), bias(self.w_gate)) if self.w_gate else (None, None)
        if self.fused:  # [gate; up] rows
            f = w_in.shape[0] // 2
            w_gate, w_in = w_in[:f], w_in[f:]
            if b_in is not None:
                b_gate, b_in = b_in[:f], b_in[f:]
        w_out, b_out = matrix(self.w_out), bias(self.w_out)
        if self.gate_scale and getattr(module, self.gate_scale) != 1:
            w_gate = w_gate * getattr(module, self.gate_scale)
        if self.out_scale and getattr(module, self.out_scale) != 1:
            scale = getattr(module, self.out_scale)
            w_out, b_out = w_out * scale, (None if b_out is None else b_out * scale)
        return w_in, w_gate, w_out, b_in, b_gate, b_out


try:  # GPT-2's projections; transformers always has it, the guard keeps the table importable without it
    from transformers.pytorch_utils import Conv1D as _CONV1D
except ImportError:  # pragma: no cover
    _CONV1D = type("Conv1D", (nn.Module,), {})

@functools.lru_cache(maxsize=None)
def _class_source(cls):
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):  # no source to read: the block is not matched
        return ""


_DEFAULT_GATE = "_default_apply_gate"  # transformers.integrations.moe's act(gate) * up


def _matches_experts(layout, module, paths):
    params = [layout.part(module, p) for p in paths]
    if not all(isinstance(p, nn.Parameter) and p.dim() == 3 for p in params):
        return False
    apply_gate = getattr(type(module), "_apply_gate", None)
    # use_experts_implementation declares the layout on the instance; anything else is not this shape
    declared = (
        getattr(module, "is_concatenated", None) is True
        and getattr(module, "is_transposed", None) is layout.transposed
        and getattr(module, "has_bias", None) is False
        and getattr(module, "has_gate", None) is bool(layout.fused or layout.w_gate)
        and getattr(module, "has_post_expert_norm", None) is False
    )
    return declared and getattr(apply_gate, "__name__", None) == _DEFAULT_GATE and layout.act(module) is not None


_ACTS = ("act_fn", "activation_fn", "act", "activation")  # how models name the activation of an MLP module


def _plain(kind, w_in, w_out, what, **kw):
    return MLPLayout(kind, f"{what}: {w_out}(act({w_in}(x)))", w_in=w_in, w_out=w_out, activation=_ACTS, **kw)


#: Supported feed-forward shapes, tried in this order; the first that matches a module wins.
MLP_LAYOUTS = (
    # Falcon-H1: down(up(x) * act(gate(x) * gate_multiplier)) * down_multiplier
    MLPLayout("gated_multipliers", "gated MLP with gate/down multipliers (Falcon-H1)", w_in="up_proj",
              w_gate="gate_proj", w_out="down_proj", activation="act_fn", gate_scale="gate_multiplier",
              out_scale="down_multiplier"),
    # Gemma-3n: down(act(gaussian_topk(gate(x))) * up(x)) while activation_sparsity > 0
    MLPLayout("gated_sparse_gate", "gated MLP with activation sparsity on the gate (Gemma-3n)", w_in="up_proj",
              w_gate="gate_proj", w_out="down_proj", activation="act_fn", pre_gate="_gaussian_topk",
              pre_gate_when="activation_sparsity"),
    MLPLayout("gated", "gated MLP: down_proj(act(gate_proj(x)) * up_proj(x))", w_in="up_proj", w_gate="gate_proj",
              w_out="down_proj", activation=_ACTS),
    MLPLayout("gated_t5", "T5 gated: wo(act(wi_0(x)) * wi_1(x))", w_in="wi_1", w_gate="wi_0", w_out="wo",
              activation="act"),
    MLPLayout("gated_fused", "fused gated MLP (Phi-3): gate, up = gate_up_proj(x); down_proj(act(gate) * up)",
              w_in="gate_up_proj", w_out="down_proj", activation=_ACTS, fused=True),
    MLPLayout("gated_fused_wi", "fused gated MLP (ModernBERT): a, b = Wi(x); Wo(act(a) * b)", w_in="Wi", w_out="Wo",
              activation="act", fused=True),
    _plain("t5", "wi", "wo", "T5"),
    _plain("conv1d", "c_fc", "c_proj", "GPT-2 (Conv1D)", transposed=True),
    _plain("c_fc", "c_fc", "c_proj", "StarCoder2", dropouts=("residual_dropout",)),
    _plain("h_to_4h", "dense_h_to_4h", "dense_4h_to_h", "GPT-NeoX"),
    _plain("fc_in", "fc_in", "fc_out", "GPT-J"),
    _plain("fc1", "fc1", "fc2", "Phi, ViT, CLIP-likes"),
    _plain("lin1", "lin1", "lin2", "DistilBERT"),
    MLPLayout("bert", "BERT-style block: output.dense(intermediate(x)), intermediate taken over",
              w_in="intermediate.dense", w_out="output.dense", activation="intermediate.intermediate_act_fn",
              entry="intermediate", identities=("output.dense",)),
    MLPLayout("block_fc1", "fc1/fc2 on the block (OPT, BART, Whisper): fc1 runs the product, act and fc2 identity",
              w_in="fc1", w_out="fc2", activation="activation_fn", entry="fc1", identities=("activation_fn", "fc2"),
              dropouts=("activation_dropout",)),
    MLPLayout("experts", "routed experts, 3D gate_up_proj [E, 2 d_ff, d] / down_proj [E, d, d_ff]",
              w_in="gate_up_proj", w_out="down_proj", activation="act_fn", fused=True, experts=True),
    MLPLayout("experts_transposed", "routed experts, 3D gate_up_proj [E, d, 2 d_ff] / down_proj [E, d_ff, d]",
              w_in="gate_up_proj", w_out="down_proj", activation="act_fn", fused=True, transposed=True, experts=True),
)


def match_layout(module):
    """The first :data:`MLP_LAYOUTS` entry that ``module`` matches, or None."""
    return next((layout for layout in MLP_LAYOUTS if layout.matches(module)), None)


_FF_NAME = re.compile(r"(MLP|Mlp|FeedForward|FFN|Ffn|Experts|MoE|Moe|MoeBlock|DenseActDense|DenseReluDense|"
                      r"DenseGatedActDense|Intermediate)$")


def dense_ff_modules(model, covered):
    """``[(name, module)]`` that look like feed-forward modules (by class name) but no layout covers.

    ``covered`` names the matched modules; their ancestors and descendants count as covered
    (a MoE block around matched experts, BERT's ``intermediate`` inside a matched layer).
    """
    out = []
    for name, module in model.named_modules():
        if not _FF_NAME.search(type(module).__name__) or not any(True for _ in module.parameters()):
            continue
        if name and not any(name == c or name.startswith(c + ".") or c.startswith(name + ".") for c in covered):
            out.append((name, module))
    return out


# --------------------------------------------------------------------------- replacements


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


def _identity(h):
    return h


def _dense_topk(x, module, layout, act, k, magnitude):
    """``h`` computed densely (for gate transforms that need the whole row), top ``k`` kept, then ``W_out``."""
    w_in, w_gate, w_out, b_in, _, b_out = layout.weights(module)
    gate = getattr(module, layout.pre_gate)(F.linear(x, w_gate))  # [..., d_ff]
    h = ACTIVATIONS[act](gate) * F.linear(x, w_in, b_in)  # [..., d_ff]
    if k < h.shape[-1]:
        idx = (h.abs() if magnitude else h).topk(k, dim=-1).indices  # [..., k]
        h = torch.zeros_like(h).scatter(-1, idx, h.gather(-1, idx))
    return F.linear(h, w_out, b_out)


def _skipped_dropouts(module, layout, entry):
    """Names of the dropouts in training mode that the replacement does not apply where the module does."""
    names = [f"{type(entry).__name__}.{n}" for n, m in entry.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
    names += [f"{type(module).__name__}.{a}" for a in layout.dropouts if getattr(module, a, 0)]
    return names


def _build(module, layout, k, chunk_size, arg, name, skipped_dropout):
    """The replacement forward of ``module`` (of its entry part, for block-level layouts) at top-k ``k``."""
    entry = layout.part(module, layout.entry) if layout.entry else module
    _, w_gate, _, _, b_gate, _ = layout.weights(module, 0 if layout.experts else None)
    if b_gate is not None:
        raise ValueError(f"{arg}: {name} ({type(module).__name__}) has a bias on its gate, which topk_feedforward "
                         "does not support")
    act = _activation_name(layout.act(module), arg)
    magnitude = w_gate is not None or act != "relu"  # the selection rule topk_feedforward documents
    select = "magnitude" if magnitude else "value"
    dense_h = bool(layout.pre_gate) and getattr(module, layout.pre_gate_when) > 0

    def product(x, expert=None):
        if dense_h:
            return _dense_topk(x, module, layout, act, k, magnitude)
        w_in, w_gate, w_out, b_in, _, b_out = layout.weights(module, expert)
        return topk_feedforward(x, w_in, w_out, topk=k, activation=act, w_gate=w_gate, select=select, b_in=b_in,
                                b_out=b_out, chunk_size=chunk_size)

    def forward(x):
        if entry.training and skipped_dropout is not None and (skipped := _skipped_dropouts(module, layout, entry)):
            skipped_dropout(
                f"use_topk: {name or type(module).__name__} is in training mode with dropout inside the replaced "
                f"feed-forward product ({', '.join(skipped)}); topk_feedforward applies no dropout, so it is skipped "
                "(or, for a block's activation dropout, falls on the feed-forward output) in every patched layer "
                "(warned once per use_topk context). Call model.eval(), or set that dropout to 0 to train without it"
            )
        return product(x)

    def experts_forward(hidden_states, top_k_index, top_k_weights):
        """As the module's own loop: each hit expert's tokens, weighted, summed by index_add_."""
        out = torch.zeros_like(hidden_states)  # [T, d]
        n_experts = layout.part(module, layout.w_in).shape[0]
        with torch.no_grad():
            hit = torch.unique(top_k_index).tolist()
        for e in hit:
            if e >= n_experts:  # slots routed to no local expert
                continue
            pos, tokens = torch.where(top_k_index.t() == e)  # the module's order: by slot, then token
            y = product(hidden_states[tokens], e)  # [n, d]
            out.index_add_(0, tokens, (y * top_k_weights[tokens, pos, None]).to(out.dtype))
        return out

    return _with_accelerate_hooks(module, layout, entry, experts_forward if layout.experts else forward)


def _offloaded(m):
    """True when accelerate keeps ``m``'s weights elsewhere (disk, CPU) and loads them around each call."""
    hook = getattr(m, "_hf_hook", None)
    return hook is not None and getattr(hook, "offload", False)


def _with_accelerate_hooks(module, layout, entry, forward):
    """``forward`` as accelerate's big-model hooks would run it, for a model dispatched with a ``device_map``.

    accelerate replaces ``entry.forward`` on the instance with a wrapper that moves the inputs
    to the execution device and loads offloaded weights; the replacement takes the place of
    that wrapper and reads the weights itself, so it runs the entry's hook around the call and
    loads the offloaded weights of the projections it reads for its duration (not those of the
    rest of a block, for block-level layouts).
    """
    hook = getattr(entry, "_hf_hook", None)
    owners = [entry]
    for path in filter(None, (layout.w_in, layout.w_gate, layout.w_out)):
        part = layout.part(module, path)  # a Linear, or a 3D parameter whose module holds it
        owners.append(part if isinstance(part, nn.Module) else layout.part(module, path.rpartition(".")[0]) or module)
    parts = list(dict.fromkeys(m for o in owners for m in o.modules() if m is not entry and _offloaded(m)))
    if hook is None and not parts:
        return forward

    @functools.wraps(forward)
    def hooked(*args):
        if hook is not None:
            args, _ = hook.pre_forward(entry, *args)
        with _loaded(parts):
            out = forward(*args)
        return hook.post_forward(entry, out) if hook is not None else out

    return hooked


@contextlib.contextmanager
def _loaded(modules):
    """accelerate's offloaded weights of ``modules`` (their own tensors) loaded for the block."""
    modules = [m for m in modules if _offloaded(m)]
    with contextlib.ExitStack() as stack:
        if modules:
            from accelerate.utils import align_module_device

            for m in modules:
                stack.enter_context(align_module_device(m))
        yield


def _execution_device(module, w):
    """Where ``w`` is used: its device, or accelerate's execution device when it is offloaded (on meta)."""
    if not w.is_meta:
        return w.device
    hooks = [m._hf_hook for m in module.modules() if _offloaded(m)]
    return getattr(hooks[0], "execution_device", None) if hooks else None


def ff_forwards(module, layout, k, chunk_size, arg="ff_k", name="", skipped_dropout=None):
    """``{module: forward or None}`` that switches one matched module to top-``k`` (None: back to its own forward).

    Gated layers keep the largest ``|h|``, plain ones the largest ``h`` for ReLU and the largest
    ``|h|`` otherwise. Before returning, the replacement is checked at ``k = d_ff`` against the
    module's own forward (see the module docstring); a mismatch raises ``ValueError``.
    """
    entry = layout.part(module, layout.entry) if layout.entry else module
    exits = [layout.part(module, p) for p in layout.identities]
    if k is None:
        return {entry: None, **{m: None for m in exits}}
    exact = _build(module, layout, layout.d_ff(module), chunk_size, arg, name, None)
    _probe(module, layout, entry, exits, exact, arg, name)
    forward = _build(module, layout, k, chunk_size, arg, name, skipped_dropout)
    return {entry: forward, **{m: _identity for m in exits}}


# --------------------------------------------------------------------------- the probe


def _probe(module, layout, entry, exits, exact, arg, name):
    """Refuse ``module`` when its replacement at ``k = d_ff`` differs from its own forward on a seeded batch."""
    chain = [entry, *exits]
    w_in = layout.weights(module, 0 if layout.experts else None)[0]
    device = _execution_device(module, w_in)
    if device is None:
        return  # weights on meta and no accelerate hook to load them: nothing to compare
    dtype = w_in.dtype
    g = torch.Generator().manual_seed(0)  # its own generator: the global RNG is left alone
    x = torch.randn(1, 3, w_in.shape[1], generator=g).to(device, dtype)  # [1, 3, d]
    modes = [(m, m.training) for part in chain for m in part.modules()]
    try:
        for m, _ in modes:
            m.training = False  # the module's own dropout would make the comparison random
        with torch.no_grad(), _loaded(chain):  # class forwards skip accelerate's hooks: load their own weights
            if layout.experts:
                n_experts, slots = layout.part(module, layout.w_in).shape[0], 2
                idx = torch.stack([torch.randperm(n_experts, generator=g)[:slots] for _ in range(3)])  # [3, K]
                weights = torch.rand(3, idx.shape[1], generator=g).to(device, dtype)  # [3, K]
                args = (x[0], idx.to(device), weights)
                ref, out = type(module).forward(module, *args), exact(*args)
            else:
                ref = out = x
                for part in chain:  # each part's class forward: an enclosing use_topk's instance forward is skipped
                    ref = type(part).forward(part, ref)
                out = exact(out)
    finally:
        for m, mode in modes:
            m.training = mode
    if isinstance(ref, torch.Tensor) and ref.shape == out.shape:
        scale = ref.abs().max().item()
        err = (out.to(ref.dtype) - ref).abs().max().item()
        if err <= max(1e-4, 8 * torch.finfo(dtype).eps) * max(scale, 1e-30):  # float rounding of the same product
            return
        found = f"differs from its own forward by {err:.3g} (output scale {scale:.3g})"
    else:
        found = f"returns {tuple(out.shape)} where its own forward returns {type(ref).__name__}"
    raise ValueError(
        f"{arg}: {name or 'the module'} ({type(module).__name__}) does more than act(gate)*up -> down as its layout "
        f"{layout.kind!r} ({layout.description}) says: the top-k replacement at k = d_ff {found} on a probe batch, "
        "so use_topk would change the model silently. Leave this layer out of ff_k"
    )
