"""The benchmark harness: isolation, budget, timeout, memory method, CSV merge (tiny sizes)."""

import csv
import time

import pytest
import torch

from topk_lib import bench
from topk_lib.bench import suites
from topk_lib.bench.__main__ import main as bench_main
from topk_lib.bench.workloads import model_config
from topk_lib.nn import Transformer
from topk_lib.kernels import baselines

MB = 1e6


def _spec(**over):
    spec = dict(suite="test", kind="attention", method="topk", B=1, H=2, L=64, d=16, C=16, k=8,
                device="cpu", dtype="float32", warmup=1, repeats=2, budget_bytes=1 << 30, quick=True)
    spec["pass"] = "fwd+bwd"
    spec.update(over)
    return spec


def _calibrate(method, **over):
    spec = dict(suite="test", kind="calibrate", method=method, device="cpu", dtype="float32",
                warmup=1, repeats=1, budget_bytes=1 << 30)
    spec["pass"] = "fwd"
    spec.update(over)
    return spec


@pytest.mark.parametrize("isolation", ["forkserver", "subprocess"])
def test_point_runs_in_a_child_and_returns_a_full_row(isolation):
    row = bench.run_point(_spec(), timeout_s=120, isolation=isolation)
    assert row["status"] == "ok", row["note"]
    assert set(bench.COLUMNS) <= set(row)
    assert row["median_s"] > 0 and row["min_s"] <= row["median_s"]
    assert row["peak_bytes"] >= 0
    assert row["mem_method"] in ("cpu-rss-hwm", "cpu-ru-maxrss")
    assert row["threads"] == torch.get_num_threads()
    assert row["torch_version"] == torch.__version__
    assert (row["method"], row["pass"], row["L"], row["C"], row["k"]) == ("topk", "fwd+bwd", 64, 16, 8)


@pytest.mark.parametrize("method", ["vanilla", "sdpa", "chunked", "topk", "performer"])
def test_every_attention_method_runs(method):
    row = bench.run_point(_spec(method=method, nb_features=16), timeout_s=120)
    assert row["status"] == "ok", row["note"]


def test_point_over_the_budget_did_not_fit():
    # A real kernel: vanilla attention at L=1024, H=12 needs ~150 MB of scores; give it 32 MB.
    row = bench.run_point(_spec(method="vanilla", L=1024, H=12, d=64, budget_bytes=32 << 20), timeout_s=120)
    assert row["status"] == "did not fit", row
    assert row["median_s"] is None and row["peak_bytes"] is None
    # and a plain 2 GB allocation under a 128 MiB budget
    row = bench.run_point(_calibrate("alloc", alloc_bytes=2_000_000_000, budget_bytes=128 << 20), timeout_s=60)
    assert row["status"] == "did not fit" and "allocate" in row["note"]


def test_point_past_its_timeout_is_recorded_timeout():
    t0 = time.monotonic()
    row = bench.run_point(_calibrate("sleep", sleep_s=60), timeout_s=2)
    assert row["status"] == "timeout"
    assert time.monotonic() - t0 < 20


def test_broken_point_is_an_error_row_not_a_crash():
    row = bench.run_point(_spec(method="no-such-method"), timeout_s=60)
    assert row["status"] == "error" and "no-such-method" in row["note"]


def test_cpu_memory_method_reads_a_known_allocation():
    row = bench.run_point(_calibrate("alloc", alloc_bytes=200_000_000), timeout_s=60)
    assert row["status"] == "ok", row["note"]
    assert row["peak_bytes"] == pytest.approx(200_000_000, rel=0.10)


def test_cpu_memory_matches_an_analytic_count_of_vanilla_attention():
    # Forward at L=1024, H=12: the masked scores, the softmax output and its masked copy are
    # live at once (3 x L*L*H float32) plus K and V copied by repeat_interleave (2 x H*L*d).
    n, h, d = 1024, 12, 64
    analytic = 3 * n * n * h * 4 + 2 * h * n * d * 4  # 157.3 MB
    row = bench.run_point(_spec(method="vanilla", L=n, H=h, d=d, repeats=1, **{"pass": "fwd"}), timeout_s=120)
    assert row["status"] == "ok", row["note"]
    assert row["peak_bytes"] == pytest.approx(analytic, rel=0.10)


