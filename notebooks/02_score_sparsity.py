# ---
# jupyter:
#   kernelspec:
#     display_name: topk-lab
#     language: python
#     name: topk-lab
# ---

# %% [markdown]
# # 02 · How sparse is attention, per layer and head?
#
# Top-k works when each query's attention is concentrated on few keys. From one exact
# forward pass per model (the decoders SmolLM2-135M and Gemma-3-270M on Moby Dick, the
# encoder all-MiniLM-L6-v2 on State of the Union) we map, for every layer and head: the entropy of the attention rows, the k that keeps 90 %
# and 99 % of the mass, and the mass on the first token (the attention sink); how the k needed
# grows with query position; how sparse the feed-forward activations are; one head in detail;
# and a per-head budget (the k that keeps 99 % of each head's mass) that notebook 03 evaluates.
# The statistics are shared with notebook 01 through the result cache. In Gemma-3's
# sliding-window layers a query sees at most 512 keys, so their k for 99 % can never exceed
# 512: the maps say which layers those are.

# %% tags=["parameters"]
QUICK = False  # small inputs for the CI smoke run
DECODERS = ["smollm2-135m", "gemma3-270m"]  # decoders to analyse (load_model names, local dirs or hub ids)
ENCODER = "minilm-l6"  # encoder to analyse
DEVICE = "auto"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:1"
DTYPE = "auto"  # "auto" (bfloat16 on CUDA, float32 on the CPU), "float32", "bfloat16", "float16"
LENGTH = 1024  # tokens of Moby Dick per decoder input (same as notebook 01 to share its cache)
ENCODER_LENGTH = 256  # tokens of a State of the Union speech for the encoder
KS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]  # ks measured (as in notebook 01)
FF_FRACTIONS = [0.03125, 0.0625, 0.125, 0.25, 0.5]  # feed-forward ks for the neuron-usage count, as shares of d_ff
FF_WINDOWS = 8  # windows of LENGTH tokens over which feed-forward usage is counted
DRILL_DEPTH = 0.4  # layer of the drill-down at this fraction of the depth; its head: the one of median k99
DRILL_TOKENS = 40  # tokens of the drill-down input
DRILL_K = 4  # k marked in the drill-down
BUDGET_AVERAGE_KS = [8, 16, 32, 64]  # averages the per-head budget is rescaled to
THREADS = 2  # torch threads

# %%
from topk_lib.infra.outputs import notebook_setup

notebook_setup("02_score_sparsity", globals())  # checks the values above; says where this run writes

# %%
import torch

from topk_lib import load_model
from topk_lib.analysis.approximations import attention_probs, record_qkv
from topk_lib.analysis.budget import per_head_budget, save_budget
from topk_lib.analysis.capture import bucket_bounds
from topk_lib.analysis.mlp import record_mlp_stats
from topk_lib.experiments.choices import ff_ks, layer_at, median_head, model_label, model_shape, model_tag
from topk_lib.experiments.inputs import analysis_inputs, cached_attention_stats
from topk_lib.tasks.lm import token_windows
from topk_lib.plots.analysis import plot_bars, plot_head_drilldown, plot_k_vs_position, plot_layer_head_heatmaps
from topk_lib.plots.style import save_figure
from topk_lib.app.explorer import kept_mask
from topk_lib.infra import paths
from topk_lib.infra.outputs import model_folder

# %%
torch.set_num_threads(THREADS)
if QUICK:
    LENGTH, ENCODER_LENGTH, KS, FF_FRACTIONS, FF_WINDOWS, DRILL_TOKENS = 128, 64, [1, 4, 16, 64], [0.03125, 0.25], 2, 24
decoders = {name: load_model(name, device=DEVICE, dtype=DTYPE) for name in DECODERS}  # name -> (model, tokenizer)
encoder, encoder_tokenizer = load_model(ENCODER, device=DEVICE, dtype=DTYPE)
inputs = {name: analysis_inputs(tok, encoder_tokenizer, length=LENGTH, encoder_length=ENCODER_LENGTH, quick=QUICK)
          for name, (_, tok) in decoders.items()}  # name -> (text name, text, ids, encoder text name, encoder ids)
