# ---
# jupyter:
#   kernelspec:
#     display_name: topk-lab
#     language: python
#     name: topk-lab
# ---

# %% [markdown]
# # 03 · Accuracy versus k: pretrained models, zero-shot, attention and feed-forward top-k
#
# The paper's central claim (Gupta et al. 2021, section 4) is that top-k attention is a
# drop-in: a pretrained model keeps nearly the same accuracy down to small k, without
# corrective training; the same holds for top-k feed-forward layers read as key-value
# memories. We test it on the models we can run offline. The decoders (`DECODERS`:
# **SmolLM2-135M**, a Llama with 30 layers, 9 query heads and a SwiGLU feed-forward of 1536
# units, and **Gemma-3-270M**, 18 layers of 4 query heads over one KV head, five in six of
# them attending within a 512-token sliding window, GeGLU of 2048 units): (1) perplexity and next-token accuracy
# on held-out windows of *Moby Dick* and the State of the Union addresses, at 1024 and
# 4096 tokens; (2) zero-shot classification by label-word scores with contextual
# calibration (Zhao et al. 2021): 7-language identification of Debian fortune cookies and
# Pang & Lee review polarity; (3) trivia questions answered by greedy generation with
# decode-time top-k over the KV cache; (4) passkey retrieval from filler text at several
# lengths and depths; (5) a uniform k against a per-head budget with the same average k.
# Sections 1 and 4 run every decoder; 2, 3 and 5 the first one. Feed-forward ks are
# fractions of each model's d_ff. **all-MiniLM-L6-v2**: (6) paragraph retrieval on the State of the Union addresses. A last
# panel sets our feed-forward curves beside the paper's UnifiedQA numbers.
#
# Every interval is a 95 % percentile bootstrap over examples (over blocks of 64
# consecutive tokens for language modelling). k is on a log axis; the dashed line is the
# vanilla model.
#
# **Budget.** Full mode is sized for 60 minutes on the project's 2-core CPU with one torch
# thread while other jobs share the machine. The sample sizes in the parameters cell were
# chosen from these timings (SmolLM2 / MiniLM, one thread, other jobs running), which add
# up to about 40 minutes, leaving room for a busier machine:
# (1) language modelling: ~7 s (vanilla), ~9 s (attention), ~8 s (FF), ~9 s (both) per
# 1024-token window and ~25 / 45 / 30 / 68 s per 4096-token window, about 15 minutes for
# both corpora; (2) classification: ~0.26 s per example per setting (content-free prompts
# included), about 5 minutes; (3) trivia QA: ~10 s per 16 questions and setting, about 5
# minutes; (4) passkey: ~5 / 12 / 27 s per 1k / 2k / 4k prompt vanilla, up to ~6 / 14 /
# 40 s with top-k, about 8 minutes (Gemma-3-270M's sections 1 and 4 take about twice
# SmolLM2's: its 262k-token vocabulary makes the output layer as costly as the rest); (5) per-head budget against uniform k on the
# 1024-token windows of (1): ~8 s per window and setting, about 2 minutes; (6) MiniLM
# retrieval: ~14 s for vanilla, ~17 s per top-k setting, about 2 minutes. Every (task,
# setting) result is cached under `data/results/accuracy/`, so an interrupted run resumes
# where it stopped and a rerun only redraws. Each section prints the wall time it spent computing, and the closing cell the
# total. Quick mode (CI) uses CPython's pydoc text, a handful of examples and one k per kind.

