"""Accuracy-versus-k sweeps: settings, bootstrap intervals, caching, summaries and plots (topk_lib.experiments)."""

import json
import math
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
from tiny_models import TEXT

from topk_lib import data
from topk_lib.analysis.budget import scale_budget
from topk_lib.experiments import accuracy, inputs, summaries, sweep
from topk_lib.experiments.settings import Setting, settings_grid
from topk_lib.experiments.sweep import bootstrap_ci
from topk_lib.plots import accuracy as plot_accuracy
from topk_lib.tasks.lm import perplexity


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_constant_data_has_zero_width():
    assert bootstrap_ci(np.full(50, 0.7)) == pytest.approx((0.7, 0.7, 0.7))


def test_bootstrap_bernoulli_matches_normal_approximation():
    n, p = 2000, 0.3
    values = np.r_[np.ones(int(n * p)), np.zeros(n - int(n * p))]
    est, lo, hi = bootstrap_ci(values, n_resamples=4000, seed=1)
    half = 1.96 * math.sqrt(p * (1 - p) / n)  # 0.0201
    assert est == pytest.approx(p)
    assert lo == pytest.approx(p - half, abs=0.003) and hi == pytest.approx(p + half, abs=0.003)
    assert bootstrap_ci(values, seed=1) == bootstrap_ci(values, seed=1)  # deterministic
    wider = bootstrap_ci(values, level=0.99, seed=1)
    assert wider[1] < lo and wider[2] > hi


def test_bootstrap_ratio_and_transform():
    sums, counts = np.array([10.0, 2.0, 6.0]), np.array([5.0, 1.0, 4.0])
    est, lo, hi = bootstrap_ci(sums, weights=counts, transform=np.exp)
    assert est == pytest.approx(math.exp(18 / 10))
    # every resample's ratio lies between the smallest and largest unit ratio
    assert math.exp(1.5) <= lo <= est <= hi <= math.exp(2.0)


def test_bootstrap_bad_arguments():
    with pytest.raises(ValueError, match="values"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="weights"):
        bootstrap_ci([1.0, 2.0], weights=[1.0])
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([1.0], level=95)


def test_block_sums_stay_inside_windows():
    a = np.arange(10, dtype=float).reshape(2, 5)
    s, c = sweep.block_sums(a, block=2)
    assert s.tolist() == [1, 5, 4, 11, 15, 9] and c.tolist() == [2, 2, 1, 2, 2, 1]


# --------------------------------------------------------------------------- settings


def test_settings_grid_names_and_kwargs():
    budget = {(0, 0): 2, (0, 1): 6, (1, 0): 4, (1, 1): 4}
    grid = settings_grid(attn_ks=[8], ff_ks=[96], both=[(8, 96)], budgets={4: budget})
    assert [s.name for s in grid] == ["vanilla", "attn8", "ff96", "attn8_ff96", "budget4"]
    assert [s.kind for s in grid] == ["vanilla", "attention", "ff", "both", "budget"]
    assert math.isnan(grid[0].x) and grid[2].x == 96 and grid[3].x == 8 and grid[4].x == 4
    assert grid[4].topk() == {"attn_k": budget, "ff_k": None}
    assert grid[3].topk() == {"attn_k": 8, "ff_k": 96}
    json.dumps(grid[4].config())  # JSON-able cache key


def test_settings_validation():
    with pytest.raises(ValueError, match="attn_ks"):
        settings_grid(attn_ks=[0])
    with pytest.raises(ValueError, match="share a name"):
        settings_grid(attn_ks=[8, 8])
    with pytest.raises(ValueError, match="kind"):
        Setting("sparse")
    with pytest.raises(ValueError, match="ff_k"):
        Setting("attention", attn_k=8, ff_k=4)


# --------------------------------------------------------------------------- caching


def test_run_sweep_caches_and_skips(tmp_path, monkeypatch):
    monkeypatch.setenv("TOPK_LAB_RESULTS", str(tmp_path))  # paths.results() is read at call time
    calls = []

    def compute(setting):
        calls.append(setting.name)
        return {"value": len(calls)}

    grid = settings_grid(attn_ks=[4, 8])
    first = sweep.run_sweep("toy", grid, config={"data": 1}, compute=compute, progress=False)
    assert calls == ["vanilla", "attn4", "attn8"] and all(r["computed"] for r in first)
    files = sorted(p.name for p in (tmp_path / "accuracy" / "toy").iterdir())
    assert len(files) == 3 and all(f.endswith(".json") for f in files)  # no temporary files left
    again = sweep.run_sweep("toy", grid, config={"data": 1}, compute=compute, progress=False)
    assert calls == ["vanilla", "attn4", "attn8"]  # nothing recomputed
    assert [r["value"] for r in again] == [1, 2, 3] and not any(r["computed"] for r in again)
    sweep.run_sweep("toy", grid[:1], config={"data": 2}, compute=compute, progress=False)
    assert calls[-1] == "vanilla" and len(calls) == 4  # a changed config is a new result