TEXT, _, _, ENCODER_TEXT, encoder_ids = inputs[DECODERS[0]]
shapes = {**{name: model_shape(model) for name, (model, _) in decoders.items()}, ENCODER: model_shape(encoder)}
stats = {name: cached_attention_stats(decoders[name][0], inputs[name][2], model_name=name, text_name=TEXT, ks=KS)
         for name in DECODERS}
stats[ENCODER] = cached_attention_stats(encoder, encoder_ids, model_name=ENCODER, text_name=ENCODER_TEXT,
                                        ks=[k for k in KS if k <= encoder_ids.shape[1]])
tokens = {**{name: inputs[name][2].shape[1] for name in DECODERS}, ENCODER: encoder_ids.shape[1]}

# %% [markdown]
# ## Layer × head maps: entropy, k for 90 % and 99 % of the mass, attention sink

# %%
maps = {"entropy": ("entropy (nats)", ".1f"), "k90_median": ("k for 90 % mass (median row)", ".0f"),
        "k99_median": ("k for 99 % mass (median row)", ".0f"), "sink_mass": ("mass on the first token", ".2f")}
for name, frame in stats.items():
    note = shapes[name].window_note(tokens[name])
    for metric, (label, fmt) in maps.items():
        table = frame.query(f"bucket == 'all' and metric == '{metric}'").pivot(index="layer", columns="head", values="value")
        fig = plot_layer_head_heatmaps({model_label(name): table}, title=f"{model_label(name)}: {label}"
                                       + (f"\n{note}" if note else ""), cbar_label=label, fmt=fmt)
        save_figure(fig, f"02_{model_tag(name)}_{metric}")

# %%
per_head = {name: frame.query("bucket == 'all'").pivot_table(index=["layer", "head"], columns="metric", values="value")
            for name, frame in stats.items()}
for name in DECODERS:
    heads = per_head[name]
    print(
        f"Caption ({model_label(name)}, {LENGTH} tokens): across {len(heads)} heads the median head needs k = "
        f"{heads.k90_median.median():.0f} keys for 90 % and k = {heads.k99_median.median():.0f} for 99 % of its mass "
        f"(the hungriest head: k99 = {heads.k99_median.max():.0f}, layer {heads.k99_median.idxmax()[0]} head "
        f"{heads.k99_median.idxmax()[1]}). {(heads.sink_mass > 0.5).mean():.0%} of heads put more than half "
        f"of their mass on the first token."
    )
    windowed = heads.index.get_level_values("layer").isin(list(shapes[name].windows))
    if windowed.any() and not windowed.all():
        print(f"  in the layers that see the whole input the median k99 is {heads.k99_median[~windowed].median():.0f}, "
              f"in the sliding-window layers {heads.k99_median[windowed].median():.0f}")
encoder_head = per_head[ENCODER]
print(f"Caption ({model_label(ENCODER)}, {encoder_ids.shape[1]} tokens): median k99 over heads "
      f"{encoder_head.k99_median.median():.0f}, median entropy {encoder_head.entropy.median():.2f} nats, "
      f"median sink mass {encoder_head.sink_mass.median():.2f}.")

# %% [markdown]
# ## Does the k needed grow with query position? (decoders)

# %%
for name in DECODERS:
    by_position = stats[name].query("bucket != 'all' and metric == 'k99_median'").copy()
    by_position["position"] = [bucket_bounds(b)[0] for b in by_position.bucket]
    fig = plot_k_vs_position(by_position, y_label="k for 99 % mass (median row, median head)",
                             title=f"{model_label(name)}: k needed against query position, per layer")
    save_figure(fig, f"02_{model_tag(name)}_k99_vs_position")
    trend = by_position.groupby("position").value.median()
    print(f"Caption: {model_label(name)}, median over heads of k99 by query position: "
          + ", ".join(f"{int(p)}+ → {v:.0f}" for p, v in trend.items()))

# %% [markdown]
# ## Feed-forward sparsity per layer