def test_merge_is_idempotent_and_replaces_by_key(tmp_path):
    out = tmp_path / "bench_cpu.csv"
    a = bench.row_template(_spec(L=64))
    b = bench.row_template(_spec(L=128))
    a.update(status="ok", median_s=0.5, peak_bytes=1000)
    b.update(status="timeout")
    bench.merge_rows(out, [a, b])
    first = out.read_text()
    bench.merge_rows(out, [a, b])
    assert out.read_text() == first  # same rows again: same file
    a2 = dict(a, median_s=0.25, timestamp="later")
    bench.merge_rows(out, [a2])  # same key (L=64): replaces, L=128 is kept
    rows = bench.read_rows(out)
    assert len(rows) == 2
    by_len = {r["L"]: r for r in rows}
    assert by_len["64"]["median_s"] == "0.25" and by_len["128"]["status"] == "timeout"
    with open(out, newline="") as fh:
        assert csv.DictReader(fh).fieldnames[: len(bench.COLUMNS)] == list(bench.COLUMNS)
    assert [p.name for p in tmp_path.iterdir()] == ["bench_cpu.csv"]  # no temporary, no lock file left


def test_suite_reruns_merge_into_one_set_of_rows(tmp_path, capsys):
    out = tmp_path / "bench_cpu.csv"
    rows = bench.run_suite("product", quick=True, out=out, budget=1 << 30, timeout_s=120, progress=False)
    assert {r["status"] for r in rows} == {"ok"}, [r["note"] for r in rows if r["status"] != "ok"]
    assert bench_main(["product", "--quick", "--budget", "1GiB", "--out", str(out)]) == 0  # the CLI, again
    saved = bench.read_rows(out)
    assert len(saved) == len(rows) == 2 * 7  # 2 lengths x 7 methods
    printed = capsys.readouterr().out
    assert "gather_bmm" in printed and "Lk=1024" in printed


def test_default_csv_paths(monkeypatch, tmp_path):
    monkeypatch.delenv("TOPK_LAB_RESULTS", raising=False)
    assert bench.results_path("cpu").name == "bench_cpu.csv"
    assert bench.results_path("cpu", quick=True).parent.name == "quick"  # git-ignored folder
    monkeypatch.setenv("TOPK_LAB_RESULTS", str(tmp_path))  # the notebook runner's override wins
    assert bench.results_path("cpu", quick=True) == tmp_path / "bench_cpu.csv"


def test_sparse_weights_times_v_variants_agree():
    torch.manual_seed(0)
    h, c, lk, d, k = 2, 8, 32, 4, 5
    v = torch.randn(h, lk, d, dtype=torch.float64)
    idx = torch.rand(h, c, lk).topk(k, dim=-1).indices
    p = torch.softmax(torch.randn(h, c, k, dtype=torch.float64), -1)
    ref = torch.einsum("hck,hckd->hcd", p, v[torch.arange(h)[:, None, None], idx])
    for method in baselines.PRODUCT_METHODS:
        torch.testing.assert_close(baselines.sparse_weights_times_v(p, idx, v, method=method), ref)