# %% tags=["parameters"]
QUICK = False  # pydoc text, a few examples, one k per kind: the CI smoke run (under 3 minutes)
DECODERS = ["smollm2-135m", "gemma3-270m"]  # decoders (load_model names, local dirs, hub ids); 2, 3, 5 use the first
ENCODER = "minilm-l6"  # encoder of the retrieval task (section 6)
DEVICE = "auto"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:1"
DTYPE = "auto"  # "auto" (bfloat16 on CUDA, float32 on the CPU), "float32", "bfloat16", "float16"
THREADS = 1  # torch threads; on the shared 2-core CPU two threads contend with other jobs and run far slower
SEED = 0  # fixes every sample (fortunes, polarity, trivia, passkeys, paragraphs)
LM_CORPORA = ["moby-dick", "sotu"]  # texts scored (sotu: all 233 addresses, joined)
LM_SETUPS = {
    1024: {"windows": 2, "attn": [128, 32, 8, 2], "ff": [0.5, 0.25, 0.0625], "both": [[128, 0.5], [32, 0.25], [8, 0.0625]]},
    4096: {"windows": 1, "attn": [128, 32, 8], "ff": [0.25], "both": [[32, 0.25]]},
}  # window length -> windows per corpus, attention ks, FF ks as fractions of d_ff, pairs switched together
LANG_PER_LABEL = 20  # fortunes per language (7 languages, a fixed balanced sample)
LANG_CHARS = [30, 160]  # keep fortunes of this many characters (short single cookies)
POLARITY_N = 100  # polarity sentences (of 200), half positive, half negative
CLS_ATTN_KS = [8, 2]  # prompts are a few dozen tokens, so only small attention k drops any key
CLS_FF_FRACTIONS = [0.125, 0.03125]  # feed-forward k as fractions of d_ff
QA_N = 96  # trivia questions (of 261), a fixed sample
QA_MAX_NEW_TOKENS = 24  # greedy tokens per answer
QA_ATTN_KS = [8, 2]  # prompt + answer is under a hundred tokens
QA_FF_FRACTIONS = [0.25, 0.0625]  # feed-forward k as fractions of d_ff
PASSKEY_LENGTHS = [1024, 2048, 4096]  # prompt lengths in tokens
PASSKEY_DEPTHS = [0.1, 0.5, 0.9]  # where the key sits: 0 is the start of the filler, 1 its end
PASSKEY_PER_CELL = 1  # keys per (length, depth)
PASSKEY_ATTN_KS = [16, 2]  # attention k (feed-forward top-k is not swept here)
BUDGET_KS = [32, 8, 2]  # average k compared (each must also be a uniform attention k of LM_SETUPS[1024])
BUDGET_TOKENS = 1024  # pydoc tokens the budget is measured on when notebook 02's is absent (~10 s)
RETRIEVAL_N = 200  # paragraphs (queries and documents)
RETRIEVAL_SENTENCES = 4  # sentences per pseudo-paragraph (the SOTU files have no paragraph breaks)
RETRIEVAL_ATTN_KS = [32, 8, 2]  # documents are about a hundred tokens
RETRIEVAL_FF_FRACTIONS = [0.25, 0.0625, 0.015625]  # feed-forward k as fractions of the encoder's d_ff

# %%
from topk_lib.infra.outputs import notebook_setup

notebook_setup("03_accuracy_vs_k", globals())  # checks the values above; says where this run writes

# %%
import time

import pandas as pd
import torch

from topk_lib.analysis.budget import budget_summary, scaled_budgets
from topk_lib.experiments import accuracy, inputs, summaries
from topk_lib.experiments.choices import ff_ks, lm_setups, model_label, model_shape, model_tag
from topk_lib.experiments.settings import settings_grid
from topk_lib.hf.loading import load_model
from topk_lib.infra import paths
from topk_lib.infra.outputs import model_folder
from topk_lib.plots.accuracy import plot_accuracy_vs_k, plot_budget_frontier, plot_paper_reference, plot_relative_vs_k
from topk_lib.plots.style import save_figure

if QUICK:
    LM_CORPORA = ["pydoc"]
    LM_SETUPS = {256: {"windows": 1, "attn": [8, 2], "ff": [0.0625], "both": [[8, 0.0625]]}}
    LANG_PER_LABEL, POLARITY_N, CLS_ATTN_KS, CLS_FF_FRACTIONS = 2, 6, [2], [0.0625]
    QA_N, QA_MAX_NEW_TOKENS, QA_ATTN_KS, QA_FF_FRACTIONS = 4, 6, [2], [0.0625]
    PASSKEY_LENGTHS, PASSKEY_DEPTHS, PASSKEY_ATTN_KS = [256], [0.5], [2]
    BUDGET_KS, BUDGET_TOKENS = [8, 2], 256
    RETRIEVAL_N, RETRIEVAL_ATTN_KS, RETRIEVAL_FF_FRACTIONS = 16, [2], [0.0625]

