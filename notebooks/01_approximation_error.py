# ---
# jupyter:
#   kernelspec:
#     display_name: topk-lab
#     language: python
#     name: topk-lab
# ---

# %% [markdown]
# # 01 · How well does top-k approximate attention on real models?
#
# For every layer and head of two decoders, SmolLM2-135M and Gemma-3-270M (Moby Dick), and
# of the encoder all-MiniLM-L6-v2 (State of the Union), one forward pass with exact
# attention records, for k from 1 to L: the attention
# mass the top k keys keep, the head's relative output error ‖o_k − o‖/‖o‖ and
# KL(p_k‖p) = −log(mass kept). We then compare top-k with other ways of spending k keys per
# query (sliding window, random keys, sink + window, Performer features), switch one layer at
# a time to top-k to see which layers matter for the next-token distribution, and repeat the
# measurement at 512, 1024 and 4096 tokens. Gemma-3 attends within a 512-token sliding
# window in five of every six layers: there a query never has more than 512 keys, so those
# layers need no top-k beyond 512, and the comparison of approximations uses the layers
# that see the whole input. All numbers below are printed by this run.

# %% tags=["parameters"]
QUICK = False  # small inputs and few layers for the CI smoke run
DECODERS = ["smollm2-135m", "gemma3-270m"]  # decoders to analyse (load_model names, local dirs or hub ids)
ENCODER = "minilm-l6"  # encoder to analyse
DEVICE = "auto"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:1"
DTYPE = "auto"  # "auto" (bfloat16 on CUDA, float32 on the CPU), "float32", "bfloat16", "float16"
LENGTH = 1024  # tokens of Moby Dick per decoder input
ENCODER_LENGTH = 256  # tokens of a State of the Union speech per encoder input (at most 512 for MiniLM)
CONTEXT_LENGTHS = [512, 1024, 4096]  # decoder input lengths for the context-length comparison
KS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]  # ks measured (log-spaced)
HEATMAP_KS = [16, 64]  # ks of the layer x head heatmaps
APPROX_LAYER_COUNT = 5  # layers compared per decoder, evenly spread over those that see the whole input
APPROX_BUDGETS = [16, 64]  # keys (or random features) per query
SENSITIVITY_K = 16  # k of the one-layer-at-a-time sensitivity test
THREADS = 2  # torch threads

# %%
from topk_lib.infra.outputs import notebook_setup

notebook_setup("01_approximation_error", globals())  # checks the values above; says where this run writes

# %%
import functools

import pandas as pd
import torch

from topk_lib import load_model
from topk_lib.analysis.approximations import approximation_errors, record_qkv
from topk_lib.analysis.sensitivity import layer_sensitivity
from topk_lib.experiments.choices import model_label, model_shape, model_tag, spread_layers
from topk_lib.experiments.inputs import analysis_inputs, cached_attention_stats
from topk_lib.tasks.lm import token_windows
from topk_lib.plots.analysis import plot_bars, plot_layer_head_heatmaps, plot_panels_vs_k
from topk_lib.plots.style import save_figure
from topk_lib.infra.cache import cached_frame

# %%
torch.set_num_threads(THREADS)
if QUICK:
    LENGTH, ENCODER_LENGTH, CONTEXT_LENGTHS = 128, 64, [64, 128]
    KS, APPROX_LAYER_COUNT = [1, 4, 16, 64], 2
decoders = {name: load_model(name, device=DEVICE, dtype=DTYPE) for name in DECODERS}  # name -> (model, tokenizer)
encoder, encoder_tokenizer = load_model(ENCODER, device=DEVICE, dtype=DTYPE)
inputs = {name: analysis_inputs(tok, encoder_tokenizer, length=LENGTH, encoder_length=ENCODER_LENGTH, quick=QUICK)
          for name, (_, tok) in decoders.items()}  # name -> (text name, text, ids, encoder text name, encoder ids)