def test_chunked_dense_feedforward_is_exact_with_gradients():
    torch.manual_seed(0)
    x = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    w_in = torch.randn(12, 6, dtype=torch.float64, requires_grad=True)
    w_out = torch.randn(6, 12, dtype=torch.float64, requires_grad=True)
    ref = torch.relu(x @ w_in.T) @ w_out.T
    out = baselines.chunked_dense_feedforward(x, w_in, w_out, chunk_size=3)
    torch.testing.assert_close(out, ref)
    g_ref = torch.autograd.grad(ref.sum(), (x, w_in, w_out))
    g = torch.autograd.grad(out.sum(), (x, w_in, w_out))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_tiny_transformer_attention_choices_agree_when_exact():
    torch.manual_seed(0)
    x = torch.randn(1, 16, 32)
    outs = []
    for attention in ("vanilla", "sdpa", "chunked", "topk"):
        torch.manual_seed(1)
        model = Transformer(model_config(dict(n_layers=2, d=32, H=4, d_ff=64, method=attention, k=16, C=4)))
        outs.append(model(x))
    for o in outs[1:]:  # topk=16 >= L: exact too
        torch.testing.assert_close(o, outs[0], rtol=1e-4, atol=1e-5)


def test_model12_workload_is_the_pinned_model():
    """Pinned output of the 12-layer benchmark's model (seeded init and input): the committed rows
    measured this workload, so a change to it shows here."""
    torch.manual_seed(1)
    model = Transformer(model_config(dict(n_layers=2, d=32, H=4, d_ff=64, method="topk", k=3, ff_k=8, C=4)))
    torch.manual_seed(2)
    x = torch.randn(1, 16, 32)  # [B, L, d]
    with torch.no_grad():
        out = model(x).double()
    assert out.sum().item() == pytest.approx(4.860673449933529, rel=1e-6)
    assert out.abs().sum().item() == pytest.approx(441.27193250507116, rel=1e-6)


def test_kernel_targets_read_ratios():
    rows = []
    for n, (tk, tc, mk, mc) in {8192: (3.0, 2.0, 100e6, 90e6), 16384: (9.0, 8.0, 190e6, 180e6)}.items():
        for method, t, m in (("topk", tk, mk), ("chunked", tc, mc)):
            for ps, scale in (("fwd", 1.0), ("fwd+bwd", 3.0)):
                rows.append(dict(method=method, L=str(n), status="ok", median_s=str(t * scale),
                                 peak_bytes=str(m), **{"pass": ps}))
    verdicts = {name: met for name, _, met in bench.kernel_targets(rows)}
    assert verdicts["top-k fwd time <= 1.5x chunked at L=8192"] is True  # 1.5x exactly
    assert verdicts["top-k fwd time <= 1.5x chunked at L=16384"] is True
    assert verdicts["top-k fwd+bwd peak <= 1.2x chunked at L=16384"] is True
    assert verdicts["top-k fwd+bwd peak grows <= linearly 8192->16384 (<= 2.0x)"] is True
    rows[0]["median_s"] = "3.1"  # top-k fwd at 8192 now 1.55x
    assert not {n: m for n, _, m in bench.kernel_targets(rows)}["top-k fwd time <= 1.5x chunked at L=8192"]


@pytest.mark.parametrize("text, expected", [("16GiB", 16 << 30), ("500MB", 500_000_000), ("2G", 2 << 30),
                                            ("1048576", 1 << 20), ("1.5 GiB", 3 << 29)])
def test_parse_bytes(text, expected):
    assert bench.parse_bytes(text) == expected


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="suite"):
        bench.run_suite("nope")
    with pytest.raises(ValueError, match="pass"):
        bench.run_point(_spec(**{"pass": "bwd"}))
    with pytest.raises(ValueError, match="memory size"):
        bench.parse_bytes("lots")
    with pytest.raises(ValueError, match="min_len"):
        bench.run_suite("attention", quick=True, min_len=512, max_len=256)


def test_attention_suite_starts_at_min_len(monkeypatch, tmp_path):
    def fake_point(spec, **kw):
        return {**bench.row_template(spec), "status": "ok", "median_s": 0.1}

    monkeypatch.setattr(suites, "run_point", fake_point)
    rows = bench.run_suite("attention", quick=True, min_len=256, max_len=512, out=tmp_path / "b.csv", progress=False)
    assert sorted({r["L"] for r in rows}) == [256, 512]


