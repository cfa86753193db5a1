# ---
# jupyter:
#   kernelspec:
#     display_name: topk-lab
#     language: python
#     name: topk-lab
# ---

# %% [markdown]
# # 00 · Quickstart: top-k attention against exact attention
#
# `topk_attention` keeps, per query, only the k largest scores. On a random batch we
# measure its relative output error ‖o_k − o‖/‖o‖ against PyTorch's exact
# `scaled_dot_product_attention` as k shrinks, for near-uniform attention (random
# Q and K, the hard case) and for peakier attention (scores scaled up), which is
# closer to what trained heads do. Notebooks 01 and 02 measure real models.

# %% tags=["parameters"]
QUICK = False  # small sizes for the CI smoke run
SEED = 0  # random seed of the batch
LENGTH = 2048  # tokens per sequence
HEADS = 8  # attention heads
HEAD_DIM = 64  # dimension per head
SHARPNESS = [1.0, 4.0, 16.0]  # multiplies the scores: 1 is random attention, larger is peakier

# %%
from topk_lib.infra.outputs import notebook_setup

notebook_setup("00_quickstart", globals())  # checks the values above; says where this run writes

# %%
import pandas as pd
import torch
import torch.nn.functional as F

from topk_lib import topk_attention
from topk_lib.analysis.metrics import relative_error
from topk_lib.plots.analysis import plot_error_vs_k
from topk_lib.plots.style import save_figure

if QUICK:
    LENGTH, HEADS = 256, 2
torch.manual_seed(SEED)
KS = [2**i for i in range(int(LENGTH).bit_length()) if 2**i < LENGTH]  # k = L is exact: error 0

# %%
rows = []
for sharpness in SHARPNESS:
    q = torch.randn(1, HEADS, LENGTH, HEAD_DIM) * sharpness  # scores scale linearly with q
    k, v = torch.randn(1, HEADS, LENGTH, HEAD_DIM), torch.randn(1, HEADS, LENGTH, HEAD_DIM)
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    for topk in KS:
        approx = topk_attention(q, k, v, topk=topk, is_causal=True)
        error = relative_error(approx, exact, dim=(-2, -1))  # [1, H]: norms over all rows and features
        rows += [{"sharpness": sharpness, "k": topk, "head": h, "relative_error": e} for h, e in enumerate(error[0].tolist())]
errors = pd.DataFrame(rows)
errors.groupby(["sharpness", "k"]).relative_error.median().unstack(0).round(4)

# %%
fig = plot_error_vs_k(errors, hue="sharpness", title=f"Top-k vs exact attention, random batch (L={LENGTH}, causal)")
print("saved:", ", ".join(str(path) for path in save_figure(fig, "00_quickstart_error_vs_k")))

# %% [markdown]
# **Reading the figure.** Each line is the median over heads (band: min–max) of the
# relative output error. The table above gives the numbers of this run: with random
# scores (sharpness 1) attention is nearly uniform and top-k needs a large k, while
# peakier scores reach a small error at small k. Real heads are far from uniform,
# which is why notebooks 01 and 02 measure on real model activations.
