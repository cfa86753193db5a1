# ---
# jupyter:
#   kernelspec:
#     display_name: topk-lab
#     language: python
#     name: topk-lab
# ---

# %% [markdown]
# # 04 · Memory and time against input length, chunk size and feed-forward width
#
# The paper's efficiency claim (Figure 1): query-chunked top-k attention runs at input lengths
# where vanilla attention runs out of memory, with memory linear in length. We measure one
# causal attention layer (B=1, H=12, d=64), the chunk-size trade-off, one feed-forward layer
# against its width, and a 12-layer model, each point in its own process with a memory budget
# (`python -m topk_lib.bench`; `topk_lib.bench.meters` explains the memory method). PyTorch's
# SDPA is always included: it is exact, fused and linear in memory on CPU and GPU. Figures draw
# from every `data/results/bench_<device>.csv`, so a GPU run made elsewhere appears beside the CPU one.
#
# The committed CPU rows came from `python -m topk_lib.bench attention --max-L 8192`, then
# `attention --min-L 16384 --max-L 32768 --repeats 1 --timeout 600`, `chunk`, `ff --repeats 1` and
# `model12 --repeats 1`, run alone on the 2-core CPU (70 min); the H200 rows from
# `attention --device cuda --timeout 60`. Every row records its repeats, threads, dtype and versions.

# %% tags=["parameters"]
QUICK = False  # tiny lengths (CI smoke run)
RUN_SUITES = ["attention", "chunk", "ff", "model12"]  # suites to measure when DEVICE's CSV has no rows for them
REMEASURE = False  # True: measure RUN_SUITES again even where rows exist (full CPU suites take about an hour)
DEVICE = "cpu"  # "cpu" or "cuda"
BUDGET = "16GiB"  # memory budget per point
MAX_L = 32768  # attention suite: longest input
TIMEOUT_S = 900  # seconds per point before it counts as "timeout"

# %%
from topk_lib.infra.outputs import notebook_setup

notebook_setup("04_memory_time", globals())  # checks the values above; says where this run writes

# %%
from topk_lib import bench
from topk_lib.plots.bench import plot_memory_time
from topk_lib.plots.style import save_figure

if QUICK:
    MAX_L = 256  # the quick attention suite stops here
measured = set() if QUICK or REMEASURE else bench.measured_suites(DEVICE)
for suite in [s for s in RUN_SUITES if s not in measured]:
    bench.run_suite(suite, quick=QUICK, device=DEVICE, budget=bench.parse_bytes(BUDGET), max_len=MAX_L,
                    timeout_s=TIMEOUT_S)
rows = bench.all_results(quick=QUICK)
rows.groupby(["device_name", "suite", "status"]).size().unstack(fill_value=0)

# %% [markdown]
# ## One attention layer against input length

# %%
for device, part in rows[rows.suite == "attention"].groupby("device"):
    fig = plot_memory_time(part, x="L", xlabel="input length L (tokens)",
                           title=f"One causal attention layer, B=1 H=12 d=64, {part.dtype.iloc[0]}, "
                                 f"{part.device_name.iloc[0]} ({part.threads.iloc[0]} threads), "
                                 f"torch {part.torch_version.iloc[0]}; memory: {part.mem_method.iloc[0]}")
    save_figure(fig, "04_attention_memory_time" if device == "cpu" else f"04_attention_memory_time_{device}")
    print(bench.attention_caption(part, budget=BUDGET))

# %% [markdown]
# ## Chunk size, feed-forward width, and a 12-layer model

# %%
panels = {
    "chunk": ("C", "chunk size C (queries per chunk)", "04_chunk_tradeoff", "Chunk size at fixed L, chunked vs top-k (k=128)",
              [("topk k=128", "chunked")]),
    "ff": ("d_ff", "feed-forward width d_ff", "04_ff_width", "One feed-forward layer (d=768): dense, token-chunked, top-k",
           [("topk k=512 C=1024", "dense"), ("chunked C=1024", "dense")]),
    "model12": ("L", "input length L (tokens)", "04_model_12_layers",
                "12-layer model (d=768, H=12, d_ff=3072), fwd+bwd: vanilla, chunked, top-k attention with FF top-k",
                [("topk k=64 C=1024 ff_k=512", "chunked C=1024"), ("topk k=64 C=1024 ff_k=512", "sdpa")]),
}
for suite, (x, xlabel, figure, title, pairs) in panels.items():
    for device, part in rows[rows.suite == suite].groupby("device"):
        fig = plot_memory_time(part, x=x, xlabel=xlabel, title=f"{title} ({part.device_name.iloc[0]})")
        save_figure(fig, figure if device == "cpu" else f"{figure}_{device}")
        print(bench.ratio_caption(part, suite=suite, pairs=pairs, x=x))

# %% [markdown]
# **Reading the figures.** Each figure has memory panels (top) and time panels (bottom), one
# column per pass; both axes are logarithmic, so a line of slope one is linear growth and slope
# two quadratic. A cross at the top of a panel marks a point that did not fit in the budget or
# timed out. The printouts under each figure give the ratios this run measured (top-k over
# chunked attention, over SDPA, over the dense feed-forward layer), per length or size.
