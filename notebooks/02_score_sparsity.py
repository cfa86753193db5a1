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
# forward pass per model (SmolLM2-135M on Moby Dick, all-MiniLM-L6-v2 on State of the Union)
# we map, for every layer and head: the entropy of the attention rows, the k that keeps 90 %
# and 99 % of the mass, and the mass on the first token (the attention sink); how the k needed
# grows with query position; how sparse the feed-forward activations are; one head in detail;
# and a per-head budget (the k that keeps 99 % of each head's mass) that notebook 03 evaluates.
# The statistics are shared with notebook 01 through the result cache.

# %% tags=["parameters"]
QUICK = False  # small inputs for the CI smoke run
DECODER = "smollm2-135m"  # decoder to analyse
ENCODER = "minilm-l6"  # encoder to analyse
LENGTH = 1024  # tokens of Moby Dick per SmolLM2 input (same as notebook 01 to share its cache)
ENCODER_LENGTH = 256  # tokens of a State of the Union speech for MiniLM
KS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]  # ks measured (as in notebook 01)
FF_KS = [48, 96, 192, 384, 768]  # feed-forward ks for the neuron-usage count (of 1536)
FF_WINDOWS = 8  # windows of LENGTH tokens over which feed-forward usage is counted
DRILL_LAYER = 12  # layer of the drill-down head
DRILL_HEAD = 4  # head of the drill-down head
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
from topk_lib.analysis.mlp import NeuronUsage, record_mlp_stats
from topk_lib.experiments.inputs import analysis_inputs, cached_attention_stats
from topk_lib.tasks.lm import token_windows
from topk_lib.plots.analysis import plot_bars, plot_head_drilldown, plot_k_vs_position, plot_layer_head_heatmaps
from topk_lib.plots.style import save_figure
from topk_lib.app.explorer import kept_mask
from topk_lib.infra import paths

torch.set_num_threads(THREADS)
if QUICK:
    LENGTH, ENCODER_LENGTH, KS, FF_KS, FF_WINDOWS, DRILL_TOKENS = 128, 64, [1, 4, 16, 64], [48, 384], 2, 24
decoder, decoder_tokenizer = load_model(DECODER)
encoder, encoder_tokenizer = load_model(ENCODER)
TEXT, decoder_text, ids, ENCODER_TEXT, encoder_ids = analysis_inputs(
    decoder_tokenizer, encoder_tokenizer, length=LENGTH, encoder_length=ENCODER_LENGTH, quick=QUICK)
decoder_stats = cached_attention_stats(decoder, ids, model_name=DECODER, text_name=TEXT, ks=KS)
encoder_stats = cached_attention_stats(encoder, encoder_ids, model_name=ENCODER, text_name=ENCODER_TEXT,
                                       ks=[k for k in KS if k <= encoder_ids.shape[1]])

# %% [markdown]
# ## Layer × head maps: entropy, k for 90 % and 99 % of the mass, attention sink

# %%
maps = {"entropy": ("entropy (nats)", ".1f"), "k90_median": ("k for 90 % mass (median row)", ".0f"),
        "k99_median": ("k for 99 % mass (median row)", ".0f"), "sink_mass": ("mass on the first token", ".2f")}
for name, stats in (("smollm2", decoder_stats), ("minilm", encoder_stats)):
    for metric, (label, fmt) in maps.items():
        table = stats.query(f"bucket == 'all' and metric == '{metric}'").pivot(index="layer", columns="head", values="value")
        fig = plot_layer_head_heatmaps({name: table}, title=f"{name}: {label}", cbar_label=label, fmt=fmt)
        save_figure(fig, f"02_{name}_{metric}")

# %%
per_head = decoder_stats.query("bucket == 'all'").pivot_table(index=["layer", "head"], columns="metric", values="value")
print(
    f"Caption (SmolLM2, {LENGTH} tokens): across {len(per_head)} heads the median head needs k = "
    f"{per_head.k90_median.median():.0f} keys for 90 % and k = {per_head.k99_median.median():.0f} for 99 % of its mass "
    f"(the hungriest head: k99 = {per_head.k99_median.max():.0f}, layer {per_head.k99_median.idxmax()[0]} head "
    f"{per_head.k99_median.idxmax()[1]}). {(per_head.sink_mass > 0.5).mean():.0%} of heads put more than half "
    f"of their mass on the first token."
)
encoder_head = encoder_stats.query("bucket == 'all'").pivot_table(index=["layer", "head"], columns="metric", values="value")
print(f"Caption (MiniLM, {encoder_ids.shape[1]} tokens): median k99 over heads {encoder_head.k99_median.median():.0f}, "
      f"median entropy {encoder_head.entropy.median():.2f} nats, median sink mass {encoder_head.sink_mass.median():.2f}.")

# %% [markdown]
# ## Does the k needed grow with query position? (SmolLM2)

