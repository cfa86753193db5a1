"""Statistics capture against a brute-force reference on tiny random Llama (GQA) and BERT models.

The reference runs the same model with ``attn_implementation="eager"`` and
``output_attentions=True``, takes the full attention matrices and the value vectors (a hook
on the value projection), applies :mod:`topk_lib.analysis.metrics` row by row and aggregates with
numpy. The capture must give the same frame.
"""

import math

import numpy as np
import pytest
import torch
import tiny_models
from transformers import T5EncoderModel, T5ForConditionalGeneration

from topk_lib.analysis import metrics
from topk_lib.analysis.capture import (
    CAPTURE_IMPLEMENTATION,
    bucket_bounds,
    capture_attention_stats,
    record_attention_stats,
)
from topk_lib.analysis.mlp import MLPStats, NeuronUsage, capture_mlp_stats, record_mlp_stats
from topk_lib.analysis.recording import COLUMNS
from topk_lib.hf.registry import attention_handler
from reference import dense_attention_stats

KS = (1, 2, 3, 5, 8, 64)  # 64 > L: exact
FRACS = (0.5, 0.9, 0.99)
ATOL, RTOL = 2e-5, 1e-4


# --------------------------------------------------------------------------- tiny models


def tiny_llama(attn="eager", dtype=torch.float32):
    return tiny_models.sharpen(tiny_models.tiny_llama(attn), 15.0).to(dtype)


def tiny_bert(attn="eager"):
    return tiny_models.sharpen(tiny_models.tiny_bert(attn), 15.0)


def tiny_t5(cls=T5EncoderModel):
    return tiny_models.tiny_t5(cls, attn="eager")


def _ids(b, length, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 101, (b, length), generator=g)


# --------------------------------------------------------------------------- brute-force reference


def _layers(model):
    return model.model.layers if hasattr(model, "model") else model.encoder.layer


def as_dict(df):
    k = df["k"].astype(object).where(df["k"].notna(), None)
    head = df["head"].astype(object).where(df["head"].notna(), None)
    keys = zip(df["layer"], head, df["bucket"], k, df["metric"])
    return {(int(layer), None if h is None else int(h), b, None if kk is None else int(kk), m): v
            for (layer, h, b, kk, m), v in zip(keys, df["value"])}


def assert_matches(got, ref, atol=ATOL, rtol=RTOL):
    missing, extra = sorted(set(ref) - set(got), key=str), sorted(set(got) - set(ref), key=str)
    assert not missing and not extra, f"missing {missing[:5]}, extra {extra[:5]}"
    bad = [(key, got[key], ref[key]) for key in ref if not math.isclose(got[key], ref[key], abs_tol=atol, rel_tol=rtol)]
    assert not bad, f"{len(bad)} of {len(ref)} values differ, e.g. {bad[:5]}"


# --------------------------------------------------------------------------- attention against the reference