TEXT, _, _, ENCODER_TEXT, encoder_ids = inputs[DECODERS[0]]
shapes = {**{name: model_shape(model) for name, (model, _) in decoders.items()}, ENCODER: model_shape(encoder)}
for name, shape in shapes.items():
    print(f"{model_label(name)}: {shape.n_layers} layers, {shape.heads} query heads. {shape.window_note(LENGTH)}")

# %% [markdown]
# ## Mass kept, output error and KL against k, per layer

# %%
stats = {name: cached_attention_stats(decoders[name][0], inputs[name][2], model_name=name, text_name=TEXT, ks=KS)
         for name in DECODERS}
stats[ENCODER] = cached_attention_stats(encoder, encoder_ids, model_name=ENCODER, text_name=ENCODER_TEXT,
                                        ks=[k for k in KS if k <= encoder_ids.shape[1]])
tokens = {**{name: inputs[name][2].shape[1] for name in DECODERS}, ENCODER: encoder_ids.shape[1]}  # with BOS where the model wants one
panels = {"mass_kept": "attention mass kept", "rel_error": "relative output error", "kl": "KL(p_k‖p) (nats)"}
for name, frame in stats.items():
    shown = frame[(frame.bucket == "all") & ~(frame.k >= tokens[name])]  # k >= L is exact: error 0 has no log
    note = shapes[name].window_note(tokens[name])
    fig = plot_panels_vs_k(shown, panels=panels, logy=("rel_error", "kl"),
                           title=f"{model_label(name)}: top-k vs exact attention per layer ({tokens[name]} tokens; "
                                 f"median over heads, IQR band)" + (f"\n{note}" if note else ""))
    save_figure(fig, f"01_{model_tag(name)}_error_vs_k")

# %%
summary = pd.concat({
    model_label(name): stats[name].query("bucket == 'all' and metric in ['mass_kept', 'rel_error']")
    .groupby(["metric", "k"]).value.agg(["median", "min", "max"]) for name in DECODERS})
summary.round(4)

# %%
for name in DECODERS:
    mass, error = summary.loc[model_label(name)].loc["mass_kept"], summary.loc[model_label(name)].loc["rel_error"]
    print(
        f"Caption: on {model_label(name)} ({LENGTH} tokens of {TEXT}), the median head keeps "
        f"{mass.loc[16, 'median']:.1%} of its attention mass at k=16 and {mass.loc[64, 'median']:.1%} at k=64; "
        f"the worst head keeps {mass.loc[64, 'min']:.1%} at k=64. The median relative output error is "
        f"{error.loc[16, 'median']:.3f} at k=16 and {error.loc[64, 'median']:.3f} at k=64."
    )

# %% [markdown]
# ## Where the error is: layer × head at fixed k

# %%
for name, frame in stats.items():
    heat = {
        f"k = {k}": frame.query(f"bucket == 'all' and metric == 'rel_error' and k == {k}").pivot(index="layer", columns="head", values="value")
        for k in HEATMAP_KS
    }
    note = shapes[name].window_note(tokens[name])
    fig = plot_layer_head_heatmaps(heat, title=f"{model_label(name)}: relative output error of each head"
                                   + (f"\n{note}" if note else ""), cbar_label="‖o_k − o‖/‖o‖", vmin=0)
    save_figure(fig, f"01_{model_tag(name)}_error_heatmap")

# %% [markdown]
# ## Top-k against other ways of spending k keys per query (decoders)
#
# The layers compared see the whole input (a sliding-window layer would need its own
# window in every method).