def test_interrupted_sweep_resumes(tmp_path):
    calls = []

    def compute(setting):
        if setting.name == "attn8" and not calls.count("boom"):
            calls.append("boom")
            raise KeyboardInterrupt
        calls.append(setting.name)
        return {}

    grid = settings_grid(attn_ks=[4, 8])
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep("toy", grid, config={}, compute=compute, progress=False, root=tmp_path)
    sweep.run_sweep("toy", grid, config={}, compute=compute, progress=False, root=tmp_path)
    assert calls == ["vanilla", "attn4", "boom", "attn8"]


def test_a_cut_or_incomplete_sweep_record_is_reported_and_recomputed(tmp_path):
    from topk_lib.infra.cache import CorruptCacheWarning

    calls = []

    def compute(setting):
        calls.append(setting.name)
        return {"nll": [[1.0, 2.0]], "correct": [[1, 0]]}

    grid = [Setting("vanilla")]
    kw = dict(config={"data": 1}, compute=compute, progress=False, root=tmp_path, required=("nll", "correct"))
    sweep.run_sweep("toy", grid, **kw)
    (path,) = (tmp_path / "toy").glob("*.json")
    good = json.loads(path.read_text())
    path.write_text(path.read_text()[:40])  # a crash mid-write by a tool that does not write atomically
    with pytest.warns(CorruptCacheWarning, match=path.name):
        (rec,) = sweep.run_sweep("toy", grid, **kw)
    assert rec["computed"] and calls == ["vanilla", "vanilla"]
    path.write_text(json.dumps({k: v for k, v in good.items() if k != "nll"}))  # what the reader needs is gone
    with pytest.warns(CorruptCacheWarning, match=r"lacks the keys \['nll'\]"):
        (rec,) = sweep.run_sweep("toy", grid, **kw)
    assert rec["computed"] and rec["nll"] == [[1.0, 2.0]] and "nll" in json.loads(path.read_text())


def _fingerprint_sweep(model, root, calls):
    def compute(setting):
        calls.append(next(model.parameters()).dtype)
        return {"value": 1.0}

    (rec,) = sweep.run_sweep("toy", [Setting("vanilla")], config={"model": "tiny", "data": 1}, compute=compute,
                             progress=False, root=root, model=model, required=("value",))
    return rec


def test_a_sweep_record_knows_its_model(tmp_path):
    import copy
    import warnings

    import torch
    from tiny_models import tiny_llama

    from topk_lib.infra.cache import CacheWarning

    torch.manual_seed(0)
    model = tiny_llama()
    calls = []
    first = _fingerprint_sweep(model, tmp_path, calls)
    (plain,) = (tmp_path / "toy").glob("*.json")
    assert first["model_fingerprint"]["dtype"] == "float32" and first["model_fingerprint"]["device"] == "cpu"
    assert json.loads(plain.read_text())["model_fingerprint"] == first["model_fingerprint"]

    reloaded = copy.deepcopy(model)  # the same weights in another object: the record is used
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not _fingerprint_sweep(reloaded, tmp_path, calls)["computed"] and calls == [torch.float32]

    half = copy.deepcopy(model).to(torch.bfloat16)  # same name, same data, other numbers
    with pytest.warns(CacheWarning, match=rf"{plain.name} holds the results of another model"):
        got = _fingerprint_sweep(half, tmp_path, calls)
    assert got["computed"] and calls == [torch.float32, torch.bfloat16]
    assert got["model_fingerprint"]["dtype"] == "bfloat16"
    assert json.loads(plain.read_text()) == {k: v for k, v in first.items() if k != "computed"}  # kept
    assert len(list((tmp_path / "toy").glob("*.json"))) == 2
    with pytest.warns(CacheWarning):  # the bfloat16 results are now cached beside the float32 ones
        assert not _fingerprint_sweep(half, tmp_path, calls)["computed"]

    edited = copy.deepcopy(model)
    with torch.no_grad():
        next(edited.parameters())[0, 0] += 1.0
    with pytest.warns(CacheWarning):
        assert _fingerprint_sweep(edited, tmp_path, calls)["computed"] and len(calls) == 3
    assert not _fingerprint_sweep(model, tmp_path, calls)["computed"] and len(calls) == 3


