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
# For every layer and head of SmolLM2-135M (Moby Dick) and all-MiniLM-L6-v2 (State of the
# Union), one forward pass with exact attention records, for k from 1 to L: the attention
# mass the top k keys keep, the head's relative output error ‖o_k − o‖/‖o‖ and
# KL(p_k‖p) = −log(mass kept). We then compare top-k with other ways of spending k keys per
# query (sliding window, random keys, sink + window, Performer features), switch one layer at
# a time to top-k to see which layers matter for the next-token distribution, and repeat the
# measurement at 512, 1024 and 4096 tokens. All numbers below are printed by this run.

# %% tags=["parameters"]
QUICK = False  # small inputs and few layers for the CI smoke run
DECODER = "smollm2-135m"  # decoder to analyse (load_model name, local dir or hub id)
ENCODER = "minilm-l6"  # encoder to analyse
LENGTH = 1024  # tokens of Moby Dick per SmolLM2 input
ENCODER_LENGTH = 256  # tokens of a State of the Union speech per MiniLM input (at most 512)
CONTEXT_LENGTHS = [512, 1024, 4096]  # SmolLM2 input lengths for the context-length comparison
KS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]  # ks measured (log-spaced)
HEATMAP_KS = [16, 64]  # ks of the layer x head heatmaps
APPROX_LAYERS = [1, 8, 15, 22, 29]  # SmolLM2 layers for the comparison of approximations
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
from topk_lib.experiments.inputs import analysis_inputs, cached_attention_stats
from topk_lib.tasks.lm import token_windows
from topk_lib.plots.analysis import plot_bars, plot_layer_head_heatmaps, plot_panels_vs_k
from topk_lib.plots.style import save_figure
from topk_lib.infra.cache import cached_frame

torch.set_num_threads(THREADS)
if QUICK:
    LENGTH, ENCODER_LENGTH, CONTEXT_LENGTHS = 128, 64, [64, 128]
    KS, APPROX_LAYERS = [1, 4, 16, 64], [1, 15]
decoder, decoder_tokenizer = load_model(DECODER)
encoder, encoder_tokenizer = load_model(ENCODER)
TEXT, decoder_text, ids, ENCODER_TEXT, encoder_ids = analysis_inputs(
    decoder_tokenizer, encoder_tokenizer, length=LENGTH, encoder_length=ENCODER_LENGTH, quick=QUICK)
config = {"decoder": DECODER, "text": TEXT, "ks": KS}

# %% [markdown]
# ## Mass kept, output error and KL against k, per layer

# %%
decoder_stats = cached_attention_stats(decoder, ids, model_name=DECODER, text_name=TEXT, ks=KS)
encoder_stats = cached_attention_stats(encoder, encoder_ids, model_name=ENCODER, text_name=ENCODER_TEXT,
                                       ks=[k for k in KS if k <= encoder_ids.shape[1]])
panels = {"mass_kept": "attention mass kept", "rel_error": "relative output error", "kl": "KL(p_k‖p) (nats)"}
for name, stats, tokens in (("smollm2", decoder_stats, LENGTH), ("minilm", encoder_stats, encoder_ids.shape[1])):
    shown = stats[(stats.bucket == "all") & ~(stats.k >= tokens)]  # k >= L is exact: error 0 has no log
    fig = plot_panels_vs_k(shown, panels=panels, logy=("rel_error", "kl"),
                           title=f"{name}: top-k vs exact attention per layer ({tokens} tokens; median over heads, IQR band)")
    save_figure(fig, f"01_{name}_error_vs_k")

# %%
summary = (
    decoder_stats.query("bucket == 'all' and metric in ['mass_kept', 'rel_error']")
    .groupby(["metric", "k"]).value.agg(["median", "min", "max"])
)
summary.round(4)

# %%
mass, error = summary.loc["mass_kept"], summary.loc["rel_error"]  # rows: k; columns: median, min, max over heads
print(
    f"Caption: on SmolLM2 ({LENGTH} tokens of {TEXT}), the median head keeps "
    f"{mass.loc[16, 'median']:.1%} of its attention mass at k=16 and {mass.loc[64, 'median']:.1%} at k=64; "
    f"the worst head keeps {mass.loc[64, 'min']:.1%} at k=64. The median relative output error is "
    f"{error.loc[16, 'median']:.3f} at k=16 and {error.loc[64, 'median']:.3f} at k=64."
)