# %%
torch.set_num_threads(THREADS)
started = time.perf_counter()
decoders = {name: load_model(name, device=DEVICE, dtype=DTYPE) for name in DECODERS}  # name -> (model, tokenizer)
shapes = {name: model_shape(model) for name, (model, _) in decoders.items()}
for name, (model, _) in decoders.items():
    shape = shapes[name]
    print(f"{model_label(name)}: {shape.n_layers} layers, {shape.heads} query heads, d_ff {shape.d_ff}, "
          f"{model.dtype} on {model.device}. {shape.window_note(max(LM_SETUPS))}")
MAIN = DECODERS[0]  # the decoder of sections 2, 3 and 5
model, tokenizer = decoders[MAIN]
D_FF = shapes[MAIN].d_ff
print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); results cached under {paths.results() / 'accuracy'}")

# %% [markdown]
# ## 1 · Language modelling
#
# Windows are spread evenly over each text and scored independently; every setting sees
# the same tokens. Attention top-k keeps the k largest scores per query in every layer and
# head (causal, so early tokens have fewer than k keys and are exact); feed-forward top-k
# keeps the k largest |activation| of the gated units per token (the FF ks are the same
# fractions of each model's d_ff). In a sliding-window layer a query never sees more keys
# than the window, so there top-k only matters below the window's width.

# %%
lm_all = {name: accuracy.lm_sweeps(m, tok, model_name=name, corpora=LM_CORPORA,
                                   setups=lm_setups(LM_SETUPS, shapes[name].d_ff))
          for name, (m, tok) in decoders.items()}
lm = lm_all[MAIN]
pd.concat({model_label(n): f[f.metric == "perplexity"].pivot(index="setting", columns="task", values="value")
           for n, f in lm_all.items()}).round(2)

# %%
for name, frame in lm_all.items():
    label, tag = model_label(name), model_tag(name)
    fig = plot_accuracy_vs_k(frame, metric="perplexity", ylabel="perplexity", logy=True,
                             title=f"{label}: perplexity of held-out windows vs k")
    save_figure(fig, f"03_{tag}_lm_perplexity_vs_k")
    fig = plot_accuracy_vs_k(frame, metric="accuracy", ylabel="next-token accuracy", percent=True,
                             title=f"{label}: next-token accuracy vs k")
    save_figure(fig, f"03_{tag}_lm_accuracy_vs_k")
    print(f"{label}: {summaries.lm_caption(frame)}")

# %%
curves = summaries.relative_curves({model_label(n): (f, shapes[n].d_ff) for n, f in lm_all.items()}, metric="perplexity")
fig = plot_relative_vs_k(curves, ylabel="perplexity / vanilla perplexity", logy=True,
                         title="The decoders side by side: perplexity relative to the full model")
save_figure(fig, "03_decoders_lm_vs_k")
print(summaries.relative_caption(curves, metric="perplexity"))

# %% [markdown]
# **Reading the figures.** Left panels switch attention only, middle panels feed-forward
# only, right panels both (tick labels: attention k / FF k). The printout gives, per text
# and window length, the vanilla perplexity with its interval and the perplexity at the
# smallest k of each kind; the closing note lists the smallest k that stays within 2 % of
# vanilla. Comparing the 1024- and 4096-token tasks shows whether longer windows need a
# larger attention k.

# %% [markdown]
# ## 2 · Zero-shot classification with contextual calibration
#
# Each input is scored by the log-probability of each label word after the prompt
# (`Text: …\nLanguage:` with ` English`, ` German`, …; `Review: …\nSentiment:` with
# ` positive`/` negative`; every label word is one SmolLM2 token). Calibration divides the
# label distribution by the one the model gives content-free inputs (`N/A`, empty,
# `[MASK]`), recomputed under every setting. The prompt wordings were picked among three on
# a small pilot sample. Fortune cookies are labelled by the Debian package they ship in.

