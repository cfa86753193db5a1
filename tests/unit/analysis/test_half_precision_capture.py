"""The attention and feed-forward statistics of a model run in bfloat16 and float16, against float32.

The half model and its float32 reference hold the *same* (rounded) weights, so the
differences are those of running the model in half precision: its activations drift a
little through the layers, while the capture itself computes the statistics in float32 on
the upcast q, k, v. Tolerances are absolute and sit at about 3-8x the maximum differences
measured on CPU (tiny Llama, 2 x 40 random tokens), which each test's docstring gives.
"""

import copy

import pytest
import torch

from tests.tiny_models import sharpen, tiny_llama
from topk_lib.analysis.capture import capture_attention_stats
from topk_lib.analysis.mlp import capture_mlp_stats

HALF = [torch.bfloat16, torch.float16]
_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, _CUDA])]

#: metric -> {dtype: tolerance}; rel_error only where the float32 value is below 0.5 (where
#: o_k approximates o: a k that keeps little of a row gives o_k far from o, and a small drift
#: of the activations moves that large ratio a lot).
ATTENTION_ATOL = {
    "probabilities": {torch.bfloat16: 4e-3, torch.float16: 5e-4},  # mass_kept, kl, entropy, sink_mass
    "k_mean": {torch.bfloat16: 0.5, torch.float16: 0.5},  # k90_mean, k99_mean: means of integers
    "rel_error": {torch.bfloat16: 3e-2, torch.float16: 5e-4},
}


def _pair(dtype, device):
    half = copy.deepcopy(sharpen(tiny_llama(), 3.0)).to(device, dtype)
    return copy.deepcopy(half).float(), half  # the same rounded weights, run in float32 and in half


def _ids(device):
    return torch.randint(3, 101, (2, 40), generator=torch.Generator().manual_seed(0)).to(device)


def _joined(a, b):
    keys = [c for c in a.columns if c != "value"]
    j = a.merge(b, on=keys, suffixes=("_ref", "_half"))
    assert len(j) == len(a) == len(b)
    assert j.value_ref.isna().equals(j.value_half.isna())
    j["diff"] = (j.value_ref - j.value_half).abs()
    return j


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
def test_attention_stats_in_half_precision(device, dtype):
    """Measured max |difference| on CPU: probabilities bfloat16 8.3e-4, float16 1.2e-4;
    k90/k99 means 0.125, 0; medians 0 (compared exactly up to 1); rel_error (float32 < 0.5)
    bfloat16 7.2e-3, float16 8.0e-5."""
    ref, half = _pair(dtype, device)
    kw = dict(ks=(1, 4, 16), progress=False)
    j = _joined(capture_attention_stats(ref, _ids(device), **kw), capture_attention_stats(half, _ids(device), **kw))
    by = j.groupby("metric")["diff"].max()
    assert by[["mass_kept", "kl", "entropy", "sink_mass"]].max() <= ATTENTION_ATOL["probabilities"][dtype]
    assert by[["k90_mean", "k99_mean"]].max() <= ATTENTION_ATOL["k_mean"][dtype]
    assert by[["k90_median", "k99_median"]].max() <= 1 and by["n_rows"] == 0
    rel = j[j.metric.str.startswith("rel_error") & (j.value_ref < 0.5)]
    assert len(rel) > 50 and rel["diff"].max() <= ATTENTION_ATOL["rel_error"][dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
def test_mlp_stats_in_half_precision(device, dtype):
    """Measured max |difference| on CPU: mass_kept 7.3e-5 (bfloat16), 9e-6 (float16);
    k90/k99 means 0.025; neuron_usage 0.0104 (one neuron of 96) in bfloat16, 0 in float16."""
    ref, half = _pair(dtype, device)
    kw = dict(ks=(4, 16), progress=False)
    j = _joined(capture_mlp_stats(ref, _ids(device), **kw).frame, capture_mlp_stats(half, _ids(device), **kw).frame)
    by = j.groupby("metric")["diff"].max()
    assert by["mass_kept"] <= 1e-3
    assert by[["k90_mean", "k99_mean"]].max() <= 0.2 and by["n_tokens"] == 0
    assert by["neuron_usage"] <= 3 / 96  # a neuron or so of d_ff = 96 swapping in or out of the top k
