"""topk-lab: top-k attention (Gupta et al. 2021) on pretrained transformers, measured.

The public API is the handful of names below; everything else lives in subpackages, one
layer each, with imports pointing one way only (``tests/unit/test_layout.py`` enforces it):

=============  =====  ==================================================================
subpackage     layer  what it holds
=============  =====  ==================================================================
``_validate``  0      argument checks (wrong type -> TypeError, bad value -> ValueError)
``infra``      0      ``paths`` (read at call time), ``cache`` (atomic writes, keyed
                      frames and records), ``parameters`` (notebook parameter checks),
                      ``runner`` (notebooks headless), ``processes`` (child processes that
                      die with their parent)
``kernels``    1      ``attention``, ``feedforward`` and what they are built from:
                      ``chunking``, ``selection``, ``product``, ``checks``, ``baselines``
``nn``         2      one small transformer (config dataclass + block) for training and
                      the benchmarks
``hf``         2      ``loading``, ``layers`` (discovery, the MLP layout table),
                      ``registry`` (the one ``intercept()`` every model surgery uses),
                      ``patching`` (``use_topk``, ``use_sparse``)
``selectors``  2      key selectors measured against the top-k oracle: ``base`` (the
                      API over the kernel), ``static``, ``heavy``, ``estimated``,
                      ``adaptive``
``data``       2      ``sources`` (pins), ``download``, ``corpora``, ``listops``
``analysis``   3      ``metrics``, ``capture`` and ``mlp`` (per-head / per-neuron
                      statistics) over their shared ``recording`` core,
                      ``approximations``, ``budget``, ``sensitivity``
``tasks``      3      ``scoring`` (one LM scorer, one BOS/pad rule), ``lm``,
                      ``classification``, ``qa``, ``passkey``, ``retrieval``
``experiments`` 4     ``settings`` (one ``Setting``), ``sweep``, ``accuracy``,
                      ``perplexity``, ``summaries``, ``inputs``, ``training/``
``bench``      4      ``harness``, ``meters``, ``workloads``, ``suites``, ``store``,
                      ``report``, ``__main__``
``plots``      5      ``style`` (``use_style``, ``save_figure``) and one module per
                      notebook family; plots take frames and return figures
``app``        6      the explorer of notebook 06 (``explorer``, ``session``)
=============  =====  ==================================================================

Packages on one layer do not import each other. Four cuts differ from a first sketch, each
to keep a module to one job and under 500 lines: the capture's shared machinery (checks,
the per-layer runner, the frame builder) is ``analysis.recording``, used by the attention
and the MLP capture alike; the kernels' input checks are ``kernels.checks``; the
perplexity sweep and its command line sit in ``experiments.perplexity`` because they are
built on ``Setting``; benchmark row helpers that compute on data (``method_label``,
``ratio_at``) are in ``bench.report`` so that plots only draw.
"""

from topk_lib.analysis.capture import capture_attention_stats
from topk_lib.analysis.mlp import capture_mlp_stats
from topk_lib.hf.layers import describe_layers
from topk_lib.hf.loading import load_model
from topk_lib.hf.patching import use_sparse, use_topk
from topk_lib.kernels.attention import chunked_attention, topk_attention, vanilla_attention
from topk_lib.kernels.feedforward import topk_feedforward

__all__ = [
    "topk_attention",
    "chunked_attention",
    "vanilla_attention",
    "topk_feedforward",
    "load_model",
    "use_topk",
    "use_sparse",
    "describe_layers",
    "capture_attention_stats",
    "capture_mlp_stats",
]
