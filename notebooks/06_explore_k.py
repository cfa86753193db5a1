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
# Pick a model (SmolLM2-135M, a decoder, or all-MiniLM-L6-v2, an encoder), a text (a built-in
# sample or your own), a layer, a head and k. The left panel shows that head's exact attention
# map with the entries top-k keeps in colour and the dropped ones in grey; the title gives the
# mass the head keeps and its output error ‖o_k − o‖/‖o‖; the right panel shows the mass kept
# per layer at the same k (line: mean over heads; dots: single heads). The scores are computed
# once per (model, text) — one forward pass, a few seconds, with a busy line saying so — and
# moving a slider only re-thresholds them and redraws the figure in place (~70 ms a move at 512
# tokens on a shared 2-core CPU; see `topk_lib/app/explorer.py`). Below, for SmolLM2, a prompt is
# continued greedily with exact attention and with top-k attention during generation, and the
# first token where the two differ is marked.
#
# Run in JupyterLab (`make lab`) for the widgets; a headless run draws the default view.

# %% tags=["parameters"]
QUICK = False  # short text and continuation for the CI smoke run
MAX_TOKENS = 512  # tokens of the text the scores are computed on
MODEL = "SmolLM2-135M"  # model shown first (a key of MODELS below)
TEXT = "Moby Dick, chapter 1"  # sample shown first (the pydoc sample if Moby Dick is not fetched)
LAYER = 12  # layer shown first
HEAD = 4  # head shown first
K = 16  # k shown first
ENCODER_LAYER = 3  # MiniLM layer of the second saved figure
ENCODER_HEAD = 5  # MiniLM head of the second saved figure
PROMPT = ("Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, "
          "and nothing particular to interest me on shore, I thought I would")  # prompt to continue
PROMPT_K = 16  # k for the top-k continuation
NEW_TOKENS = 40  # tokens generated per continuation
THREADS = 2  # torch threads

# %%
from topk_lib.infra.outputs import notebook_setup

notebook_setup("06_explore_k", globals())  # checks the values above; says where this run writes

# %%
import torch
from IPython.display import display

from topk_lib.app.continuations import continuations_text
from topk_lib.app.session import ExplorerSession, sample_texts
from topk_lib.app.widgets import ContinuationPanel, ExplorerPanel
from topk_lib.plots.style import save_figure

torch.set_num_threads(THREADS)
if QUICK:
    MAX_TOKENS, NEW_TOKENS = 128, 8
MODELS = {"SmolLM2-135M": "smollm2-135m", "all-MiniLM-L6-v2": "minilm-l6"}
texts = sample_texts(chars=8 * MAX_TOKENS)  # ~4+ characters per token: enough to fill MAX_TOKENS
TEXT = TEXT if TEXT in texts else next(iter(texts))
session = ExplorerSession(models=MODELS, texts=texts, max_tokens=MAX_TOKENS)
print("samples:", ", ".join(texts))

# %% [markdown]
# ## The explorer
#
# Sliders redraw when released (arrow keys on a slider's handle step it). `k` moves over
# log-spaced steps (1, 2, 3, 4, 6, 8, 12, …) so small k is easy to pick; `exact k` takes any value.
# `rows shown` zooms into a range of query positions (token labels appear when at most 64 rows
# are shown). Changing model or text recomputes the scores once; recent ones stay in memory.

# %%
explorer_panel = ExplorerPanel(session, model=MODEL, text=TEXT, layer=LAYER, head=HEAD, k=K)
display(explorer_panel.widget)

# %% [markdown]
# The default view, saved for the gallery (the same call the widgets made above), and the same
# for MiniLM, whose attention is bidirectional.

# %%
view = session.explorer(MODEL, TEXT).view(layer=LAYER, head=HEAD, k=K)
save_figure(session.figure(model=MODEL, text=TEXT, layer=LAYER, head=HEAD, k=K), "06_explore_default")
print(f"Caption: {MODEL} on '{TEXT}' ({session.explorer(MODEL, TEXT).length} tokens), layer {LAYER} head {HEAD}: "
      f"the top {K} keys keep {view.mass_kept:.1%} of the mass (mean over rows; lowest row "
      f"{view.row_mass.min():.1%}); output error ‖o_k − o‖/‖o‖ = {view.relative_error:.3f}. Across layers the mean "
      f"mass kept at k = {K} ranges from {view.profile.min():.1%} (layer {int(view.profile.argmin())}) to "
      f"{view.profile.max():.1%} (layer {int(view.profile.argmax())}).")

# %%
encoder_view = session.explorer("all-MiniLM-L6-v2", TEXT).view(layer=ENCODER_LAYER, head=ENCODER_HEAD, k=K)
save_figure(session.figure(model="all-MiniLM-L6-v2", text=TEXT, layer=ENCODER_LAYER, head=ENCODER_HEAD, k=K),
            "06_explore_minilm")
print(f"Caption: MiniLM layer {ENCODER_LAYER} head {ENCODER_HEAD}, k = {K}: mass kept {encoder_view.mass_kept:.1%}, "
      f"output error {encoder_view.relative_error:.3f}; mean mass kept per layer "
      + ", ".join(f"{m:.0%}" for m in encoder_view.profile.tolist()) + ".")

# %% [markdown]
# ## SmolLM2: greedy continuation, exact vs top-k
#
# Top-k is switched on for every attention call inside `generate` (the prompt's prefill and each
# decoding step over the KV cache). The highlighted part starts at the first generated token where
# the two continuations differ. Tick `chat` to wrap the prompt in SmolLM2's chat template.

# %%
continuation_panel = ContinuationPanel(session, model="SmolLM2-135M", prompt=PROMPT, k=PROMPT_K,
                                       max_new_tokens=NEW_TOKENS)
display(continuation_panel.widget)

# %%
print(continuations_text(session.last_continuations, session.model("SmolLM2-135M")[1]))