# %% [markdown]
# ## Where the error is: layer × head at fixed k

# %%
for name, stats in (("smollm2", decoder_stats), ("minilm", encoder_stats)):
    heat = {
        f"k = {k}": stats.query(f"bucket == 'all' and metric == 'rel_error' and k == {k}").pivot(index="layer", columns="head", values="value")
        for k in HEATMAP_KS
    }
    fig = plot_layer_head_heatmaps(heat, title=f"{name}: relative output error of each head", cbar_label="‖o_k − o‖/‖o‖", vmin=0)
    save_figure(fig, f"01_{name}_error_heatmap")

# %% [markdown]
# ## Top-k against other ways of spending k keys per query (SmolLM2)

# %%
records = record_qkv(decoder, ids, layers=APPROX_LAYERS)
approx = cached_frame(
    "smollm2_approximations", folder="01_approximation", config={**config, "length": LENGTH, "layers": APPROX_LAYERS, "budgets": APPROX_BUDGETS},
    compute=functools.partial(approximation_errors, records, budgets=APPROX_BUDGETS),
)
fig = plot_bars(approx, x="method", y="relative_error", hue="budget", logy=True, xlabel="method (same budget per query)",
                ylabel="relative output error (mean over heads)", title=f"SmolLM2 layers {APPROX_LAYERS}: error at equal budget")
save_figure(fig, "01_smollm2_approximations")
approx_table = approx.groupby(["budget", "method"]).relative_error.median().unstack(0)
approx_table.round(4)

# %%
for budget in APPROX_BUDGETS:
    best_other = approx_table.drop(index="topk")[budget]
    print(f"Caption: at {budget} keys per query, top-k's median head error is {approx_table.loc['topk', budget]:.3f}; "
          f"the best other method ({best_other.idxmin()}) reaches {best_other.min():.3f}, "
          f"{best_other.min() / approx_table.loc['topk', budget]:.1f}× worse.")

# %% [markdown]
# ## Which layers are sensitive? One layer at a time at k = SENSITIVITY_K

# %%
sensitivity = cached_frame(
    "smollm2_layer_sensitivity", folder="01_approximation", config={**config, "length": LENGTH, "k": SENSITIVITY_K},
    compute=functools.partial(layer_sensitivity, decoder, ids, k=SENSITIVITY_K),
)
fig = plot_bars(sensitivity, x="layer", y="kl", logy=True, xlabel="layer switched to top-k (all others exact)",
                ylabel="KL(vanilla ‖ top-k) of next-token distribution (nats)",
                title=f"SmolLM2: sensitivity of the output to top-{SENSITIVITY_K} in one layer")
save_figure(fig, "01_smollm2_layer_sensitivity")
worst = sensitivity.sort_values("kl", ascending=False).head(3)
print(f"Caption: the most sensitive layers are {worst.layer.tolist()} (KL {worst.kl.round(4).tolist()} nats); "
      f"the median layer gives {sensitivity.kl.median():.4f} nats and keeps the top-1 token at "
      f"{sensitivity.top1_agreement.median():.1%} of positions.")

# %% [markdown]
# ## Does the k needed grow with context length? (SmolLM2)

# %%
by_length = pd.concat([
    cached_attention_stats(decoder, token_windows(decoder_tokenizer, decoder_text, window=length, n_windows=1),
                           model_name=DECODER, text_name=TEXT, ks=KS).assign(length=length)
    for length in CONTEXT_LENGTHS
])
fig = plot_panels_vs_k(by_length[(by_length.bucket == "all") & ~(by_length.k >= by_length.length)], panels={"mass_kept": "attention mass kept", "rel_error": "relative output error"},
                       hue="length", logy=("rel_error",), title="SmolLM2: the same heads at different input lengths (median over all heads)")
save_figure(fig, "01_smollm2_context_length")
k99 = by_length.query("bucket == 'all' and metric == 'k99_median'").groupby("length").value.median()
print("Caption: median over heads of the per-head median k for 99 % of the mass, by input length: "
      + ", ".join(f"{length} tokens → {value:.0f}" for length, value in k99.items()))