def test_attention_suite_runs_only_the_methods_asked_for(monkeypatch, tmp_path):
    def fake_point(spec, **kw):
        return {**bench.row_template(spec), "status": "ok", "median_s": 0.1}

    monkeypatch.setattr(suites, "run_point", fake_point)
    rows = bench.run_suite("attention", quick=True, max_len=256, out=tmp_path / "b.csv", progress=False,
                           methods=("sdpa", "topk"))
    assert {r["method"] for r in rows} == {"sdpa", "topk"}
    for bad in (("sdpa",), ("topk", "flash")):
        with pytest.raises(ValueError, match="methods"):
            bench.run_suite("attention", quick=True, out=tmp_path / "b.csv", methods=bad)
    with pytest.raises(ValueError, match="methods"):
        bench.run_suite("product", quick=True, out=tmp_path / "b.csv", methods=("topk",))


def test_measured_suites_reads_the_device_csv(monkeypatch, tmp_path):
    monkeypatch.setenv("TOPK_LAB_RESULTS", str(tmp_path))
    assert bench.measured_suites("cpu") == set()
    bench.merge_rows(tmp_path / "bench_cpu.csv", [{**bench.row_template(_spec()), "status": "ok"}])
    assert bench.measured_suites("cpu") == {_spec()["suite"]}


def test_topk_feedforward_forward_peak_is_chunk_bounded():
    """8 chunks of tokens: top-k holds a few [C, d_ff] buffers, the dense layer two [T, d_ff] ones."""
    spec = _spec(kind="ff", method="topk", L=2048, d=64, d_ff=16384, C=256, k=64, H=None)
    spec["pass"] = "fwd"
    dense_hidden = 2048 * 16384 * 4  # float32 bytes of one [T, d_ff] tensor
    topk = bench.run_point(spec, timeout_s=120)
    dense = bench.run_point({**spec, "method": "dense", "C": None, "k": None}, timeout_s=120)
    assert topk["status"] == dense["status"] == "ok", (topk["note"], dense["note"])
    assert dense["peak_bytes"] > 1.5 * dense_hidden  # the reference really materialises the hidden layer
    # RSS also counts BLAS and thread buffers outside PyTorch's allocator: 5-7 chunk buffers measured here
    assert topk["peak_bytes"] < 0.6 * dense["peak_bytes"], topk["peak_bytes"] / dense["peak_bytes"]


def test_forkserver_context_is_multiprocessings_own():
    from topk_lib.bench import harness

    ctx = harness.forkserver_context()
    assert ctx.get_start_method() == "forkserver" and harness.forkserver_context() is ctx


def test_captions_name_the_ratios_measured():
    import pandas as pd

    rows = pd.DataFrame([
        dict(suite="attention", method=m, k=k, C=c, ff_k=None, L=n, status="ok", peak_bytes=mem * n, median_s=t * n,
             device_name="cpu x2", **{"pass": "fwd+bwd"})
        for n in (1024, 2048)
        for m, k, c, mem, t in (("topk", 128, 1024, 1.0, 2.0), ("chunked", None, 1024, 2.0, 1.0), ("sdpa", None, None, 4.0, 0.5))
    ])
    assert bench.attention_caption(rows, budget="16GiB").splitlines() == [
        "Caption (cpu x2): longest input that ran (fwd+bwd, budget 16GiB): chunked C=1024 2048, sdpa 2048, "
        "topk k=128 C=1024 2048",
        "  top-k (k=128) / chunked memory, fwd+bwd: L=1024: 0.50x, L=2048: 0.50x",
        "  top-k (k=128) / SDPA memory, fwd+bwd: L=1024: 0.25x, L=2048: 0.25x",
        "  top-k (k=128) / chunked time, fwd+bwd: L=1024: 2.00x, L=2048: 2.00x",
        "  top-k (k=128) / SDPA time, fwd+bwd: L=1024: 4.00x, L=2048: 4.00x",
    ]
    text = bench.ratio_caption(rows, suite="attention", pairs=[("topk k=128 C=1024", "sdpa"), ("nope", "sdpa")], x="L")
    assert text.splitlines() == ["Caption (attention, cpu x2), fwd+bwd:",
                                 "  topk k=128 C=1024 / sdpa memory: L=1024: 0.25x, L=2048: 0.25x",
                                 "  topk k=128 C=1024 / sdpa time: L=1024: 4.00x, L=2048: 4.00x"]


