"""Tiny random configs of many transformers architectures, their inputs, and dense top-k references.

Each entry of :data:`ARCHS` builds a 2-layer model (hidden 32, 2-4 heads, vocabulary 128)
with random weights from a fixed seed, offline. The references are written here, independent
of ``topk_lib``'s kernels:

* :func:`eager_topk` runs the model under its own eager attention (configs switched to
  ``"eager"``) with the module-level ``eager_attention_forward`` of its modeling module
  wrapped: the wrapper computes the scores itself (scaling, soft-cap, relative bias, the
  model's mask), finds the ``k`` largest per row among the allowed keys, and hands the
  model's function the model's mask plus ``-inf`` outside them, so sinks, soft-capping and
  biases stay the model's own code.
* :func:`dense_topk_mlp` keeps, per token, the ``k`` largest hidden activations (the largest
  ``h`` for plain ReLU layers, the largest ``|h|`` otherwise, as ``topk_feedforward``
  documents) at the input of each MLP's output projection, and runs each routed expert of a
  mixture-of-experts layer as a dense loop with the same rule.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import transformers as tf
from torch import nn

from reference import keep_topk, routed_experts_reference

V = 128  # vocabulary of every tiny model
IMAGE = V - 1  # Gemma-3's image token
L = 10  # tokens per sequence
B = 2  # sequences per batch

LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, vocab_size=V, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             initializer_range=0.1)
BART = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=V, max_position_embeddings=64, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, init_std=0.1)
BERT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=V,
            max_position_embeddings=64, initializer_range=0.1)


def _llama_like(config, model, **kw):
    return lambda: model(config(**{**LLAMA, **kw}))


@dataclass(frozen=True)
class Arch:
    """How to build and feed one architecture, and what ``use_topk`` should do with it."""

    build: object  # () -> model
    kind: str  # "decoder", "encoder", "encdec", "vision", "audio"
    ff: str = "mlp"  # "mlp": ff_k supported; "moe": routed experts too; "raises": a clear error
    attn: bool = True  # False: attn_k raises a clear error (no registry attention)
    notes: str = ""
    extra: dict = field(default_factory=dict)


def _gemma3_multimodal():
    text = dict(LLAMA, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                query_pre_attn_scalar=8, vocab_size=V)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                  patch_size=4, num_channels=3)
    cfg = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=IMAGE,
                          boi_token_index=V - 2, eoi_token_index=V - 3, initializer_range=0.1)
    model = tf.Gemma3ForConditionalGeneration(cfg)
    with torch.no_grad():  # the projector starts at zero: every image token would be the same (tied scores)
        for p in model.model.multi_modal_projector.parameters():
            p.normal_(0.0, 0.3)
    return model


def image_inputs():
    """Gemma-3 multimodal input: 4 image tokens per sequence and one 16 x 16 image each."""
    batch = inputs("gemma3-multimodal", padded=False)
    batch["input_ids"] = batch["input_ids"].clone()
    batch["input_ids"][:, 1:5] = IMAGE
    batch["pixel_values"] = torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    return batch


def _deepseek(config, model, **kw):
    mla = dict(q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
               moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1,
               topk_group=1, first_k_dense_replace=1, num_key_value_heads=4, head_dim=4)
    return _llama_like(config, model, **mla, **kw)


SLIDE2 = ["sliding_attention", "full_attention"]

ARCHS = {
    # ------------------------------------------------------------------ decoders
    "llama": Arch(_llama_like(tf.LlamaConfig, tf.LlamaForCausalLM), "decoder", notes="GQA"),
    "mistral": Arch(_llama_like(tf.MistralConfig, tf.MistralForCausalLM, sliding_window=4), "decoder",
                    notes="sliding window 4"),
    "qwen2": Arch(_llama_like(tf.Qwen2Config, tf.Qwen2ForCausalLM), "decoder", notes="q/k/v bias"),
    "qwen3": Arch(_llama_like(tf.Qwen3Config, tf.Qwen3ForCausalLM), "decoder", notes="q/k norm"),
    "gemma": Arch(_llama_like(tf.GemmaConfig, tf.GemmaForCausalLM), "decoder", notes="GeGLU"),
    "gemma2": Arch(_llama_like(tf.Gemma2Config, tf.Gemma2ForCausalLM, sliding_window=4, attn_logit_softcapping=1.0,
                               query_pre_attn_scalar=8, layer_types=SLIDE2), "decoder",
                   notes="attention soft-cap, sliding/global"),
    "gemma3": Arch(_llama_like(tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, sliding_window=4, query_pre_attn_scalar=8,
                               layer_types=SLIDE2), "decoder", notes="sliding/global, q/k norm"),
    "gemma3n": Arch(lambda: tf.Gemma3nForCausalLM(tf.Gemma3nTextConfig(
        **LLAMA, vocab_size_per_layer_input=V, hidden_size_per_layer_input=8, laurel_rank=4, num_kv_shared_layers=0,
        activation_sparsity_pattern=[0.95, 0.0], sliding_window=4, layer_types=SLIDE2)), "decoder",
        notes="activation sparsity (layer 0), AltUp, sliding/global"),
    "gemma3-multimodal": Arch(_gemma3_multimodal, "decoder", notes="Gemma3ForConditionalGeneration, text-only input"),
    "phi": Arch(_llama_like(tf.PhiConfig, tf.PhiForCausalLM, num_key_value_heads=4), "decoder",
                notes="fc1/fc2 MLP, partial rotary"),
    "phi3": Arch(_llama_like(tf.Phi3Config, tf.Phi3ForCausalLM), "decoder", notes="fused gate_up_proj"),
    "starcoder2": Arch(_llama_like(tf.Starcoder2Config, tf.Starcoder2ForCausalLM, sliding_window=4), "decoder",
                       notes="c_fc/c_proj MLP, sliding window"),
    "gpt2": Arch(lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_inner=64, vocab_size=V,
                                                         n_positions=64, initializer_range=0.1, pad_token_id=0)),
                 "decoder", notes="Conv1D c_fc/c_proj"),
    "gpt_neox": Arch(_llama_like(tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, num_key_value_heads=None), "decoder",
                     notes="fused query_key_value"),
    "gptj": Arch(lambda: tf.GPTJForCausalLM(tf.GPTJConfig(n_embd=32, n_layer=2, n_head=4, n_inner=64, rotary_dim=4,
                                                          vocab_size=V, n_positions=64, initializer_range=0.1,
                                                          pad_token_id=0)), "decoder", notes="parallel block"),
    "opt": Arch(lambda: tf.OPTForCausalLM(tf.OPTConfig(hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                                       num_attention_heads=4, word_embed_proj_dim=32, vocab_size=V,
                                                       max_position_embeddings=64, init_std=0.1, pad_token_id=0)),
                "decoder", notes="fc1/fc2 MLP"),
    "cohere": Arch(_llama_like(tf.CohereConfig, tf.CohereForCausalLM), "decoder", notes="parallel block"),
    "olmo": Arch(_llama_like(tf.OlmoConfig, tf.OlmoForCausalLM), "decoder"),
    "olmo2": Arch(_llama_like(tf.Olmo2Config, tf.Olmo2ForCausalLM), "decoder", notes="q/k norm"),
    "granite": Arch(_llama_like(tf.GraniteConfig, tf.GraniteForCausalLM, attention_multiplier=0.3), "decoder",
                    notes="attention multiplier as scaling"),
    "stablelm": Arch(_llama_like(tf.StableLmConfig, tf.StableLmForCausalLM), "decoder", notes="partial rotary"),
    "falcon_h1": Arch(_llama_like(tf.FalconH1Config, tf.FalconH1ForCausalLM, mamba_d_ssm=32, mamba_n_heads=4,
                                  mamba_d_head=8, mamba_d_state=8, mamba_chunk_size=4,
                                  mlp_multipliers=[0.5, 2.0], key_multiplier=0.7), "decoder",
                      notes="hybrid attention + Mamba, MLP multipliers"),
    "deepseek_v3": Arch(_deepseek(tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM), "decoder", ff="moe",
                        notes="MLA, MoE (shared + routed experts), first layer dense"),
    "deepseek_v32": Arch(_deepseek(tf.DeepseekV32Config, tf.DeepseekV32ForCausalLM, index_topk=4, index_head_dim=8,
                                   index_n_heads=2), "decoder", ff="moe", notes="MLA, DSA indexer (4 keys), MoE"),
    "qwen2_moe": Arch(_llama_like(tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM, moe_intermediate_size=32, num_experts=4,
                                  num_experts_per_tok=2, shared_expert_intermediate_size=64), "decoder", ff="moe",
                      notes="MoE, shared expert"),
    "qwen3_moe": Arch(_llama_like(tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM, moe_intermediate_size=32, num_experts=4,
                                  num_experts_per_tok=2), "decoder", ff="moe", notes="MoE"),
    "mixtral": Arch(_llama_like(tf.MixtralConfig, tf.MixtralForCausalLM, num_local_experts=4, num_experts_per_tok=2,
                                sliding_window=None), "decoder", ff="moe", notes="MoE"),
    "gpt_oss": Arch(_llama_like(tf.GptOssConfig, tf.GptOssForCausalLM, num_local_experts=4, num_experts_per_tok=2,
                                sliding_window=4, layer_types=SLIDE2), "decoder", ff="raises",
                    notes="attention sinks, sliding/global; clamped SwiGLU experts raise"),
    # ------------------------------------------------------------------ encoders
    "bert": Arch(lambda: tf.BertModel(tf.BertConfig(**BERT)), "encoder"),
    "roberta": Arch(lambda: tf.RobertaModel(tf.RobertaConfig(**BERT, pad_token_id=0)), "encoder"),
    "electra": Arch(lambda: tf.ElectraModel(tf.ElectraConfig(**BERT, embedding_size=32)), "encoder"),
    "distilbert": Arch(lambda: tf.DistilBertModel(tf.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                                      vocab_size=V, max_position_embeddings=64,
                                                                      initializer_range=0.1)),
                       "encoder", notes="lin1/lin2 MLP"),
    "modernbert": Arch(lambda: tf.ModernBertModel(tf.ModernBertConfig(
        **BERT, local_attention=4, global_attn_every_n_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        cls_token_id=1, sep_token_id=2)),
                       "encoder", notes="fused Wi (GeGLU), local/global attention"),
    "vit": Arch(lambda: tf.ViTModel(tf.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, image_size=12, patch_size=4,
                                                 initializer_range=0.1)), "vision", notes="pixel input"),
    # ------------------------------------------------------------------ encoder-decoders
    "t5": Arch(lambda: tf.T5ForConditionalGeneration(tf.T5Config(
        d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=V,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, initializer_factor=1.0)), "encdec",
        notes="relative position bias, cross-attention"),
    "t5-gated": Arch(lambda: tf.T5ForConditionalGeneration(tf.T5Config(
        d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=V,
        feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)), "encdec",
        notes="Flan-T5 style gated-GELU MLP"),
    "bart": Arch(lambda: tf.BartForConditionalGeneration(tf.BartConfig(**BART)), "encdec", notes="fc1/fc2 MLP"),
    "pegasus": Arch(lambda: tf.PegasusForConditionalGeneration(tf.PegasusConfig(**BART)), "encdec"),
    "marian": Arch(lambda: tf.MarianMTModel(tf.MarianConfig(**BART)), "encdec"),
    "whisper": Arch(lambda: tf.WhisperForConditionalGeneration(tf.WhisperConfig(
        **{**BART, "max_position_embeddings": None}, num_mel_bins=8, max_source_positions=8,
        max_target_positions=32, begin_suppress_tokens=None, suppress_tokens=None)), "audio", notes="audio features"),
    # ------------------------------------------------------------------ outside the registry: clear errors
    "falcon": Arch(lambda: tf.FalconForCausalLM(tf.FalconConfig(hidden_size=32, num_hidden_layers=2,
                                                                num_attention_heads=4, vocab_size=V,
                                                                ffn_hidden_size=48)),
                   "decoder", attn=False, notes="feed-forward only (GPT-NeoX-style MLP)"),
    "bloom": Arch(lambda: tf.BloomForCausalLM(tf.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=V)),
                  "decoder", ff="raises", attn=False),
    "gpt_neo": Arch(lambda: tf.GPTNeoForCausalLM(tf.GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
                                                                 attention_types=[[["global", "local"], 1]],
                                                                 vocab_size=V, max_position_embeddings=64)),
                    "decoder", attn=False, notes="feed-forward only (GPT-2-style MLP)"),
    "mpt": Arch(lambda: tf.MptForCausalLM(tf.MptConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=V)),
                "decoder", ff="raises", attn=False),
    "deberta_v2": Arch(lambda: tf.DebertaV2Model(tf.DebertaV2Config(**BERT)), "encoder", attn=False,
                       notes="feed-forward only (BERT-style MLP)"),
}


def build(name):
    """The tiny model ``name``, in eval mode, with SDPA attention where the model has it."""
    torch.manual_seed(0)
    model = ARCHS[name].build()
    return model.eval()


# --------------------------------------------------------------------------- inputs and outputs


def inputs(name, *, padded):
    """A batch of ``B`` sequences of ``L`` tokens; with ``padded`` the second has 3 padding tokens."""
    kind = ARCHS[name].kind
    g = torch.Generator().manual_seed(1)
    if kind == "vision":
        return {"pixel_values": torch.randn(B, 3, 12, 12, generator=g)}
    dec = torch.randint(3, V - 3, (B, L - 3), generator=g)
    if kind == "audio":
        return {"input_features": torch.randn(B, 8, 16, generator=g), "decoder_input_ids": dec}
    ids = torch.randint(3, V - 3, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    if padded:  # decoders pad on the left (as for generation), the others on the right
        mask[1, :3] = 0 if kind == "decoder" else 1
        mask[1, L - 3 :] = 1 if kind == "decoder" else 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if kind == "encdec":
        batch["decoder_input_ids"] = dec
    return batch


def real_tokens(batch, out):
    """Positions of ``out [B, T, ...]`` that are real tokens (padding rows carry no meaning)."""
    if "attention_mask" in batch and out.shape[1] == batch["attention_mask"].shape[1]:
        return out[batch["attention_mask"].bool()]
    return out


def run(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


# --------------------------------------------------------------------------- the attention reference


def _configs(model):
    seen = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            seen[id(config)] = config
    return list(seen.values())


def _topk_extra_mask(module, query, key, attention_mask, scaling, k, softcap=None, position_bias=None):
    """``0`` at the ``k`` largest allowed scores of each row, ``-inf`` elsewhere: ``[B, Hq, Lq, Lk]``."""
    hq, hkv = query.shape[1], key.shape[1]
    key = key.repeat_interleave(hq // hkv, dim=1) if hq != hkv else key  # repeat_kv
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale  # [B, Hq, Lq, Lk]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if position_bias is not None:
        scores = scores + position_bias
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[-2]]
        scores = scores.masked_fill(~mask, -torch.inf) if mask.dtype == torch.bool else scores + mask
    allowed = scores > torch.finfo(scores.dtype).min / 2  # eager masks hold finfo.min
    scores = scores.masked_fill(~allowed, -torch.inf)
    kth = scores.topk(min(k, scores.shape[-1]), dim=-1).values[..., -1:]  # [B, Hq, Lq, 1]
    keep = ((scores >= kth) & allowed) | ~allowed.any(-1, keepdim=True)  # rows with no allowed key: as they were
    return torch.zeros_like(scores).masked_fill(~keep, -torch.inf)


@contextlib.contextmanager
def eager_topk(model, k):
    """Run ``model`` with its own eager attention, top-``k`` masked per row (see the module docstring).

    ``k``: an int for every attention module, or ``{module: int or (k per query head, None: exact)}``
    (modules not named run plain eager attention).
    """
    configs = _configs(model)
    old = [c._attn_implementation_internal for c in configs]
    patched = {}
    for module in model.modules():
        mod = sys.modules[type(module).__module__]
        if "eager_attention_forward" in vars(mod) and mod not in patched:
            patched[mod] = mod.eager_attention_forward

    def wrap(original):
        def forward(module, query, key, value, attention_mask, *args, **kwargs):
            spec = k if isinstance(k, int) else k.get(module)
            if spec is None:
                return original(module, query, key, value, attention_mask, *args, **kwargs)
            # models pass scaling, dropout, softcap by keyword; their positional order differs
            assert not args, f"{type(module).__name__} passes {len(args)} positional arguments to eager attention"
            per_head = (spec,) * query.shape[1] if isinstance(spec, int) else spec
            scaling = kwargs.get("scaling")
            extra = torch.zeros(()).expand(*query.shape[:-1], key.shape[-2]).clone()
            for head, kh in enumerate(per_head):
                if kh is not None:
                    extra[:, head] = _topk_extra_mask(module, query, key, attention_mask, scaling, kh,
                                                      kwargs.get("softcap"), kwargs.get("position_bias"))[:, head]
            if attention_mask is None:
                mask = extra
            elif attention_mask.dtype == torch.bool:
                mask = attention_mask[..., : key.shape[-2]] & (extra == 0)
            else:
                mask = attention_mask[..., : key.shape[-2]] + extra
            return original(module, query, key, value, mask, *args, **kwargs)

        return forward

    try:
        for c in configs:
            c._attn_implementation_internal = "eager"
        for mod, original in patched.items():
            mod.eager_attention_forward = wrap(original)
        yield model
    finally:
        for mod, original in patched.items():
            mod.eager_attention_forward = original
        for c, o in zip(configs, old):
            c._attn_implementation_internal = o


# --------------------------------------------------------------------------- the feed-forward reference

#: Names of MLP output projections, whose input is the hidden activation h.
W_OUT = ("down_proj", "c_proj", "fc2", "wo", "lin2", "Wo", "fc_out", "dense_4h_to_h")


def _is_relu(module):
    probe = torch.linspace(-3, 3, 61)
    return torch.allclose(module(probe), F.relu(probe))


def mlp_outputs(model):
    """``[(name, w_out module, by_value)]`` for each MLP's output projection (not attention, not experts)."""
    found = []
    for name, mlp in model.named_modules():
        if any(s in name.split(".")[-1].lower() for s in ("attn", "attention", "mamba")) or "vision" in name:
            continue
        if isinstance(getattr(mlp, "intermediate", None), nn.Module) and hasattr(mlp, "output"):  # BERT-style
            found.append((f"{name}.output.dense", mlp.output.dense, _is_relu(mlp.intermediate.intermediate_act_fn)))
            continue
        for child_name in W_OUT:
            w_out = getattr(mlp, child_name, None)
            if isinstance(w_out, (nn.Linear, tf.pytorch_utils.Conv1D)) and mlp is not model:
                acts = [m for n, m in mlp.named_children() if "act" in n.lower()]
                gated = any(hasattr(mlp, g) for g in ("gate_proj", "wi_0", "gate_up_proj")) or "Wi" in dict(
                    mlp.named_children()) and type(mlp).__name__.startswith("ModernBert")
                found.append((f"{name}.{child_name}", w_out, not gated and bool(acts) and _is_relu(acts[0])))
                break
    return found


