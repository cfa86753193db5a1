# ---
# jupyter:
#   kernelspec:
#     display_name: topk-lab
#     language: python
#     name: topk-lab
# ---

# %% [markdown]
# # 05 · Training with top-k attention: ListOps from scratch, MiniLM fine-tuning
#
# The paper (section 4) trains models *with* top-k attention and finds they match vanilla
# ones. We test that twice on a CPU. **ListOps** (Long Range Arena): a small pre-LN encoder
# whose attention is `topk_attention` (its memory-efficient backward does the training)
# learns to evaluate nested `[MAX 2 9 [MIN 4 7 ] 0 ]` expressions, for k ∈ {8, 16, 32, 64}
# and exact attention, 3 seeds each, identical data order and budget. **SpamAssassin**:
# all-MiniLM-L6-v2 with a linear head on mean-pooled states is fine-tuned inside
# `use_topk` with attention top-k, feed-forward top-k, or neither; the vanilla models are
# also evaluated under top-k without any training (the *swap*), to see how much training
# with top-k recovers.
#
# **Budget.** Full mode is sized for 60 minutes on the project's 2-core CPU with one torch
# thread: the sizes in the parameters cell come from timing a few training steps of each
# model while other jobs shared the machine (the comments there give those timings). That
# is why the ListOps expressions are short (LRA uses 500–2000 tokens) and the fine-tune is
# a few dozen steps. The last cell prints how long each part of this run took. Finished
# runs are cached under `data/results/training/`, so an interrupted run resumes where it
# stopped and a rerun only redraws the figures. Quick mode (CI) uses tiny data, a few steps
# and one seed.

# %% tags=["parameters"]
QUICK = False  # tiny data, few steps, one seed: the CI smoke run
THREADS = 1  # torch threads; on the shared 2-core CPU two threads contend with other jobs and run far slower
DEVICE = "auto"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:1"
DTYPE = "auto"  # "auto": bfloat16 mixed precision on CUDA, float32 on the CPU; weights and AdamW stay float32
ENCODER = "minilm-l6"  # the pretrained encoder fine-tuned (load_model name, local dir or hub id)
SEEDS = [0, 1, 2]  # seeds of every run (initialisation and data order)
LISTOPS_LENGTH = [64, 128]  # min and max tokens per expression (LRA uses 500-2000)
LISTOPS_SIZES = [10000, 500, 1000]  # train / val / test expressions (LRA: 96k / 2k / 2k)
LISTOPS_KS = [8, 16, 32, 64, None]  # keys kept per query in every layer; None means exact attention
LISTOPS_STEPS = 250  # training steps per run; 0.10-0.21 s/step in the last full run (k 64 slowest)
LISTOPS_BATCH = 32  # expressions per step
LISTOPS_LR = 0.001  # peak AdamW learning rate (10 % warm-up, then linear decay)
LISTOPS_MODEL = {"d_model": 64, "n_heads": 4, "n_layers": 2, "pool": "mean"}  # the small encoder
LISTOPS_EVAL_EVERY = 25  # validation accuracy every this many steps (the learning curves)
LISTOPS_N_EVAL = 300  # validation expressions per evaluation
FT_ATTN_KS = [8, 16, 32]  # attention top-k for fine-tuning (plus exact); MiniLM inputs are 128 tokens
FT_FF_KS = [64, 256]  # feed-forward top-k for fine-tuning (MiniLM has 1536 hidden units)
FT_SWAP_FF_KS = [64, 256]  # feed-forward k for the swap (vanilla-trained, top-k at test only)
FT_STEPS = 20  # fine-tuning steps per run; 18 runs and their swap tests took about 15 min
FT_BATCH = 16  # emails per step
FT_LR = 0.0001  # peak AdamW learning rate
FT_MAX_LENGTH = 128  # tokens per email (subject + body, truncated)
FT_N_TEST = 256  # test emails evaluated (a fixed sample of the test split)

# %%
from topk_lib.infra.outputs import notebook_setup

notebook_setup("05_training", globals())  # checks the values above; says where this run writes

# %%
import time

import torch

from topk_lib import data
from topk_lib.data import listops
from topk_lib.experiments.choices import model_label
from topk_lib.plots.style import save_figure
from topk_lib.experiments.training import finetune, summaries
from topk_lib.experiments.training import listops as listops_training
from topk_lib.plots import training as plots

if QUICK:
    SEEDS = [0]
    LISTOPS_LENGTH, LISTOPS_SIZES = [16, 40], [400, 64, 64]
    LISTOPS_KS = [4, 8, None]
    LISTOPS_STEPS, LISTOPS_BATCH, LISTOPS_EVAL_EVERY, LISTOPS_N_EVAL = 30, 16, 10, 64
    LISTOPS_MODEL = {"d_model": 32, "n_heads": 2, "n_layers": 1, "pool": "mean"}
    FT_ATTN_KS, FT_FF_KS, FT_SWAP_FF_KS = [8], [64], [64]
    FT_STEPS, FT_BATCH, FT_MAX_LENGTH, FT_N_TEST = 2, 4, 32, 16
torch.set_num_threads(THREADS)
started = time.perf_counter()

# %% [markdown]
# ## ListOps data
#
# The generator follows LRA's: operators MAX, MIN, MED, SM (sum mod 10), digits 0–9,
# depth ≤ 10, 2–10 arguments per operator, trees drawn until their length is in range.
# MED of an even count is LRA's `int(np.median(...))`, the mean of the middle two rounded
# down. The table is the label distribution per split; the majority class is the trivial
# baseline.

# %%
data_kw = dict(n_train=LISTOPS_SIZES[0], n_val=LISTOPS_SIZES[1], n_test=LISTOPS_SIZES[2],
               min_length=LISTOPS_LENGTH[0], max_length=LISTOPS_LENGTH[1], seed=0)