# %%
by_position = decoder_stats.query("bucket != 'all' and metric == 'k99_median'").copy()
by_position["position"] = [bucket_bounds(b)[0] for b in by_position.bucket]
fig = plot_k_vs_position(by_position, y_label="k for 99 % mass (median row, median head)",
                         title="SmolLM2: k needed against query position, per layer")
save_figure(fig, "02_smollm2_k99_vs_position")
trend = by_position.groupby("position").value.median()
print("Caption: median over heads of k99 by query position: "
      + ", ".join(f"{int(p)}+ → {v:.0f}" for p, v in trend.items()))

# %% [markdown]
# ## Feed-forward sparsity per layer

# %%
ff_windows = token_windows(decoder_tokenizer, decoder_text, window=LENGTH, n_windows=FF_WINDOWS)  # [W, L]
usage = NeuronUsage()
with record_mlp_stats(decoder, ks=FF_KS, progress=False) as recorder:
    for window in ff_windows:
        recorder.run(window[None])
ff = recorder.stats()
usage.update(ff)
ff_frame = ff.frame
ff_layers = ff_frame.query("metric in ['k90_median', 'k99_median']")
fig = plot_bars(ff_layers, x="layer", y="value", hue="metric", xlabel="layer",
                ylabel="hidden units for the share of Σ|h| (median token)",
                title=f"SmolLM2 feed-forward: units needed per token (of 1536), {FF_WINDOWS}×{LENGTH} tokens")
save_figure(fig, "02_smollm2_ff_sparsity")
neurons = ff_frame.query("metric == 'neuron_usage'")
fig = plot_bars(neurons, x="layer", y="value", hue="k", xlabel="layer", ylabel="share of the 1536 units ever in the top k",
                title=f"SmolLM2 feed-forward: units ever selected over {ff.tokens} tokens")
save_figure(fig, "02_smollm2_ff_neuron_usage")
ff_k99 = ff_frame.query("metric == 'k99_median'").set_index("layer").value
print(f"Caption: a SmolLM2 token needs a median of {ff_k99.median():.0f} of 1536 hidden units for 99 % of Σ|h| "
      f"(from {ff_k99.min():.0f} in layer {ff_k99.idxmin()} to {ff_k99.max():.0f} in layer {ff_k99.idxmax()}); "
      + "; ".join(f"at k = {int(k)}, {g.value.mean():.0%} of units are ever selected (mean over layers)"
                  for k, g in neurons.groupby("k")))

# %% [markdown]
# ## One head in detail

# %%
drill_ids = token_windows(decoder_tokenizer, decoder_text, window=DRILL_TOKENS, n_windows=1)  # [1, T]
q, k, _ = record_qkv(decoder, drill_ids, layers=[DRILL_LAYER])[DRILL_LAYER]
probs = attention_probs(q, k)[0, DRILL_HEAD]  # [T, T]
kept = kept_mask(probs, DRILL_K, causal=True)  # [T, T] bool: each row's top-k keys
tokens = [decoder_tokenizer.decode([t]).replace("\n", "⏎") for t in drill_ids[0]]
fig = plot_head_drilldown(probs.numpy(), kept.numpy(), tokens,
                          title=f"SmolLM2 layer {DRILL_LAYER} head {DRILL_HEAD}: attention, top-{DRILL_K} outlined")
save_figure(fig, "02_smollm2_head_drilldown")
mass = (probs * kept).sum(-1)
print(f"Caption: on this {DRILL_TOKENS}-token input, the top {DRILL_K} keys of layer {DRILL_LAYER} head {DRILL_HEAD} "
      f"keep a median {mass.median():.1%} of each row's mass (minimum {mass.min():.1%}).")

# %% [markdown]
# ## A per-head budget for use_topk
#
# Each head gets the k that keeps 99 % of its mass on the median row, and the same
# proportions rescaled to a given average k. Notebook 03 compares these budgets with a uniform
# k at the same average. The files are regenerated (and replaced) by each full run.

# %%
k99_table = per_head.reset_index()[["layer", "head", "k99_median"]]
budget = per_head_budget(k99_table, value="k99_median")
budget_dir = paths.results()
paths_written = [save_budget(budget, budget_dir / f"{DECODER}_head_budget.json", overwrite=True, model=DECODER,
                             text=TEXT, tokens=LENGTH, statistic="k99 median row")]
for average in BUDGET_AVERAGE_KS:
    scaled = per_head_budget(k99_table, value="k99_median", average_k=average)
    paths_written.append(save_budget(scaled, budget_dir / f"{DECODER}_head_budget_avg{average}.json", overwrite=True,
                                     model=DECODER, text=TEXT, tokens=LENGTH, statistic="k99 median row", scaled_to=average))
print("(Re)written:", ", ".join(p.name for p in paths_written))
print(f"Caption: the k99 budget averages {sum(budget.values()) / len(budget):.1f} keys per head "
      f"(min {min(budget.values())}, max {max(budget.values())}).")