# --------------------------------------------------------------------------- failures never replace ok rows


def _committed_row(**over):
    """A row as the committed bench_cpu.csv holds it: ok, measured under the 16 GiB default budget."""
    row = bench.row_template(_spec(L=2048, budget_bytes=16 << 30))
    row.update(status="ok", median_s=0.33, min_s=0.32, peak_bytes=616513536)
    row.update(over)
    return row


@pytest.mark.parametrize("status, budget", [("error", 16 << 30), ("timeout", 16 << 30), ("did not fit", 64 << 20),
                                            ("did not fit", 16 << 30), ("timeout", 0), ("did not fit", 32 << 30)])
def test_a_failed_point_never_replaces_an_ok_row(tmp_path, status, budget):
    out = tmp_path / "bench_cpu.csv"
    bench.merge_rows(out, [_committed_row()])
    failed = {**_committed_row(), "status": status, "median_s": None, "min_s": None, "peak_bytes": None,
              "budget_bytes": budget, "note": "killed", "timestamp": "later"}
    merged = bench.merge_rows(out, [failed])
    (row,) = bench.read_rows(out)
    assert (row["status"], row["median_s"], row["budget_bytes"]) == ("ok", "0.33", str(16 << 30))
    assert (merged.added, merged.replaced, merged.kept) == (0, 0, 1)
    merged = bench.merge_rows(out, [failed], replace=True)  # asked for: the failure replaces it
    (row,) = bench.read_rows(out)
    assert (row["status"], row["median_s"], row["note"]) == (status, "", "killed")
    assert (merged.added, merged.replaced, merged.kept) == (0, 1, 0)


def test_ok_rows_replace_ok_and_failed_rows(tmp_path):
    out = tmp_path / "bench_cpu.csv"
    bench.merge_rows(out, [_committed_row(), _committed_row(L=4096, status="did not fit", median_s=None)])
    merged = bench.merge_rows(out, [_committed_row(median_s=0.25, budget_bytes=1 << 30),  # a rerun's new numbers
                                    _committed_row(L=4096, median_s=0.9),  # now fits
                                    _committed_row(L=8192)])
    assert (merged.added, merged.replaced, merged.kept) == (1, 2, 0)
    by_len = {r["L"]: r for r in bench.read_rows(out)}
    assert [by_len[n]["status"] for n in ("2048", "4096", "8192")] == ["ok", "ok", "ok"]
    assert (by_len["2048"]["median_s"], by_len["4096"]["median_s"]) == ("0.25", "0.9")


def test_a_did_not_fit_under_a_larger_budget_is_not_replaced_by_a_smaller_budgets_failure(tmp_path):
    out = tmp_path / "bench_cpu.csv"
    big = _committed_row(status="did not fit", median_s=None, budget_bytes=16 << 30)
    bench.merge_rows(out, [big])
    small = {**big, "budget_bytes": 64 << 20, "status": "timeout"}
    assert bench.merge_rows(out, [small]).kept == 1
    assert bench.read_rows(out)[0]["budget_bytes"] == str(16 << 30)
    unlimited = {**big, "budget_bytes": 0}  # 0 = no budget: says more than any budget
    assert bench.merge_rows(out, [unlimited]).replaced == 1
    assert bench.read_rows(out)[0]["budget_bytes"] == "0"
    assert bench.merge_rows(out, [big]).kept == 1
    # a failure replaces a failure under an equal or smaller budget: the latest attempt is the state
    assert bench.merge_rows(out, [{**unlimited, "status": "error"}]).replaced == 1