def test_a_record_for_another_model_is_rejected_where_it_is_read(tmp_path):
    """The file a bfloat16 copy's results go to, holding a record of yet another model, is recomputed."""
    import copy

    import torch
    from tiny_models import tiny_llama

    from topk_lib.infra.cache import CacheWarning, CorruptCacheWarning

    torch.manual_seed(0)
    model, calls = tiny_llama(), []
    _fingerprint_sweep(model, tmp_path, calls)
    (plain,) = (tmp_path / "toy").glob("*.json")
    half = copy.deepcopy(model).to(torch.bfloat16)
    mine = sweep.model_fingerprint(half)
    alt = plain.with_name(f"{plain.stem}_{sweep.config_key(mine)}.json")
    alt.write_text(json.dumps({**json.loads(plain.read_text()), "model_fingerprint": {**mine, "weights": "0" * 16}}))
    with pytest.warns(CacheWarning) as caught:
        assert _fingerprint_sweep(half, tmp_path, calls)["computed"]
    rejected = [str(w.message) for w in caught if w.category is CorruptCacheWarning]
    assert len(rejected) == 1 and f"{alt.name} is rejected: it was computed for another model" in rejected[0]
    assert json.loads(alt.read_text())["model_fingerprint"] == mine


def test_records_without_a_fingerprint_are_used_as_they_are(tmp_path):
    import torch
    from tiny_models import tiny_llama

    model, calls = tiny_llama(), []
    _fingerprint_sweep(model, tmp_path, calls)
    (plain,) = (tmp_path / "toy").glob("*.json")
    plain.write_text(json.dumps({k: v for k, v in json.loads(plain.read_text()).items() if k != "model_fingerprint"}))
    assert not _fingerprint_sweep(model.to(torch.bfloat16), tmp_path, calls)["computed"] and len(calls) == 1


def test_model_fingerprint_is_pinned_and_cheap():
    import time

    import torch
    from tiny_models import tiny_llama

    torch.manual_seed(0)
    model = tiny_llama()
    t0 = time.perf_counter()
    fp = sweep.model_fingerprint(model)
    assert time.perf_counter() - t0 < 0.5
    assert set(fp) == {"dtype", "device", "weights"} and len(fp["weights"]) == 16
    assert sweep.model_fingerprint(model) == fp
    assert sweep.model_fingerprint(model.to(torch.float64))["weights"] != fp["weights"]


# --------------------------------------------------------------------------- task sweeps on tiny models


def test_lm_sweep_matches_lm_eval(llama, tok, tmp_path):
    grid = settings_grid(attn_ks=[1, 64], ff_ks=[64])
    df = accuracy.lm_sweep(llama, tok, TEXT, model_name="tiny", corpus="toy", settings=grid, window=40,
                           n_windows=3, block=8, progress=False, root=tmp_path)
    ppl = df[df.metric == "perplexity"].set_index("setting")
    ref = perplexity(llama, tok, TEXT, window=40, n_windows=3)
    assert ppl.loc["vanilla", "value"] == pytest.approx(ref["perplexity"], rel=1e-4)
    assert ppl.loc["vanilla", "lo"] < ppl.loc["vanilla", "value"] < ppl.loc["vanilla", "hi"]
    assert ppl.loc["attn64", "value"] == pytest.approx(ref["perplexity"], rel=1e-4)  # k >= L is exact
    assert ppl.loc["ff64", "value"] == pytest.approx(ref["perplexity"], rel=1e-4)  # k = d_ff is exact
    assert abs(ppl.loc["attn1", "value"] - ref["perplexity"]) > 1e-3
    acc = df[(df.metric == "accuracy") & (df.setting == "vanilla")].value.item()
    assert acc == pytest.approx(ref["accuracy"])
    assert set(df.task) == {"lm_toy_40"} and df.n.eq(3 * 39).all()


def test_classification_qa_passkey_sweeps_smoke(llama, tok, tmp_path):
    grid = settings_grid(attn_ks=[2], ff_ks=[8])
    examples = [("a fine film", "pos"), ("dull and long", "neg"), ("the best", "pos"), ("awful", "neg")]
    cls = accuracy.classification_sweep(llama, tok, examples, model_name="tiny", task="polarity", template="{text}:",
                                        labels={"pos": " good", "neg": " bad"}, settings=grid, progress=False,
                                        root=tmp_path)
    assert set(cls.metric) == {"accuracy", "accuracy_raw"} and cls.value.between(0, 1).all() and cls.n.eq(4).all()
    qa = accuracy.qa_sweep(llama, tok, [("Who?", "me"), ("When?", "now")], model_name="tiny", settings=grid,
                           max_new_tokens=3, progress=False, root=tmp_path)
    assert set(qa.metric) == {"contains", "exact"} and len(qa) == 6
    pk = accuracy.passkey_sweep(llama, tok, model_name="tiny", settings=grid[:2], lengths=[100, 150], depths=[0.5],
                                n_per_cell=2, progress=False, root=tmp_path)
    assert set(pk.task) == {"passkey", "passkey_100", "passkey_150"}
    assert pk[(pk.task == "passkey") & (pk.metric == "accuracy")].n.eq(4).all()