# %%
lang_examples = accuracy.language_id_examples(per_label=LANG_PER_LABEL, chars=LANG_CHARS, seed=SEED)
polarity_examples = accuracy.polarity_examples(n=POLARITY_N, seed=SEED)
cls = accuracy.classification_sweeps(model, tokenizer, {"language_id": lang_examples, "polarity": polarity_examples},
                                     model_name=MAIN,
                                     settings=settings_grid(attn_ks=CLS_ATTN_KS, ff_ks=ff_ks(CLS_FF_FRACTIONS, D_FF)))
print(summaries.classification_inputs_caption(tokenizer, lang_examples, polarity_examples, cls))
cls.pivot_table(index="setting", columns=["task", "metric"], values="value", sort=False).round(3)

# %%
fig = plot_accuracy_vs_k(cls, metric="accuracy", ylabel="accuracy (calibrated)", percent=True,
                         labels={"language_id": "7-language identification", "polarity": "review polarity"},
                         title=f"{model_label(MAIN)} zero-shot classification vs k")
save_figure(fig, "03_classification_vs_k")

# %%
print(summaries.classification_caption(cls, chance={"language_id": 1 / 7, "polarity": 1 / 2}))

# %% [markdown]
# **Reading the figure.** One line per task, calibrated accuracy with its bootstrap
# interval; the table above also has the uncalibrated (`accuracy_raw`) numbers. The
# prompts are a few dozen tokens long, so only an attention k below that drops any key.

# %% [markdown]
# ## 3 · Trivia questions, greedy generation under decode-time top-k
#
# The question goes through SmolLM2's chat template with the system message
# *"Answer the question with a short phrase, no explanation."*; the answer is generated
# greedily with the KV cache, so every decoded token attends to its top-k cached keys.
# Scores: the normalised gold answer occurs in the generated text (containment), and the
# normalised first line equals it (exact match; SQuAD normalisation).

# %%
qa_pairs = accuracy.trivia_sample(n=QA_N, seed=SEED)
qa = accuracy.qa_sweep(model, tokenizer, qa_pairs, model_name=MAIN,
                       settings=settings_grid(attn_ks=QA_ATTN_KS, ff_ks=ff_ks(QA_FF_FRACTIONS, D_FF)),
                       max_new_tokens=QA_MAX_NEW_TOKENS)
qa.pivot_table(index="setting", columns="metric", values="value", sort=False).round(3)

# %%
fig = plot_accuracy_vs_k(summaries.metrics_as_tasks(qa), metric="score", ylabel="share of questions",
                         percent=True, labels={"contains": "answer contained", "exact": "exact match"},
                         title=f"{model_label(MAIN)} trivia ({QA_N} questions), greedy answers vs k")
save_figure(fig, "03_trivia_vs_k")

# %%
print(summaries.qa_caption(qa))

# %% [markdown]
# **Reading the figure.** Containment accepts an answer given as a sentence, exact match
# does not. Prompt and answer together are under a hundred tokens, so only small attention
# k leave out keys.

# %% [markdown]
# ## 4 · Passkey retrieval
#
# A 5-digit key is hidden in repeated filler ("The grass is green. The sky is blue. …") at
# a relative depth, and the prompt ends with *"What is the pass key? The pass key is"*. A
# prompt counts as solved when greedy decoding returns the whole key; this is checked in
# one teacher-forced pass (the argmax at each answer position must be the key's next
# token), which gives the same verdict as generating.

# %%
passkey_all = {name: accuracy.passkey_sweep(m, tok, model_name=name, settings=settings_grid(attn_ks=PASSKEY_ATTN_KS),
                                            lengths=PASSKEY_LENGTHS, depths=PASSKEY_DEPTHS,
                                            n_per_cell=PASSKEY_PER_CELL, seed=SEED)
               for name, (m, tok) in decoders.items()}