# %%
for name, (model, tokenizer) in decoders.items():
    d_ff = shapes[name].d_ff
    ff_windows = token_windows(tokenizer, inputs[name][1], window=LENGTH, n_windows=FF_WINDOWS)  # [W, L]
    with record_mlp_stats(model, ks=ff_ks(FF_FRACTIONS, d_ff), progress=False) as recorder:
        for window in ff_windows:
            recorder.run(window[None])
    ff = recorder.stats()
    ff_frame = ff.frame
    fig = plot_bars(ff_frame.query("metric in ['k90_median', 'k99_median']"), x="layer", y="value", hue="metric",
                    xlabel="layer", ylabel="hidden units for the share of Σ|h| (median token)",
                    title=f"{model_label(name)} feed-forward: units needed per token (of {d_ff}), {FF_WINDOWS}×{LENGTH} tokens")
    save_figure(fig, f"02_{model_tag(name)}_ff_sparsity")
    neurons = ff_frame.query("metric == 'neuron_usage'")
    fig = plot_bars(neurons, x="layer", y="value", hue="k", xlabel="layer", ylabel=f"share of the {d_ff} units ever in the top k",
                    title=f"{model_label(name)} feed-forward: units ever selected over {ff.tokens} tokens")
    save_figure(fig, f"02_{model_tag(name)}_ff_neuron_usage")
    ff_k99 = ff_frame.query("metric == 'k99_median'").set_index("layer").value
    print(f"Caption: a {model_label(name)} token needs a median of {ff_k99.median():.0f} of {d_ff} hidden units for 99 % "
          f"of Σ|h| (from {ff_k99.min():.0f} in layer {ff_k99.idxmin()} to {ff_k99.max():.0f} in layer {ff_k99.idxmax()}); "
          + "; ".join(f"at k = {int(k)}, {g.value.mean():.0%} of units are ever selected (mean over layers)"
                      for k, g in neurons.groupby("k")))

# %% [markdown]
# ## One head in detail
#
# The layer at DRILL_DEPTH of each decoder's depth, and in it the head whose k for 99 % of
# the mass is the median of the layer's heads: a typical head, not a chosen one.

# %%
for name, (model, tokenizer) in decoders.items():
    layer = layer_at(shapes[name].n_layers, DRILL_DEPTH)
    head = median_head(stats[name], layer)
    drill_ids = token_windows(tokenizer, inputs[name][1], window=DRILL_TOKENS, n_windows=1)  # [1, T]
    q, k, _ = record_qkv(model, drill_ids, layers=[layer])[layer]
    probs = attention_probs(q.float(), k.float())[0, head].cpu()  # [T, T]
    kept = kept_mask(probs, DRILL_K, causal=True)  # [T, T] bool: each row's top-k keys
    labels = [tokenizer.decode([t]).replace("\n", "⏎") for t in drill_ids[0]]
    fig = plot_head_drilldown(probs.numpy(), kept.numpy(), labels,
                              title=f"{model_label(name)} layer {layer} head {head}: attention, top-{DRILL_K} outlined")
    save_figure(fig, f"02_{model_tag(name)}_head_drilldown")
    mass = (probs * kept).sum(-1)
    print(f"Caption: on this {drill_ids.shape[1]}-token input, the top {DRILL_K} keys of {model_label(name)} layer {layer} "
          f"head {head} keep a median {mass.median():.1%} of each row's mass (minimum {mass.min():.1%}).")

# %% [markdown]
# ## A per-head budget for use_topk
#
# Each head gets the k that keeps 99 % of its mass on the median row, and the same
# proportions rescaled to a given average k. Notebook 03 compares these budgets with a uniform
# k at the same average. The files are regenerated (and replaced) by each full run.

# %%
for name in DECODERS:
    k99_table = per_head[name].reset_index()[["layer", "head", "k99_median"]]
    budget = per_head_budget(k99_table, value="k99_median")
    stem = paths.results() / f"{model_folder(name)}_head_budget"
    written = [save_budget(budget, stem.with_name(stem.name + ".json"), overwrite=True, model=name, text=TEXT,
                           tokens=LENGTH, statistic="k99 median row")]
    for average in BUDGET_AVERAGE_KS:
        scaled = per_head_budget(k99_table, value="k99_median", average_k=average)
        written.append(save_budget(scaled, stem.with_name(f"{stem.name}_avg{average}.json"), overwrite=True, model=name,
                                   text=TEXT, tokens=LENGTH, statistic="k99 median row", scaled_to=average))
    print(f"{model_label(name)}: (re)written", ", ".join(p.name for p in written))
    print(f"Caption: the k99 budget averages {sum(budget.values()) / len(budget):.1f} keys per head "
          f"(min {min(budget.values())}, max {max(budget.values())}).")