def test_retrieval_sweep_cosine(bert, tok, tmp_path):
    pairs = [("the whale swam far", "it was a white whale"), ("congress passed the budget", "taxes rose"),
             ("a dog in the rain", "wet fur everywhere")]
    grid = settings_grid(attn_ks=[64, 1], ff_ks=[64])
    df = accuracy.retrieval_sweep(bert, tok, pairs, model_name="tiny-bert", settings=grid[1:], progress=False,
                                  root=tmp_path)  # no vanilla setting first: the reference is computed anyway
    cos = df[df.metric == "cosine"].set_index("setting").value
    assert cos["attn64"] == pytest.approx(1.0, abs=1e-6) and cos["ff64"] == pytest.approx(1.0, abs=1e-6)
    assert cos["attn1"] < 1 - 1e-5  # random tiny BERT: small but clear
    mrr = df[df.metric == "mrr"].value
    assert mrr.between(1 / 3, 1).all()


# --------------------------------------------------------------------------- summaries


def _summary(rows):
    base = dict(sweep="s", attn_k=pd.NA, ff_k=pd.NA, nominal_k=np.nan, lo=np.nan, hi=np.nan, n=10, seconds=1.0,
                computed=True)
    return pd.DataFrame([{**base, **r} for r in rows])


def test_smallest_k_within():
    rows = [dict(task="t", kind="vanilla", setting="vanilla", x=np.nan, metric="accuracy", value=0.80)]
    rows += [dict(task="t", kind="attention", setting=f"attn{k}", x=k, metric="accuracy", value=v)
             for k, v in [(64, 0.81), (32, 0.795), (16, 0.75), (8, 0.795)]]  # k=8 recovers by chance: ignored
    rows += [dict(task="u", kind="vanilla", setting="vanilla", x=np.nan, metric="accuracy", value=0.5),
             dict(task="u", kind="attention", setting="attn64", x=64, metric="accuracy", value=0.3)]
    out = summaries.smallest_k_within(_summary(rows), metric="accuracy", kind="attention").set_index("task")
    assert out.loc["t", "k"] == 32 and out.loc["t", "value"] == 0.795
    assert out.loc["u", "k"] is pd.NA
    ppl = _summary([dict(task="t", kind="vanilla", setting="vanilla", x=np.nan, metric="perplexity", value=100.0),
                    dict(task="t", kind="ff", setting="ff768", x=768, metric="perplexity", value=101.9),
                    dict(task="t", kind="ff", setting="ff384", x=384, metric="perplexity", value=102.1)])
    out = summaries.smallest_k_within(ppl, metric="perplexity", kind="ff", relative=0.02, lower_is_better=True)
    assert out.k.tolist() == [768]


def test_budget_comparison_and_relative():
    rows = [dict(task="t", kind="vanilla", setting="vanilla", x=np.nan, metric="accuracy", value=0.8),
            dict(task="t", kind="attention", setting="attn8", x=8, metric="accuracy", value=0.6),
            dict(task="t", kind="budget", setting="budget8", x=8.2, nominal_k=8, metric="accuracy", value=0.7),
            dict(task="t", kind="ff", setting="ff96", x=96, metric="accuracy", value=0.4)]
    b = summaries.budget_comparison(_summary(rows), metric="accuracy")
    assert b.to_dict("records") == [{"task": "t", "average_k": 8.0, "budget_mean_k": 8.2, "uniform": 0.6,
                                     "budget": 0.7, "gain": pytest.approx(0.1)}]
    rel = summaries.relative_to_vanilla(_summary(rows), metrics={"t": "accuracy"}, d_ff=1536)
    assert rel.to_dict("records") == [{"task": "t", "metric": "accuracy", "k": 96, "k_frac": 96 / 1536,
                                       "relative": pytest.approx(0.5)}]