def test_rows_without_a_budget_column_are_read_as_unknown(tmp_path):
    out = tmp_path / "bench_cpu.csv"
    row = _committed_row()
    failed = {**row, "L": 4096, "status": "did not fit", "median_s": None}
    bench.merge_rows(out, [row, failed])
    columns = [c for c in bench.COLUMNS if c != "budget_bytes"]
    old = bench.read_rows(out)
    with open(out, "w", newline="") as fh:  # as an older file without the budget column would be
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(old)
    before = out.read_bytes()
    assert bench.merge_rows(out, [{**row, "status": "error", "budget_bytes": 0}]).kept == 1
    assert out.read_bytes() == before  # nothing landed: the old file stays as it was
    merged = bench.merge_rows(out, [{**failed, "status": "timeout", "budget_bytes": 64 << 20}])
    assert merged.replaced == 1  # an unknown budget is not larger: the latest failure lands
    by_len = {r["L"]: r for r in bench.read_rows(out)}
    assert (by_len["2048"]["status"], by_len["2048"]["budget_bytes"]) == ("ok", "")  # the column is added, empty
    assert by_len["4096"]["status"] == "timeout"


def test_the_committed_csvs_keep_their_ok_rows_against_a_failed_rerun(tmp_path):
    from topk_lib.infra import paths

    for committed in sorted(paths.results().glob("bench_*.csv")):
        out = tmp_path / committed.name
        out.write_bytes(committed.read_bytes())
        before = bench.read_rows(out)
        failures = [{**r, "status": "error", "median_s": "", "peak_bytes": "", "note": "boom"} for r in before]
        merged = bench.merge_rows(out, failures)
        ok = sum(r["status"] == "ok" for r in before)
        assert (merged.kept, merged.replaced, merged.added) == (ok, len(before) - ok, 0)
        after = bench.read_rows(out)
        assert [r for r in after if r["status"] == "ok"] == [r for r in before if r["status"] == "ok"]


def test_suite_passes_replace_on_and_counts_what_it_kept(monkeypatch, tmp_path):
    out = tmp_path / "bench_cpu.csv"
    statuses = iter(["ok"] * 14 + ["error"] * 14 + ["error"] * 14)

    def fake_point(spec, **kw):
        status = next(statuses)
        return {**bench.row_template(spec), "status": status, "median_s": 0.1 if status == "ok" else None}

    monkeypatch.setattr(suites, "run_point", fake_point)
    first = bench.run_suite("product", quick=True, out=out, progress=False)
    assert (first.merged.added, first.merged.replaced, first.merged.kept) == (14, 0, 0)
    second = bench.run_suite("product", quick=True, out=out, progress=False)
    assert (second.merged.added, second.merged.replaced, second.merged.kept) == (0, 0, 14)
    assert {r["status"] for r in bench.read_rows(out)} == {"ok"}
    third = bench.run_suite("product", quick=True, out=out, progress=False, replace=True)
    assert (third.merged.replaced, third.merged.kept) == (14, 0)
    assert {r["status"] for r in bench.read_rows(out)} == {"error"}