@contextlib.contextmanager
def dense_topk_mlp(model, k, layers=None):
    """Keep the top-``k`` hidden units of every MLP (and routed expert) of ``model``, densely.

    ``layers``: only the MLPs under these block names (e.g. ``"model.layers.1."``).
    """
    handles, experts, routed = [], [], set(_routed_experts(model))
    want = (lambda n: True) if layers is None else (lambda n: any(n.startswith(p) for p in layers))
    for name, w_out, by_value in mlp_outputs(model):
        if want(name):
            handles.append(w_out.register_forward_pre_hook(
                lambda m, args, bv=by_value: (keep_topk(args[0], k, by_magnitude=not bv),) + args[1:]))
    for name, module in model.named_modules():
        if name in routed and want(name):
            if not hasattr(module, "act_fn"):  # e.g. GPT-OSS's clamped, interleaved SwiGLU
                raise NotImplementedError(f"no dense reference for the experts of {type(module).__name__}")
            experts.append(module)
            module.forward = routed_experts_reference(module, k)
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        for module in experts:
            del module.forward


def _block(name):
    """The block a module belongs to: its name up to the first list index (``model.layers.1``)."""
    parts = name.split(".")
    i = next(i for i, p in enumerate(parts) if p.isdigit())
    return ".".join(parts[: i + 1])


def _calls_registry(module):
    forward = inspect.unwrap(type(module).forward)
    return "ALL_ATTENTION_FUNCTIONS" in getattr(getattr(forward, "__code__", None), "co_names", ())


def layers(model):
    """``[(block name, [attention modules])]`` in the order a user numbers layers (encoder first).

    The text model's blocks only: a vision tower beside a language model is not numbered.
    """
    out = {}
    for name, module in model.named_modules():
        if _calls_registry(module) and "vision_tower" not in name:
            out.setdefault(_block(name), []).append(module)
    return list(out.items())


def _routed_experts(model):
    """Names of the 3D routed-expert modules (``gate_up_proj`` a parameter) of ``model``."""
    return [name for name, module in model.named_modules()
            if isinstance(getattr(module, "gate_up_proj", None), nn.Parameter)]


def ff_blocks(model):
    """The blocks holding an MLP or routed experts, in layer order (as :func:`layers` numbers them)."""
    names = [name for name, _, _ in mlp_outputs(model)] + _routed_experts(model)
    order = {block: i for i, (block, _) in enumerate(layers(model))}
    return sorted(dict.fromkeys(_block(name) for name in names), key=lambda b: order.get(b, len(order)))