def test_relative_curves_line_up_models_at_the_same_share_of_units():
    def model(vanilla, attn8, ff_k, ff_value):
        return _summary([dict(task="t", kind="vanilla", setting="vanilla", x=np.nan, metric="perplexity", value=vanilla),
                         dict(task="t", kind="attention", setting="attn8", x=8, metric="perplexity", value=attn8),
                         dict(task="t", kind="ff", setting=f"ff{ff_k}", x=ff_k, metric="perplexity", value=ff_value),
                         dict(task="t", kind="both", setting="both", x=8, metric="perplexity", value=99.0)])
    curves = summaries.relative_curves({"A": (model(10, 12, 768, 15), 1536), "B": (model(20, 22, 1024, 40), 2048)},
                                       metric="perplexity")
    got = {(r.model, r.kind): (r.x, round(r.relative, 6)) for r in curves.itertuples()}
    assert got == {("A", "attention"): (8, 1.2), ("A", "ff"): (0.5, 1.5), ("B", "attention"): (8, 1.1),
                   ("B", "ff"): (0.5, 2.0)}  # "both" rows are left out
    text = summaries.relative_caption(curves, metric="perplexity")
    assert "A, attention k: 8 -> 1.200" in text and "B, FF k/d_ff: 0.5 -> 2.000" in text
    from topk_lib.plots.accuracy import plot_relative_vs_k
    fig = plot_relative_vs_k(curves, ylabel="ratio", title="t")
    assert [ax.get_xlabel() for ax in fig.axes[:2]] == ["attention k (keys per query)", "feed-forward k / d_ff"]
    assert [t.get_text() for t in fig.axes[1].get_xticklabels()] == ["1/2"]


def test_paper_reference_numbers():
    ref = summaries.paper_reference()
    assert set(ref.model) == {"T5-base", "T5-3B", "T5-11B"} and len(ref) == 6 + 6 + 4
    row = ref[(ref.model == "T5-base") & (ref.k == 16)].iloc[0]
    assert row.exact_match == 58.7 and row.relative == pytest.approx(58.7 / 62.4) and row.k_frac == 16 / 3072
    assert ref[(ref.model == "T5-11B") & (ref.k == 1024)].relative.item() > 1  # 81.4 vs full 81.3


def test_scale_budget_keeps_proportions():
    budget = {(0, 0): 10, (0, 1): 30, (1, 0): 20, (1, 1): 40}
    scaled = scale_budget(budget, average_k=5)
    assert scaled == {(0, 0): 2, (0, 1): 6, (1, 0): 4, (1, 1): 8}
    with pytest.raises(ValueError, match="budget"):
        scale_budget({}, average_k=4)


def test_measure_head_budget(llama, tok):
    pytest.importorskip("topk_lib.analysis.capture")
    budget = inputs.measure_head_budget(llama, tok, TEXT, n_tokens=64, progress=False)
    assert sorted(budget) == [(l, h) for l in range(2) for h in range(4)]
    assert all(1 <= k <= 64 for k in budget.values())
    lo = inputs.measure_head_budget(llama, tok, TEXT, n_tokens=64, frac=0.5, progress=False)
    assert all(lo[key] <= budget[key] for key in budget)  # half the mass needs no more keys than 99 %


# --------------------------------------------------------------------------- plots


def test_plots_return_figures(llama, tok, tmp_path):
    rows = [dict(task=t, kind="vanilla", setting="vanilla", x=np.nan, metric="accuracy", value=0.8, lo=0.75, hi=0.85)
            for t in ("a", "b")]
    for t in ("a", "b"):
        rows += [dict(task=t, kind="attention", setting=f"attn{k}", attn_k=k, x=k, metric="accuracy", value=0.7,
                      lo=0.6, hi=0.8) for k in (4, 16)]
        rows += [dict(task=t, kind="both", setting=f"attn{k}_ff{6 * k}", attn_k=k, ff_k=6 * k, x=k, metric="accuracy",
                      value=0.6, lo=0.5, hi=0.7) for k in (4, 16)]
        rows += [dict(task=t, kind="budget", setting="budget4", x=4.1, nominal_k=4, metric="accuracy", value=0.75,
                      lo=0.7, hi=0.8)]
    df = _summary(rows)
    fig = plot_accuracy.plot_accuracy_vs_k(df, metric="accuracy", ylabel="accuracy", title="t", percent=True)
    assert isinstance(fig, matplotlib.figure.Figure) and len(fig.axes) == 2  # no ff rows: two panels
    fig = plot_accuracy.plot_budget_frontier(df, metric="accuracy", ylabel="accuracy", title="t")
    assert len(fig.axes) == 2
    ours = pd.DataFrame({"task": ["a", "a"], "k_frac": [0.1, 0.5], "relative": [0.9, 1.0]})
    fig = plot_accuracy.plot_paper_reference(ours, summaries.paper_reference(), title="t")
    assert len(fig.axes[0].lines) == 3 + 1 + 1  # three T5 models, ours, the line at 1
    with pytest.raises(ValueError, match="metric"):
        plot_accuracy.plot_accuracy_vs_k(df, metric="mrr", ylabel="", title="")