@pytest.mark.parametrize("chunk_size", [3, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_llama_gqa_causal_matches_reference(chunk_size, dtype):
    model = tiny_llama(dtype=dtype)
    ids = _ids(2, 21)
    ref = dense_attention_stats(model, ids)
    # the rows are peaked enough for the metrics to tell heads apart (not near-uniform)
    top1 = [v for (_, _, b, k, m), v in ref.items() if m == "mass_kept" and k == 1 and b == "all"]
    assert 0.5 < max(top1) < 0.95
    df = capture_attention_stats(model, ids, ks=KS, fracs=FRACS, chunk_size=chunk_size, progress=False)
    # eager Llama attention takes its softmax in float32 even for float64 models: float32 tolerance
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float64 else {}
    assert_matches(as_dict(df), ref, **tol)


def test_llama_left_padding_and_custom_buckets_match_reference():
    model = tiny_llama()
    ids = _ids(2, 17, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding: positions and the sink key start after it
    buckets = [0, 4, 9]
    ref = dense_attention_stats(model, ids, mask, position_buckets=buckets)
    df = capture_attention_stats(model, ids, attention_mask=mask, position_buckets=buckets, ks=KS, fracs=FRACS,
                                 chunk_size=5, progress=False)
    assert_matches(as_dict(df), ref)
    assert set(df["bucket"]) == {"all", "0-3", "4-8", "9+"}
    assert (df.query("metric == 'n_rows' and bucket == 'all'")["value"] == 17 + 11).all()


def test_bert_padding_rows_excluded():
    model = tiny_bert()
    ids = _ids(2, 12, seed=5)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # second sequence has 7 tokens, right padding
    ref = dense_attention_stats(model, ids, mask)
    df = capture_attention_stats(model, ids, attention_mask=mask, ks=KS, fracs=FRACS, chunk_size=4, progress=False)
    assert_matches(as_dict(df), ref)
    n_rows = df.query("metric == 'n_rows' and bucket == 'all'")["value"]
    assert len(n_rows) == 2 * 4 and (n_rows == 12 + 7).all()
    # The padded sequence alone, with its padding, gives the statistics of the unpadded sequence.
    alone = capture_attention_stats(model, ids[1:, :7], ks=KS, fracs=FRACS, progress=False)
    padded = capture_attention_stats(model, ids[1:], attention_mask=mask[1:], ks=KS, fracs=FRACS, progress=False)
    assert_matches(as_dict(padded), as_dict(alone))
    # ... and counting the padding rows would change them (the test can tell).
    unmasked = capture_attention_stats(model, ids[1:], ks=KS, fracs=FRACS, progress=False)
    assert not np.allclose(unmasked.query("bucket == 'all'")["value"], padded.query("bucket == 'all'")["value"])


def test_t5_encoder_relative_position_bias_and_padding_match_reference():
    model = tiny_t5()
    ids = _ids(2, 10, seed=9)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ref = dense_attention_stats(model, ids, mask)
    df = capture_attention_stats(model, ids, attention_mask=mask, ks=KS, fracs=FRACS, chunk_size=3, progress=False)
    assert_matches(as_dict(df), ref)


def test_encoder_decoder_is_refused_with_a_hint():
    with pytest.raises(ValueError, match="get_encoder"):
        capture_attention_stats(tiny_t5(T5ForConditionalGeneration), _ids(1, 6), progress=False)


def test_results_do_not_depend_on_chunk_size_or_starting_implementation():
    ids = _ids(1, 19, seed=7)
    a = capture_attention_stats(tiny_llama("eager"), ids, ks=KS, chunk_size=2, progress=False)
    b = capture_attention_stats(tiny_llama("sdpa"), ids, ks=KS, chunk_size=100, progress=False)
    assert_matches(as_dict(a), as_dict(b), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- the model is untouched


def test_outputs_inside_context_equal_vanilla_and_restored_after():
    model = tiny_llama("sdpa")
    ids = _ids(2, 15)
    with torch.no_grad():
        vanilla = model(ids).logits
    with record_attention_stats(model, ks=(1, 4), progress=False) as rec:
        assert model.config._attn_implementation == CAPTURE_IMPLEMENTATION
        inside = rec.run(ids).logits
        with torch.no_grad():
            direct = model(ids).logits  # a plain call is recorded too
    torch.testing.assert_close(inside, vanilla, atol=1e-6, rtol=0)
    torch.testing.assert_close(direct, vanilla, atol=1e-6, rtol=0)
    df = rec.frame()
    assert set(df["layer"]) == {0, 1} and set(df["head"].dropna()) == set(range(6))
    assert (df.query("metric == 'n_rows' and bucket == 'all'")["value"] == 2 * 2 * 15).all()  # two forwards
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, vanilla, atol=0, rtol=0)


def test_restored_on_exception():
    model = tiny_llama("sdpa")
    downs = [layer.mlp.down_proj for layer in model.model.layers]
    with pytest.raises(RuntimeError, match="boom"):
        with record_attention_stats(model), record_mlp_stats(model):
            assert model.config._attn_implementation == CAPTURE_IMPLEMENTATION
            assert all(d._forward_pre_hooks for d in downs)
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    assert not any(attention_handler(m, CAPTURE_IMPLEMENTATION) for m in model.modules())
    assert not any(d._forward_pre_hooks for d in downs)


def test_nested_contexts_restore_the_outer_one():
    model = tiny_llama("sdpa")
    ids = _ids(1, 9)
    with record_attention_stats(model, ks=(1,)) as outer:
        with record_attention_stats(model, ks=(2,)) as inner:
            inner.run(ids)
        assert model.config._attn_implementation == CAPTURE_IMPLEMENTATION
        outer.run(ids)
    assert set(inner.frame()["k"].dropna()) == {2} and set(outer.frame()["k"].dropna()) == {1}
    assert (outer.frame().query("metric == 'n_rows' and bucket == 'all'")["value"] == 9).all()
    assert model.config._attn_implementation == "sdpa"


# --------------------------------------------------------------------------- schema and arguments


def test_frame_schema():
    model = tiny_llama()
    df = capture_attention_stats(model, _ids(1, 20), ks=(1, 4), fracs=(0.9, 0.99), progress=False)
    assert list(df.columns) == COLUMNS
    assert df["layer"].dtype == np.int64 and df["value"].dtype == np.float64
    assert str(df["head"].dtype) == "Int64" and str(df["k"].dtype) == "Int64"
    per_k = {"mass_kept", "kl", "rel_error", "rel_error_row_mean"}
    no_k = {"entropy", "sink_mass", "k90_mean", "k90_median", "k99_mean", "k99_median", "n_rows"}
    assert set(df["metric"]) == per_k | no_k
    assert df.loc[df["metric"].isin(per_k), "k"].notna().all()
    assert df.loc[df["metric"].isin(no_k), "k"].isna().all()
    assert set(df["bucket"]) == {"all", "0", "1", "2-3", "4-7", "8-15", "16-31"}
    assert not df.duplicated(["layer", "head", "bucket", "k", "metric"]).any()
    assert df["value"].notna().all()
    assert len(df) == 2 * 6 * 7 * (4 * 2 + 7)
    assert bucket_bounds("16-31") == (16, 31) and bucket_bounds("0") == (0, 0)
    assert bucket_bounds("512+") == (512, math.inf) and bucket_bounds("all") == (0, math.inf)


@pytest.mark.parametrize(
    "kwargs, match, error",
    [
        (dict(ks=(0, 2)), "ks", ValueError),
        (dict(ks=4), "ks", TypeError),
        (dict(fracs=(0.9, 1.5)), "fracs", ValueError),
        (dict(position_buckets=[1, 4]), "position_buckets", ValueError),
        (dict(position_buckets="linear"), "position_buckets", ValueError),
        (dict(chunk_size=0), "chunk_size", ValueError),
        (dict(attention_mask=torch.ones(1, 5, dtype=torch.long)), "attention_mask", ValueError),
    ],
)
def test_bad_arguments(kwargs, match, error):
    model = tiny_llama()
    with pytest.raises(error, match=match):
        capture_attention_stats(model, _ids(1, 8), progress=False, **kwargs)
    assert model.config._attn_implementation == "eager"


def test_bad_input_ids():
    with pytest.raises(TypeError, match="input_ids"):
        capture_attention_stats(tiny_llama(), torch.rand(1, 8), progress=False)


# --------------------------------------------------------------------------- feed-forward


def _hidden(model, ids, mask=None):
    """Reference: the input of each MLP's output projection, non-padding tokens only: {layer: [N, d_ff]}."""
    store, handles = {}, []
    for i, layer in enumerate(_layers(model)):
        lin = layer.mlp.down_proj if hasattr(layer, "mlp") else layer.output.dense
        handles.append(lin.register_forward_pre_hook(lambda m, args, i=i: store.__setitem__(i, args[0].detach())))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    keep = (torch.ones_like(ids) if mask is None else mask).bool().reshape(-1)
    return {i: h.reshape(-1, h.shape[-1])[keep] for i, h in store.items()}


def _used(h, k):
    """Neurons among the k largest |h| of at least one token (ties are absent in random activations)."""
    idx = torch.topk(h.abs(), min(k, h.shape[-1]), dim=-1).indices  # [N, k]
    used = torch.zeros(h.shape[-1], dtype=torch.bool)
    used[idx.reshape(-1)] = True
    return used


MLP_KS = (1, 4, 16, 200)


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert], ids=["llama", "bert"])
def test_mlp_stats_match_reference(make):
    model = make()
    ids = _ids(2, 13, seed=11)
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    hidden = _hidden(model, ids, mask)
    stats = capture_mlp_stats(model, ids, attention_mask=mask, ks=MLP_KS, fracs=FRACS, progress=False)
    assert isinstance(stats, MLPStats) and stats.tokens == 13 + 9 and stats.ks == MLP_KS
    got = as_dict(stats.frame)
    ref = {}
    for layer, h in hidden.items():
        kf = metrics.k_for_abs_mass(h, list(FRACS)).double().numpy()  # [N, n_f]
        for i, f in enumerate(FRACS):
            ref[(layer, None, "all", None, f"k{100 * f:g}_mean")] = kf[:, i].mean()
            ref[(layer, None, "all", None, f"k{100 * f:g}_median")] = np.median(kf[:, i])
        for k in MLP_KS:
            ref[(layer, None, "all", k, "mass_kept")] = metrics.mass_kept(h.abs(), k).mean().item()
            ref[(layer, None, "all", k, "neuron_usage")] = _used(h, k).double().mean().item()
            counts = torch.zeros(h.shape[-1], dtype=torch.long)
            counts.index_add_(0, torch.topk(h.abs(), min(k, h.shape[-1]), -1).indices.reshape(-1),
                              torch.ones(h.shape[0] * min(k, h.shape[-1]), dtype=torch.long))
            assert np.array_equal(stats.counts[layer][MLP_KS.index(k)], counts.numpy())
        ref[(layer, None, "all", None, "n_tokens")] = float(h.shape[0])
    assert_matches(got, ref)
    assert list(stats.frame.columns) == COLUMNS


def test_neuron_usage_accumulates_over_inputs():
    model = tiny_llama()
    inputs = [_ids(1, 6, seed=s) for s in (20, 21, 22)]
    usage = NeuronUsage()
    for ids in inputs:
        usage.update(capture_mlp_stats(model, ids, ks=MLP_KS, progress=False))
    assert usage.tokens == 18
    hidden = [_hidden(model, ids) for ids in inputs]
    frac = usage.fraction()
    assert list(frac.columns) == COLUMNS and set(frac["metric"]) == {"neuron_usage"}
    got = as_dict(frac)
    one = as_dict(capture_mlp_stats(model, inputs[0], ks=MLP_KS, progress=False).frame)
    grew = False
    for layer in (0, 1):
        h_all = torch.cat([h[layer] for h in hidden])  # every token of the corpus
        for k in MLP_KS:
            expected = _used(h_all, k).double().mean().item()
            assert math.isclose(got[(layer, None, "all", k, "neuron_usage")], expected)
            grew |= expected > one[(layer, None, "all", k, "neuron_usage")]
    assert grew  # the corpus uses more neurons than one input: the sum is not a no-op
    with pytest.raises(ValueError, match="ks"):
        usage.update(capture_mlp_stats(model, inputs[0], ks=(1, 2), progress=False))


def test_mlp_stats_inside_topk_feedforward_raise():
    from topk_lib import use_topk

    model = tiny_llama()
    with use_topk(model, ff_k=8), pytest.raises(RuntimeError, match="output projection"):
        capture_mlp_stats(model, _ids(1, 5), progress=False)