def test_cli_reports_kept_and_replaced_rows(monkeypatch, tmp_path, capsys):
    out = tmp_path / "bench_cpu.csv"
    bench.merge_rows(out, [{**bench.row_template(_spec()), "suite": "product", "status": "ok"}])

    def fake_point(spec, **kw):
        return {**bench.row_template(spec), "status": "error", "note": "boom"}

    monkeypatch.setattr(suites, "run_point", fake_point)
    assert bench_main(["product", "--quick", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "14 added, 0 replaced, 0 kept" in text
    assert bench_main(["product", "--quick", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "0 added, 14 replaced, 0 kept" in text  # failures over failures: the latest attempt
    monkeypatch.setattr(suites, "run_point", lambda spec, **kw: {**bench.row_template(spec), "status": "ok"})
    assert bench_main(["product", "--quick", "--out", str(out)]) == 0
    monkeypatch.setattr(suites, "run_point", fake_point)
    assert bench_main(["product", "--quick", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "0 added, 0 replaced, 14 kept" in text and "--replace" in text
    assert bench_main(["product", "--quick", "--out", str(out), "--replace"]) == 0
    assert "0 added, 14 replaced, 0 kept" in capsys.readouterr().out


# --------------------------------------------------------------------------- unusable arguments fail before any point


def _no_points(monkeypatch):
    def no_point(spec, **kw):
        raise AssertionError("a point ran")

    monkeypatch.setattr(suites, "run_point", no_point)


def _cuda_names():
    return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]


ABSENT_GPU = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 7}"  # one past the last


@pytest.mark.parametrize("device", ["tpu", ABSENT_GPU, "mps", "", "cuda:x"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_cli_refuses_an_unusable_device_before_any_point(monkeypatch, tmp_path, capsys, device):
    _no_points(monkeypatch)
    monkeypatch.setenv("TOPK_LAB_RESULTS", str(tmp_path))
    with pytest.raises(SystemExit) as exc:
        bench_main(["kernels", "--device", device, "--quick"])
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert "--device" in err and repr(device) in err
    assert all(name in err for name in _cuda_names())  # what is available
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("device", ["tpu", ABSENT_GPU] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_run_suite_refuses_an_unusable_device(monkeypatch, tmp_path, device):
    _no_points(monkeypatch)
    with pytest.raises(ValueError, match=r"device must be one of .*cpu.*got '" + device):
        bench.run_suite("kernels", quick=True, device=device, out=tmp_path / "b.csv", progress=False)
    with pytest.raises(TypeError, match="device"):
        bench.run_suite("kernels", quick=True, device=0, out=tmp_path / "b.csv", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, option", [(["--budget", "16"], "--budget"), (["--budget", "63MiB"], "--budget"),
                                          (["--budget", "lots"], "--budget"), (["--timeout", "0.5"], "--timeout"),
                                          (["--timeout", "0"], "--timeout"), (["--timeout", "nan"], "--timeout"),
                                          (["--reserve", "lots"], "--reserve")])
def test_cli_refuses_budgets_and_timeouts_below_their_floors(monkeypatch, tmp_path, capsys, argv, option):
    _no_points(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        bench_main(["product", "--quick", "--out", str(tmp_path / "b.csv"), *argv])
    assert exc.value.code != 0
    assert option in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_run_suite_refuses_budgets_and_timeouts_below_their_floors(monkeypatch, tmp_path):
    _no_points(monkeypatch)
    kw = dict(quick=True, out=tmp_path / "b.csv", progress=False)
    with pytest.raises(ValueError, match=r"budget must be 0 \(unlimited\) or at least 64 MiB.*got 16"):
        bench.run_suite("product", budget=16, **kw)
    with pytest.raises(TypeError, match="budget"):
        bench.run_suite("product", budget="16GiB", **kw)
    with pytest.raises(ValueError, match=r"timeout_s must be at least 10 s.*got 0.5"):
        bench.run_suite("product", timeout_s=0.5, **kw)
    with pytest.raises(TypeError, match="timeout_s"):
        bench.run_suite("product", timeout_s="900", **kw)
    assert list(tmp_path.iterdir()) == []


def test_budget_zero_is_unlimited_and_documented(monkeypatch, tmp_path, capsys):
    seen = []
    monkeypatch.setattr(suites, "run_point", lambda spec, **kw: seen.append(spec["budget_bytes"])
                        or {**bench.row_template(spec), "status": "ok"})
    assert bench_main(["product", "--quick", "--budget", "0", "--out", str(tmp_path / "b.csv")]) == 0
    assert set(seen) == {0}
    with pytest.raises(SystemExit):
        bench_main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "0 = unlimited" in help_text and "--replace" in help_text


def test_run_interleaved_alternates_the_methods_in_one_process():
    specs = [_calibrate("sleep", sleep_s=0.02), _calibrate("sleep", sleep_s=0.06)]
    res = bench.run_interleaved(specs, warmup=0, repeats=3, timeout_s=30)
    assert res["status"] == "ok", res
    assert [len(t) for t in res["times"]] == [3, 3]
    assert all(0.02 <= t < 0.5 for t in res["times"][0]) and all(0.06 <= t < 0.5 for t in res["times"][1])
    lo, hi = res["load"]
    assert 0 <= lo <= hi
    failed = bench.run_interleaved([_calibrate("nope")], warmup=0, repeats=1, timeout_s=30)
    assert failed["status"] == "error" and "nope" in failed["note"]
    with pytest.raises(ValueError, match="repeats"):
        bench.run_interleaved(specs, warmup=0, repeats=0)


def test_kernel_ratios_and_sdpa_targets():
    rows = []
    for n, times in {8192: dict(topk=0.9, sdpa=0.6, chunked=1.8), 16384: dict(topk=4.0, sdpa=2.0, chunked=8.0)}.items():
        for method, t in times.items():
            for ps, scale in (("fwd", 1.0), ("fwd+bwd", 3.0)):
                rows.append(dict(method=method, L=str(n), status="ok", median_s=str(t * scale), peak_bytes="1",
                                 note="time interleaved with sdpa, chunked, topk; 1-min load 0.5-0.7", **{"pass": ps}))
    lines = bench.kernel_ratios(rows)
    assert lines[0].startswith("L=8192") and "1.50x sdpa" in lines[0] and "0.50x chunked" in lines[0]
    assert "1-min load 0.5-0.7" in lines[0]
    verdicts = {name: met for name, _, met in bench.kernel_targets(rows)}
    assert verdicts["top-k fwd time <= 1.5x sdpa at L=8192"] is True  # 1.5x exactly
    assert verdicts["top-k fwd time <= 1.5x sdpa at L=16384"] is False  # 2x
    assert verdicts["top-k fwd+bwd time <= 1.0x sdpa at L=8192"] is False
    assert verdicts["top-k fwd time <= 0.6x chunked at L=16384"] is True


def test_kernels_suite_takes_times_from_the_interleaved_run_and_memory_from_the_lone_one(monkeypatch, tmp_path):
    lone, together = [], []

    def fake_point(spec, **kw):
        lone.append(spec)
        fits = not (spec["method"] == "vanilla" and spec["L"] == 512)
        return {**bench.row_template(spec), "status": "ok" if fits else "did not fit", "median_s": 99.0,
                "min_s": 99.0, "peak_bytes": 1000}

    def fake_interleaved(specs, *, warmup, repeats, **kw):
        together.append([s["method"] for s in specs])
        return {"status": "ok", "times": [[0.1 * (i + 1)] * repeats for i in range(len(specs))], "load": [0.4, 0.6]}

    monkeypatch.setattr(suites, "run_point", fake_point)
    monkeypatch.setattr(suites, "run_interleaved", fake_interleaved)
    rows = bench.run_suite("kernels", quick=True, out=tmp_path / "b.csv", progress=False)
    assert all(s["repeats"] == 1 and s["warmup"] == 0 for s in lone)  # alone: one call, for memory
    assert together[0] == ["vanilla", "sdpa", "chunked", "topk"]
    assert together[-1] == ["sdpa", "chunked", "topk"]  # vanilla did not fit at 512: not timed with the others
    topk = [r for r in rows if r["method"] == "topk"]
    assert all(r["median_s"] == pytest.approx(0.4 if r["L"] == 256 else 0.3) and r["peak_bytes"] == 1000 for r in topk)
    assert all("interleaved with" in r["note"] and "1-min load 0.4-0.6" in r["note"] for r in topk)
    assert all(r["repeats"] == 1 for r in rows)  # quick mode's repeats, what the interleaved run used