# --------------------------------------------------------------------------- cache names and keys

COMMITTED = Path(__file__).resolve().parents[3] / "data" / "results" / "accuracy"


def test_run_sweep_finds_a_committed_cache_file():
    # the published file name: <setting>_<10-hex config_key of the config plus the setting>.json
    path = COMMITTED / "language_id" / "vanilla_81df592ff7.json"
    record = json.loads(path.read_text())
    config = {k: v for k, v in record["config"].items() if k != "setting"}

    def compute(setting):
        raise AssertionError("a committed result must be read, not recomputed")

    (got,) = sweep.run_sweep("language_id", [Setting("vanilla")], config=config, compute=compute, progress=False,
                             root=COMMITTED)
    assert not got["computed"] and got["calibrated"] == record["calibrated"]


#: model_fingerprint of the packaged models as load_model gives them (float32, CPU); the committed
#: records were computed with these.
PACKAGED = {"smollm2-135m": {"dtype": "float32", "device": "cpu", "weights": "36e2d122e40f4264"},
            "minilm-l6": {"dtype": "float32", "device": "cpu", "weights": "14641f8fdeb77022"},
            "gemma3-270m": {"dtype": "float32", "device": "cpu", "weights": "b966ebb3ad47505f"}}


def test_every_committed_sweep_record_names_the_packaged_model_it_was_computed_with():
    records = sorted(COMMITTED.glob("*/*.json"))
    assert len(records) >= 60
    for path in records:
        rec = json.loads(path.read_text())
        assert rec["model_fingerprint"] == PACKAGED[rec["config"]["model"]], path


def test_data_fingerprint_is_pinned():
    # 12 hex characters of the sha256 of the sorted JSON, non-ASCII kept as UTF-8
    assert sweep.fingerprint([["Grüße aus Köln", "de"], ["a", "en"]]) == "867f2a461107"


@pytest.mark.skipif(not data.is_fetched("fortunes"), reason="fortunes not fetched (python -m topk_lib.data)")
def test_language_id_examples_give_the_published_data_key():
    examples = accuracy.language_id_examples(per_label=20, chars=[30, 160], seed=0)
    assert len(examples) == 140 and sweep.fingerprint(examples) == "b815661ab1df"  # in vanilla_81df592ff7.json


def test_setting_of_pairs():
    assert Setting.of() == Setting("vanilla")
    assert Setting.of(8, None).name == "attn8" and Setting.of(None, 96).kind == "ff"
    assert Setting.of(8, 96) == settings_grid(both=[(8, 96)])[1]
    with pytest.raises(TypeError, match="attn_k"):
        Setting.of("8")
    with pytest.raises(ValueError, match="ff_k"):
        Setting.of(None, 0)


def test_corpus_text():
    assert accuracy.corpus_text("pydoc") == data.pydoc_text()
    with pytest.raises(ValueError, match="corpus"):
        accuracy.corpus_text("nope")


def test_lm_sweeps_equal_single_sweeps(llama, tok, tmp_path):
    setups = {32: {"windows": 2, "attn": [2], "ff": [], "both": []}}
    both = accuracy.lm_sweeps(llama, tok, model_name="tiny", corpora=["pydoc"], setups=setups, progress=False,
                              root=tmp_path)
    one = accuracy.lm_sweep(llama, tok, data.pydoc_text(), model_name="tiny", corpus="pydoc",
                            settings=settings_grid(attn_ks=[2]), window=32, n_windows=2, progress=False, root=tmp_path)
    pd.testing.assert_frame_equal(both.drop(columns=["computed", "seconds"]), one.drop(columns=["computed", "seconds"]))
    budgets = {2: {(0, 0): 1, (0, 1): 3, (1, 0): 2, (1, 1): 2}}
    b = accuracy.lm_sweeps(llama, tok, model_name="tiny", corpora=["pydoc"], setups=setups, budgets=budgets,
                           progress=False, root=tmp_path)
    assert b.setting.unique().tolist() == ["vanilla", "budget2"] and not b[b.kind == "vanilla"].computed.any()


# --------------------------------------------------------------------------- notebook summaries