passkey = passkey_all[MAIN]
pd.concat({model_label(n): f.pivot_table(index="setting", columns=["task", "metric"], values="value", sort=False)
           for n, f in passkey_all.items()}).round(3)

# %%
for name, frame in passkey_all.items():
    fig = plot_accuracy_vs_k(frame[frame.task != "passkey"], metric="accuracy", ylabel="keys retrieved", percent=True,
                             labels={f"passkey_{n}": f"{n} tokens" for n in PASSKEY_LENGTHS},
                             title=f"{model_label(name)} passkey retrieval vs attention k "
                                   f"({len(PASSKEY_DEPTHS) * PASSKEY_PER_CELL} prompts per length)")
    save_figure(fig, f"03_{model_tag(name)}_passkey_vs_k")
    print(f"{model_label(name)}: {summaries.passkey_caption(frame, PASSKEY_DEPTHS)}")

# %% [markdown]
# **Reading the figure.** One line per prompt length (pooled over depths). With few
# prompts per length the intervals are wide; the table also gives the share of correct
# answer tokens, a finer measure than whole-key accuracy.

# %% [markdown]
# ## 5 · Uniform k against a per-head budget at the same average k
#
# Notebook 02 measures, per head, the k that keeps 99 % of the attention mass and writes it
# as JSON; heads that spread their attention get more keys, peaked heads fewer. Here the
# budget is rescaled to each average k and compared with the same k in every head, on the
# 1024-token windows of section 1. When notebook 02 has not been run, the budget is
# measured here (median over query rows of the k for 99 % of the mass) on pydoc text, which
# no task evaluates. Notebook 02 measures on a window of one of the evaluated texts (the
# printout names it); the other corpus is then the held-out comparison.

# %%
budget, budget_source = inputs.head_budget(model, tokenizer, model_name=MAIN,
                                           budget_file=f"{model_folder(MAIN)}_head_budget.json", tokens=BUDGET_TOKENS)
print(f"per-head budget from {budget_source}: {budget_summary(budget)}")
budget_window = min(LM_SETUPS)
budget_rows = accuracy.lm_sweeps(model, tokenizer, model_name=MAIN, corpora=LM_CORPORA,
                                 setups=lm_setups({budget_window: LM_SETUPS[budget_window]}, D_FF),
                                 budgets=scaled_budgets(budget, BUDGET_KS))  # vanilla (cached in section 1), budgets
frontier = summaries.budget_frontier(lm, budget_rows)
budget_table = summaries.budget_table(frontier)
budget_table.round(3)

# %%
fig = plot_budget_frontier(frontier, metric="perplexity", ylabel="perplexity", logy=True,
                           title=f"Per-head budget vs uniform k ({budget_window}-token windows)")
save_figure(fig, "03_budget_vs_uniform")

# %%
print(summaries.budget_caption(budget_table, budget_rows))

# %% [markdown]
# **Reading the figure.** Blue: the same k in every head; red: the per-head budget rescaled
# to the same average (its real average after rounding is the x position). Lower is
# better; the table gives both perplexity and next-token accuracy.

# %% [markdown]
# ## 6 · MiniLM paragraph retrieval on the State of the Union
#
# The addresses carry no paragraph breaks, so a paragraph is a run of consecutive
# sentences; its first sentence is the query and the rest a document. Every query is
# ranked against all documents by cosine similarity of all-MiniLM-L6-v2 embeddings (mean
# pooling, as sentence-transformers does). MiniLM has 6 layers of 12 heads and 1536 GELU
# feed-forward units.

# %%
encoder, encoder_tokenizer = load_model(ENCODER, device=DEVICE, dtype=DTYPE)
pairs = accuracy.sotu_paragraphs(n=RETRIEVAL_N, sentences_per_paragraph=RETRIEVAL_SENTENCES, seed=SEED)
retrieval = accuracy.retrieval_sweep(encoder, encoder_tokenizer, pairs, model_name=ENCODER,
                                     settings=settings_grid(attn_ks=RETRIEVAL_ATTN_KS,
                                                            ff_ks=ff_ks(RETRIEVAL_FF_FRACTIONS, model_shape(encoder).d_ff)))
