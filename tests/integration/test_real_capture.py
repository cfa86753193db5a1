"""Attention statistics of the real SmolLM2 fall in sensible ranges (slow)."""

import math

import numpy as np
import pytest

from topk_lib.analysis.capture import capture_attention_stats
from topk_lib.analysis.mlp import capture_mlp_stats

KS = (1, 2, 3, 5, 8, 64)  # 64 > L: exact
FRACS = (0.5, 0.9, 0.99)
ATOL, RTOL = 2e-5, 1e-4


# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_ranges():
    from topk_lib.data.corpora import pydoc_text
    from topk_lib.hf.loading import load_model

    model, tok = load_model("smollm2-135m")
    text = pydoc_text(topics=["assert", "assignment", "atom-identifiers"])
    ids = tok(text, return_tensors="pt")["input_ids"][:, :256]
    assert ids.shape[1] == 256
    ks = (1, 4, 16, 64, 256)
    df = capture_attention_stats(model, ids, ks=ks, progress=False)
    assert set(df["layer"]) == set(range(30)) and set(df["head"].dropna()) == set(range(9))
    assert df["value"].notna().all()
    mass = df[df["metric"] == "mass_kept"].pivot_table(index=["layer", "head", "bucket"], columns="k", values="value")
    assert ((mass >= 0) & (mass <= 1 + 1e-6)).all().all()
    assert (mass.diff(axis=1).iloc[:, 1:] >= -1e-6).all().all()  # non-decreasing in k
    assert np.allclose(mass[256], 1.0)
    wide = df[df["k"].isna()].pivot_table(index=["layer", "head", "bucket"], columns="metric", values="value")
    assert (wide["k99_mean"] >= wide["k90_mean"]).all() and (wide["k99_median"] >= wide["k90_median"]).all()
    assert (wide["k90_mean"] >= 1).all() and (wide["k99_mean"] <= 256).all()
    assert ((wide["sink_mass"] >= 0) & (wide["sink_mass"] <= 1)).all()
    assert ((wide["entropy"] >= 0) & (wide["entropy"] <= math.log(256) + 1e-6)).all()
    err = df[(df["metric"] == "rel_error") & (df["k"] == 256)]["value"]
    assert (err.abs() < 1e-5).all()

    stats = capture_mlp_stats(model, ids, ks=(16, 256, 1536), progress=False)
    f = stats.frame.pivot_table(index="layer", columns=["metric", "k"], values="value", dropna=False)
    assert len(f) == 30
    usage = stats.frame[stats.frame["metric"] == "neuron_usage"].pivot_table(index="layer", columns="k", values="value")
    assert ((usage > 0) & (usage <= 1)).all().all() and (usage.diff(axis=1).iloc[:, 1:] >= 0).all().all()
    kf = stats.frame[stats.frame["k"].isna()].pivot_table(index="layer", columns="metric", values="value")
    assert (kf["k99_mean"] >= kf["k90_mean"]).all() and (kf["k99_mean"] <= 1536).all()