def test_computed_seconds_counts_each_computed_setting_once():
    df = _summary([dict(task="t", kind="vanilla", setting="vanilla", x=np.nan, metric=m, value=1.0, seconds=3.0,
                        computed=True) for m in ("a", "b")]
                  + [dict(task="t", kind="attention", setting="attn8", x=8, metric=m, value=1.0, seconds=5.0,
                          computed=False) for m in ("a", "b")]
                  + [dict(task="t", kind="ff", setting="ff4", x=4, metric=m, value=1.0, seconds=0.5, computed=True)
                     for m in ("a", "b")])
    assert summaries.computed_seconds(df) == 3.5
    assert summaries.seconds_by_section({"x": df, "y": df[df.setting == "attn8"]}).to_dict() == {"x": 3.5, "y": 0.0}


def test_smallest_k_table_uses_the_tolerance_of_each_metric():
    rows = [dict(task="lm", kind="vanilla", setting="vanilla", x=np.nan, metric="perplexity", value=100.0),
            dict(task="lm", kind="attention", setting="attn8", x=8, metric="perplexity", value=101.5),  # within 2 %
            dict(task="lm", kind="attention", setting="attn2", x=2, metric="perplexity", value=103.0),  # outside
            dict(task="lm", kind="vanilla", setting="vanilla", x=np.nan, metric="accuracy", value=0.5),
            dict(task="lm", kind="attention", setting="attn8", x=8, metric="accuracy", value=0.48),  # 2 points worse
            dict(task="lm", kind="attention", setting="attn2", x=2, metric="accuracy", value=0.3),
            dict(task="lm", kind="ff", setting="ff4", x=4, metric="accuracy", value=0.495),  # within 1 point
            dict(task="trivia", kind="vanilla", setting="vanilla", x=np.nan, metric="contains", value=0.2),
            dict(task="trivia", kind="ff", setting="ff4", x=4, metric="contains", value=0.2)]
    targets = summaries.decoder_targets(["lm", "lm"])
    assert targets == [("lm", "perplexity"), ("lm", "accuracy"), ("language_id", "accuracy"),
                       ("polarity", "accuracy"), ("trivia", "contains"), ("passkey", "accuracy")]
    table = summaries.smallest_k_table(_summary(rows), targets)
    assert table.index.tolist() == [("lm", "perplexity"), ("lm", "accuracy"), ("trivia", "contains")]
    assert table.loc[("lm", "perplexity"), "attention k"] == 8
    assert table.loc[("lm", "perplexity"), "attention value"] == 101.5
    assert table.loc[("lm", "accuracy"), "attention k"] is pd.NA and table.loc[("lm", "accuracy"), "ff k"] == 4
    assert table.loc[("trivia", "contains"), "vanilla"] == 0.2 and table.loc[("trivia", "contains"), "ff k"] == 4


def test_budget_frontier_and_table():
    uniform = _summary([dict(task=t, kind=kind, setting=s, x=x, metric=m, value=v)
                        for t in ("a", "b") for kind, s, x in (("vanilla", "vanilla", np.nan), ("attention", "attn8", 8))
                        for m, v in (("perplexity", 10.0 if s == "vanilla" else 12.0), ("accuracy", 0.5))])
    budget_rows = _summary([dict(task="a", kind="vanilla", setting="vanilla", x=np.nan, metric="perplexity", value=10.0),
                            dict(task="a", kind="budget", setting="budget8", x=8.5, nominal_k=8, metric="perplexity",
                                 value=11.0),
                            dict(task="a", kind="budget", setting="budget8", x=8.5, nominal_k=8, metric="accuracy",
                                 value=0.6)])
    frontier = summaries.budget_frontier(uniform, budget_rows)
    assert set(frontier.task) == {"a"} and len(frontier) == 4 + 2  # a's uniform rows, then its budget rows
    table = summaries.budget_table(frontier)
    assert table.index.tolist() == [("a", 8.0)]
    assert table.loc[("a", 8.0), ("perplexity", "gain")] == pytest.approx(-1.0)
    assert table.loc[("a", 8.0), ("accuracy", "budget_mean_k")] == 8.5
    assert summaries.budget_caption(table, budget_rows) == (
        "a, average k 8 (budget mean 8.50): perplexity 12.00 uniform vs 11.00 budget, next-token accuracy 50.0% vs "
        "60.0%\nbudget settings computed for 2 s this run")  # vanilla and budget8, 1 s each
    assert summaries.closing_caption(table, pd.Series({"lm": 2.0, "qa": 0.4}), 90.0) == (
        "Per-head budget vs uniform k at the same average k (perplexity; negative gain = budget better): "
        "a k=8: 12.00 -> 11.00\nSeconds spent computing this run: lm 2, qa 0; notebook wall time 1.5 min "
        "(cached results cost nothing).")