# %%
approx = {}
for name, (model, _) in decoders.items():
    full = shapes[name].full_layers(LENGTH)
    if not full:
        print(f"{model_label(name)}: every layer attends within a window shorter than {LENGTH} tokens; not compared")
        continue
    layers = spread_layers(full, APPROX_LAYER_COUNT)
    records = record_qkv(model, inputs[name][2], layers=layers)
    approx[name] = cached_frame(
        f"{model_tag(name)}_approximations", folder="01_approximation",
        config={"decoder": name, "text": TEXT, "ks": KS, "length": LENGTH, "layers": layers, "budgets": APPROX_BUDGETS},
        compute=functools.partial(approximation_errors, records, budgets=APPROX_BUDGETS))
    fig = plot_bars(approx[name], x="method", y="relative_error", hue="budget", logy=True,
                    xlabel="method (same budget per query)", ylabel="relative output error (mean over heads)",
                    title=f"{model_label(name)} layers {layers}: error at equal budget")
    save_figure(fig, f"01_{model_tag(name)}_approximations")
approx_table = pd.concat({model_label(n): f.groupby(["budget", "method"]).relative_error.median().unstack(0)
                          for n, f in approx.items()})
approx_table.round(4)

# %%
for name in approx:
    table = approx_table.loc[model_label(name)]
    for budget in APPROX_BUDGETS:
        best_other = table.drop(index="topk")[budget]
        print(f"Caption: {model_label(name)}, at {budget} keys per query, top-k's median head error is "
              f"{table.loc['topk', budget]:.3f}; the best other method ({best_other.idxmin()}) reaches "
              f"{best_other.min():.3f}, {best_other.min() / table.loc['topk', budget]:.1f}× worse.")

# %% [markdown]
# ## Which layers are sensitive? One layer at a time at k = SENSITIVITY_K

# %%
for name, (model, _) in decoders.items():
    sensitivity = cached_frame(
        f"{model_tag(name)}_layer_sensitivity", folder="01_approximation",
        config={"decoder": name, "text": TEXT, "ks": KS, "length": LENGTH, "k": SENSITIVITY_K},
        compute=functools.partial(layer_sensitivity, model, inputs[name][2], k=SENSITIVITY_K))
    fig = plot_bars(sensitivity, x="layer", y="kl", logy=True, xlabel="layer switched to top-k (all others exact)",
                    ylabel="KL(vanilla ‖ top-k) of next-token distribution (nats)",
                    title=f"{model_label(name)}: sensitivity of the output to top-{SENSITIVITY_K} in one layer")
    save_figure(fig, f"01_{model_tag(name)}_layer_sensitivity")
    worst = sensitivity.sort_values("kl", ascending=False).head(3)
    print(f"Caption: {model_label(name)}'s most sensitive layers are {worst.layer.tolist()} (KL "
          f"{worst.kl.round(4).tolist()} nats); the median layer gives {sensitivity.kl.median():.4f} nats and keeps "
          f"the top-1 token at {sensitivity.top1_agreement.median():.1%} of positions.")

# %% [markdown]
# ## Does the k needed grow with context length? (decoders)

# %%
for name, (model, tokenizer) in decoders.items():
    by_length = pd.concat([
        cached_attention_stats(model, token_windows(tokenizer, inputs[name][1], window=length, n_windows=1),
                               model_name=name, text_name=TEXT, ks=KS).assign(length=length)
        for length in CONTEXT_LENGTHS
    ])
    note = shapes[name].window_note(max(CONTEXT_LENGTHS))
    fig = plot_panels_vs_k(by_length[(by_length.bucket == "all") & ~(by_length.k >= by_length.length)],
                           panels={"mass_kept": "attention mass kept", "rel_error": "relative output error"},
                           hue="length", logy=("rel_error",), title=f"{model_label(name)}: the same heads at different "
                           f"input lengths (median over all heads)" + (f"\n{note}" if note else ""))
    save_figure(fig, f"01_{model_tag(name)}_context_length")
    k99 = by_length.query("bucket == 'all' and metric == 'k99_median'").groupby("length").value.median()
    print(f"Caption: {model_label(name)}, median over heads of the per-head median k for 99 % of the mass, by input "
          "length: " + ", ".join(f"{length} tokens → {value:.0f}" for length, value in k99.items()))
