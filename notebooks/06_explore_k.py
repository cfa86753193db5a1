# ---
# jupyter:
#   kernelspec:
#     display_name: topk-lab
#     language: python
#     name: topk-lab
# ---

# %% [markdown]
# # 06 · Explore k: what top-k keeps, head by head
#
# Pick a model (the decoders SmolLM2-135M and Gemma-3-270M, the encoder all-MiniLM-L6-v2, or
# any model named in `MODELS`), a text (a built-in
# sample or your own), a layer, a head and k. The left panel shows that head's exact attention
# map with the entries top-k keeps in colour and the dropped ones in grey; the title gives the
# mass the head keeps and its output error ‖o_k − o‖/‖o‖; the right panel shows the mass kept
# per layer at the same k (line: mean over heads; dots: single heads). The scores are computed
# once per (model, text) — one forward pass, a few seconds, with a busy line saying so — and
# moving a slider only re-thresholds them and redraws the figure in place (~70 ms a move at 512
# tokens on a shared 2-core CPU; see `topk_lib/app/explorer.py`). Below, for the decoders, a prompt is
# continued greedily with exact attention and with top-k attention during generation, and the
# first token where the two differ is marked.
#
# Run in JupyterLab (`make lab`) for the widgets; a headless run draws the default view.

# %% tags=["parameters"]
QUICK = False  # short text and continuation for the CI smoke run
MAX_TOKENS = 512  # tokens of the text the scores are computed on
MODELS = ["smollm2-135m", "gemma3-270m", "minilm-l6"]  # the explorer's models (load_model names, dirs, hub ids); first shown first
DEVICE = "auto"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:1"
DTYPE = "auto"  # "auto" (bfloat16 on CUDA, float32 on the CPU), "float32", "bfloat16", "float16"
TEXT = "Moby Dick, chapter 1"  # sample shown first (the pydoc sample if Moby Dick is not fetched)
DEPTH = 0.4  # layer shown first, as a fraction of the depth; head: the one of median mass kept at K in it
K = 16  # k shown first
PROMPT = ("Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, "
          "and nothing particular to interest me on shore, I thought I would")  # prompt to continue
PROMPT_K = 16  # k for the top-k continuation
NEW_TOKENS = 40  # tokens generated per continuation
THREADS = 2  # torch threads

# %%
from topk_lib.infra.outputs import notebook_setup

notebook_setup("06_explore_k", globals())  # checks the values above; says where this run writes

# %%
import functools

import torch
from IPython.display import display

from topk_lib import load_model
from topk_lib.app.continuations import continuations_text
from topk_lib.app.session import ExplorerSession, sample_texts
from topk_lib.app.widgets import ContinuationPanel, ExplorerPanel
from topk_lib.experiments.choices import layer_at, median_index, model_label, model_tag
from topk_lib.plots.style import save_figure

# %%
torch.set_num_threads(THREADS)
if QUICK:
    MAX_TOKENS, NEW_TOKENS = 128, 8
texts = sample_texts(chars=8 * MAX_TOKENS)  # ~4+ characters per token: enough to fill MAX_TOKENS
TEXT = TEXT if TEXT in texts else next(iter(texts))
session = ExplorerSession(models={model_label(name): name for name in MODELS}, texts=texts, max_tokens=MAX_TOKENS,
                          loader=functools.partial(load_model, device=DEVICE, dtype=DTYPE))
labels = list(session.models)
first_view = {}  # label -> (layer, head) shown first: the layer at DEPTH, its head of median mass kept at K
for label in labels:
    explorer = session.explorer(label, TEXT)
    layer = layer_at(explorer.n_layers, DEPTH)
    first_view[label] = layer, median_index(explorer.head_profile(k=K)[layer].tolist())
print("samples:", ", ".join(texts), "| first views (layer, head):", first_view)

# %% [markdown]
# ## The explorer
#
# Sliders redraw when released (arrow keys on a slider's handle step it). `k` moves over
# log-spaced steps (1, 2, 3, 4, 6, 8, 12, …) so small k is easy to pick; `exact k` takes any value.
# `rows shown` zooms into a range of query positions (token labels appear when at most 64 rows
# are shown). Changing model or text recomputes the scores once; recent ones stay in memory.

# %%
explorer_panel = ExplorerPanel(session, model=labels[0], text=TEXT, layer=first_view[labels[0]][0],
                               head=first_view[labels[0]][1], k=K)
display(explorer_panel.widget)

# %% [markdown]
# The first view of each model, saved for the gallery (the same call the widgets made above);
# an encoder's attention is bidirectional.

# %%
for label, name in session.models.items():
    (layer, head), explorer = first_view[label], session.explorer(label, TEXT)
    view = explorer.view(layer=layer, head=head, k=K)
    save_figure(session.figure(model=label, text=TEXT, layer=layer, head=head, k=K),
                "06_explore_default" if label == labels[0] else f"06_explore_{model_tag(name)}")
    print(f"Caption: {label} on '{TEXT}' ({explorer.length} tokens), layer {layer} head {head}: the top {K} keys keep "
          f"{view.mass_kept:.1%} of the mass (mean over rows; lowest row {view.row_mass.min():.1%}); output error "
          f"‖o_k − o‖/‖o‖ = {view.relative_error:.3f}. Across layers the mean mass kept at k = {K} ranges from "
          f"{view.profile.min():.1%} (layer {int(view.profile.argmin())}) to {view.profile.max():.1%} "
          f"(layer {int(view.profile.argmax())}).")

# %% [markdown]
# ## Greedy continuation, exact vs top-k (the first decoder of MODELS)
#
# Top-k is switched on for every attention call inside `generate` (the prompt's prefill and each
# decoding step over the KV cache). The highlighted part starts at the first generated token where
# the two continuations differ. Tick `chat` to wrap the prompt in the model's chat template.

# %%
decoder = next(label for label in labels if session.model(label)[0].can_generate())
continuation_panel = ContinuationPanel(session, model=decoder, prompt=PROMPT, k=PROMPT_K, max_new_tokens=NEW_TOKENS)
display(continuation_panel.widget)

# %%
print(continuations_text(session.last_continuations, session.model(decoder)[1]))