def test_main_metrics_and_metrics_as_tasks():
    assert summaries.main_metrics(["lm_x", "lm_x", "lm_y"]) == {
        "lm_x": "accuracy", "lm_y": "accuracy", "language_id": "accuracy", "polarity": "accuracy",
        "trivia": "contains", "sotu_retrieval": "acc@1"}
    df = _summary([dict(task="t", kind="vanilla", setting="vanilla", x=np.nan, metric=m, value=v)
                   for m, v in (("acc@1", 0.5), ("mrr", 0.6), ("cosine", 1.0))])
    out = summaries.metrics_as_tasks(df, ["acc@1", "mrr"])
    assert out.task.tolist() == ["acc@1", "mrr"] and set(out.metric) == {"score"} and out.value.tolist() == [0.5, 0.6]
    assert len(summaries.metrics_as_tasks(df)) == 3


def test_section_captions():
    lm = _summary([dict(task="lm_t", kind="vanilla", setting="vanilla", x=np.nan, metric="perplexity", value=20.0,
                        lo=18.0, hi=22.5, n=100),
                   dict(task="lm_t", kind="attention", setting="attn8", x=8, metric="perplexity", value=30.0),
                   dict(task="lm_t", kind="attention", setting="attn2", x=2, metric="perplexity", value=90.0),
                   dict(task="lm_t", kind="ff", setting="ff96", x=96, metric="perplexity", value=40.0)])
    assert summaries.lm_caption(lm) == (
        "lm_t: vanilla perplexity 20.00 [18.00, 22.50] over 100 tokens; attention k=2: 90.00, FF k=96: 40.00\n"
        "language modelling computed for 4 s this run (cached settings cost nothing)")
    qa = _summary([dict(task="trivia", kind="vanilla", setting="vanilla", x=np.nan, metric="contains", value=0.25,
                        lo=0.1, hi=0.4, n=8),
                   dict(task="trivia", kind="vanilla", setting="vanilla", x=np.nan, metric="exact", value=0.125),
                   dict(task="trivia", kind="attention", setting="attn2", x=2, metric="contains", value=0.0),
                   dict(task="trivia", kind="attention", setting="attn2", x=2, metric="exact", value=0.0)])
    assert summaries.qa_caption(qa) == ("vanilla: gold answer contained in 25.0% [10.0%, 40.0%] of 8 answers, exact "
                                        "match 12.5%; attn2: 0.0%; computed for 2 s this run")
    pk = _summary([dict(task="passkey", kind=kind, setting=s, x=x, metric=m, value=v, n=4)
                   for kind, s, x, acc, dig in (("vanilla", "vanilla", np.nan, 1.0, 1.0), ("attention", "attn2", 2, 0.25, 0.5))
                   for m, v in (("accuracy", acc), ("digits", dig))])
    assert summaries.passkey_caption(pk, [0.5]) == (
        "4 prompts at depths [0.5]: vanilla: 100% of keys (100% of answer tokens), attn2: 25% of keys (50% of "
        "answer tokens); computed for 2 s this run")
    cls = _summary([dict(task="polarity", kind=kind, setting=s, x=x, metric=m, value=v)
                    for kind, s, x, cal, raw in (("vanilla", "vanilla", np.nan, 0.75, 0.7), ("ff", "ff8", 8, 0.5, 0.6))
                    for m, v in (("accuracy", cal), ("accuracy_raw", raw))])
    assert summaries.classification_caption(cls, {"polarity": 0.5}) == (
        "polarity: vanilla 75.0% calibrated, 70.0% raw (chance 50%); calibration changes accuracy by -10.0% to +5.0% "
        "across settings")
    rt = _summary([dict(task="r", kind=kind, setting=s, x=x, metric=m, value=v)
                   for kind, s, x, vals in (("vanilla", "vanilla", np.nan, (0.5, 0.6, 1.0)), ("ff", "ff8", 8, (0.25, 0.4, 0.9)))
                   for m, v in zip(("acc@1", "mrr", "cosine"), vals)])
    assert summaries.retrieval_caption(rt, 4) == (
        "vanilla: accuracy@1 50.0%, MRR 0.600 over 4 documents (chance accuracy@1 25.00%); lowest cosine to vanilla "
        "0.900 at ff8; computed for 2 s this run")
    ours = pd.DataFrame({"task": ["a", "a"], "k_frac": [0.5, 0.25], "relative": [1.0, 0.875]})
    assert summaries.paper_caption(ours, summaries.paper_reference()) == (
        "k/d_ff where the paper's models stay within 1 % of full: T5-base: down to 0.0208, T5-3B: down to 0.0078, "
        "T5-11B: down to 0.0039\nours (relative to vanilla): a: 0.500 -> 1.00, 0.250 -> 0.88")