print(summaries.retrieval_inputs_caption(encoder_tokenizer, pairs))
retrieval.pivot_table(index="setting", columns="metric", values="value", sort=False).round(3)

# %%
fig = plot_accuracy_vs_k(summaries.metrics_as_tasks(retrieval, ["acc@1", "mrr"]), metric="score",
                         ylabel="score", labels={"acc@1": "accuracy@1", "mrr": "mean reciprocal rank"},
                         title=f"{model_label(ENCODER)} paragraph retrieval on SOTU ({len(pairs)} paragraphs) vs k")
save_figure(fig, "03_retrieval_vs_k")
fig = plot_accuracy_vs_k(retrieval, metric="cosine", ylabel="cosine to vanilla embedding",
                         labels={"sotu_retrieval": "queries and documents"},
                         title=f"{model_label(ENCODER)} embeddings under top-k: cosine similarity to vanilla")
save_figure(fig, "03_retrieval_cosine_vs_k")

# %%
print(summaries.retrieval_caption(retrieval, len(pairs)))

# %% [markdown]
# ## Beside the paper: feed-forward top-k relative to the full model
#
# Gupta et al. (2021) report the average exact match of UnifiedQA (T5-base, T5-3B and
# T5-11B) with top-k in the feed-forward layers only; those published numbers
# (`summaries.GUPTA2021_UNIFIEDQA_FF`) are drawn as grey lines, relative to each model's
# full score, against the share of feed-forward units kept, k / d_ff. Our feed-forward
# curves (SmolLM2 and MiniLM have d_ff = 1536, Gemma-3-270M 2048) use each task's main
# metric; the second decoder brings its language-modelling and passkey tasks.

# %%
all_rows = pd.concat([lm, cls, qa, passkey, retrieval], ignore_index=True)
metrics = summaries.main_metrics(lm.task)
parts = {model_label(MAIN): (pd.concat([lm, cls, qa, passkey]), D_FF),
         model_label(ENCODER): (retrieval, model_shape(encoder).d_ff),
         **{model_label(n): (lm_all[n], shapes[n].d_ff) for n in DECODERS[1:]}}
ours = []
for label, (frame, d_ff) in parts.items():
    relative = summaries.relative_to_vanilla(frame, metrics=metrics, kind="ff", d_ff=d_ff)
    ours.append(relative.assign(task=label + ": " + relative.task))
ours = pd.concat(ours, ignore_index=True)
paper = summaries.paper_reference()
fig = plot_paper_reference(ours, paper, title="Feed-forward top-k: accuracy relative to the full model")
save_figure(fig, "03_ff_vs_paper")
print(summaries.paper_caption(ours, paper))

# %% [markdown]
# **Reading the figure.** In the paper's numbers the larger T5 models keep their score
# with a smaller share of their feed-forward units than T5-base: the k they need grows much
# more slowly than d_ff. Our models have d_ff = 1536 only, so a given share is far fewer
# units; the printout gives this run's numbers.

# %% [markdown]
# ## Closing note
#
# For the first decoder, per task, the smallest attention k and feed-forward k in the sweep such
# that it and every larger k stay within 1 point of vanilla accuracy (2 % relative for
# perplexity), from the point estimates; `<NA>` when even the largest k swept falls
# outside. Then what the per-head budget buys at the same average k, and the wall time.

# %%
closing = summaries.smallest_k_table(all_rows, summaries.decoder_targets(lm.task))
closing.round(3)

# %%
seconds = summaries.seconds_by_section({
    **{f"language modelling ({model_label(n)})": f for n, f in lm_all.items()}, "classification": cls, "trivia": qa,
    **{f"passkey ({model_label(n)})": f for n, f in passkey_all.items()}, "budget": budget_rows, "retrieval": retrieval})
print(summaries.closing_caption(budget_table, seconds, time.perf_counter() - started))