splits = listops.listops_splits(**data_kw)
majority_label, majority_acc = listops_training.majority_baseline(splits)
print(f"lengths (tokens): train {splits['train'].length.min()}-{splits['train'].length.max()}, "
      f"mean {splits['train'].length.mean():.0f}; majority label {majority_label} is "
      f"{majority_acc:.1%} of the test split")
splits["train"].head(3)

# %%
(listops.label_distribution(splits) * 100).round(1).T

# %% [markdown]
# ## ListOps: training with top-k from scratch

# %%
train_kw = dict(steps=LISTOPS_STEPS, batch_size=LISTOPS_BATCH, lr=LISTOPS_LR, eval_every=LISTOPS_EVAL_EVERY,
                n_eval=LISTOPS_N_EVAL, model_kw=LISTOPS_MODEL)
t0 = time.perf_counter()
curves, listops_results = listops_training.listops_sweep(ks=LISTOPS_KS, seeds=SEEDS, data_kw=data_kw, train_kw=train_kw,
                                                         device=DEVICE, dtype=DTYPE)
listops_minutes = (time.perf_counter() - t0) / 60
summaries.mean_std_table(listops_results, by="k", value="test_acc")

# %%
references = [(0.364, "LRA paper, vanilla Transformer (36.4 %)"),
              (majority_acc, "majority class")]
fig = plots.plot_learning_curves(curves, references=references,
                                 title=f"ListOps ({LISTOPS_LENGTH[0]}-{LISTOPS_LENGTH[1]} tokens): validation accuracy")
save_figure(fig, "05_listops_curves")

# %%
fig = plots.plot_test_accuracy_vs_k(listops_results, references=references,
                                    title=f"ListOps test accuracy vs k ({len(SEEDS)} seed{'s' if len(SEEDS) > 1 else ''})")
save_figure(fig, "05_listops_accuracy_vs_k")

# %%
print(summaries.listops_summary(listops_results, curves, majority_acc=majority_acc))

# %% [markdown]
# **Reading the ListOps figures.** Each curve is the mean over seeds (band ± 1 std) of the
# validation accuracy; the second figure shows the final model's test accuracy per k with
# ± 1 std error bars and the single seeds. The printout above states, from this run, how
# far each top-k model lands from exact attention compared with the spread over seeds, and
# where all models sit between the majority-class baseline and the LRA paper's 36.4 %
# (which was measured on much longer inputs with a far larger training budget, so it is a
# reference point, not a target here).

# %% [markdown]
# ## SpamAssassin: fine-tuning MiniLM with top-k
#
# The split is fixed by a hash of each email's text (70 % train, 10 % validation, 20 %
# test), so it does not depend on row order and duplicate emails share a split. The input
# is the subject, a blank line, then the body, truncated to `FT_MAX_LENGTH` tokens; the
# other headers are dropped because they identify the mailing lists and dates the ham and
# spam folders were collected from, which a model could learn instead of the content.
# Attention-probability dropout is off in every run (top-k attention has none).

# %%
emails = data.spam_assassin(fetch=True)
split_df = finetune.spam_split(emails)
split_df.groupby("split").y.agg(n="size", spam_fraction="mean").round(3)

# %%
settings = [(k, None) for k in FT_ATTN_KS] + [(None, None)] + [(None, k) for k in FT_FF_KS]
ft_kw = dict(steps=FT_STEPS, batch_size=FT_BATCH, lr=FT_LR, max_length=FT_MAX_LENGTH, eval_every=FT_STEPS,
             n_val=0, n_test=FT_N_TEST, model=ENCODER)
t0 = time.perf_counter()
ft_curves, ft_results = finetune.finetune_sweep(settings=settings, seeds=SEEDS, split_df=split_df, train_kw=ft_kw,
                                                swap_attn_ks=FT_ATTN_KS, swap_ff_ks=FT_SWAP_FF_KS, device=DEVICE, dtype=DTYPE)
finetune_minutes = (time.perf_counter() - t0) / 60
summaries.finetune_table(ft_results)

# %%
fig = plots.plot_finetune_vs_k(ft_results, title=f"{model_label(ENCODER)} fine-tuned on SpamAssassin ({len(SEEDS)} seed{'s' if len(SEEDS) > 1 else ''}, "
                                                 f"{FT_STEPS} steps, {FT_MAX_LENGTH} tokens)")
save_figure(fig, "05_finetune_accuracy_vs_k")

# %%
print(summaries.finetune_summary(ft_results, attn_ks=FT_ATTN_KS, ff_ks=FT_SWAP_FF_KS, n_test=FT_N_TEST))

# %% [markdown]
# **Reading the fine-tuning figure.** Left: attention top-k, right: feed-forward top-k
# (MiniLM has 1536 hidden units per layer). Solid lines are models fine-tuned under top-k
# and tested the same way; dashed lines are the vanilla fine-tuned models with top-k
# switched on only at test time. Points are means over seeds with ± 1 std error bars, for
# accuracy and for F1 with spam as the positive class. The printout above gives, per k,
# what the swap costs against vanilla and whether fine-tuning with top-k does better than
# the swap by more than the spread over seeds.

# %% [markdown]
# ## Closing table: test accuracy (mean ± std over seeds) per k
#
# Rows are attention k (top) and feed-forward k (bottom); "full" is exact attention.

# %%
print(f"ListOps sweep {listops_minutes:.1f} min, fine-tuning sweep {finetune_minutes:.1f} min, "
      f"notebook {(time.perf_counter() - started) / 60:.1f} min (cached runs cost nothing)")
summaries.closing_table(listops_results, ft_results)
