"""Concurrent writers and killed writers never leave a corrupt cache or lose a measured row (slow).

Every writer here is a separate Python process, as two notebook runs or two benchmark
suites on one machine would be: 20 at once on one cache directory, one benchmark CSV and
one figure name, and a writer SIGKILLed at random moments and then run again.
"""

import gzip
import json
import random
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

N_PROCESSES = 20

RECORD = """
import json, sys, time
from topk_lib.infra.cache import cached_frame, cached_record
import pandas as pd
root, i = sys.argv[1], int(sys.argv[2])
rec = cached_record(root + "/records/shared", config={"same": 1},
                    compute=lambda: (time.sleep(0.05), {"values": list(range(2000))})[1])
frame = cached_frame("shared", folder="frames", config={"same": 1},
                     compute=lambda: pd.DataFrame({"x": range(5000), "y": [0.5] * 5000}))
own = cached_record(root + f"/records/own{i}", config={"i": i}, compute=lambda: {"i": i})
print(json.dumps([len(rec["values"]), len(frame), own["i"]]))
"""

MERGE = """
import sys
from topk_lib.bench.store import COLUMNS, merge_rows
path, i = sys.argv[1], int(sys.argv[2])
row = {c: "" for c in COLUMNS}
row.update(suite="stress", method="m", L=i, status="ok", median_s=0.001 * i)
merge_rows(path, [row])
"""

SAVE = """
import sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from topk_lib.plots.style import save_figure
fig, ax = plt.subplots()
ax.plot(range(int(sys.argv[1]) + 2))
save_figure(fig, "stress")
"""

WRITE_FOREVER = """
import sys
from topk_lib.infra.cache import cached_record
root = sys.argv[1]
i = 0
while True:
    cached_record(f"{root}/loop/r{i % 50}", config={"i": i}, compute=lambda: {"payload": "x" * 200_000, "i": i})
    i += 1
"""


def run_all(code, args_per_process, env):
    procs = [subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args in args_per_process]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    failed = [(err[-2000:], rc) for _, err, rc in results if rc != 0]
    assert not failed, failed
    return [out for out, _, _ in results]


@pytest.fixture
def env(tmp_path):
    import os

    return {**os.environ, "TOPK_LAB_RESULTS": str(tmp_path / "results"), "TOPK_LAB_FIGURES": str(tmp_path / "figures")}


def test_concurrent_cache_writers_agree_and_leave_valid_files(tmp_path, env):
    outs = run_all(RECORD, [(tmp_path, i) for i in range(N_PROCESSES)], env)
    assert sorted(json.loads(o)[2] for o in outs) == list(range(N_PROCESSES))
    assert {tuple(json.loads(o)[:2]) for o in outs} == {(2000, 5000)}
    for path in tmp_path.rglob("*.json"):
        json.loads(path.read_text())  # every record parses
    for path in (tmp_path / "results").rglob("*.csv.gz"):
        assert len(gzip.decompress(path.read_bytes()).decode().splitlines()) == 5001
    assert not [p for p in tmp_path.rglob("*.tmp")], "temporary files left behind"


def test_concurrent_benchmark_merges_lose_no_row(tmp_path, env):
    from topk_lib.bench.store import read_rows

    csv_path = tmp_path / "bench_stress.csv"
    run_all(MERGE, [(csv_path, i) for i in range(N_PROCESSES)], env)
    assert sorted(int(r["L"]) for r in read_rows(csv_path)) == list(range(N_PROCESSES))


def test_concurrent_figure_saves_all_succeed_with_a_whole_file(tmp_path, env):
    run_all(SAVE, [(i,) for i in range(N_PROCESSES)], env)
    png = (tmp_path / "figures" / "stress.png").read_bytes()
    assert png.startswith(b"\x89PNG") and png.rstrip().endswith(b"IEND\xaeB`\x82")


def test_a_writer_killed_at_random_moments_never_leaves_a_corrupt_record(tmp_path, env):
    rng = random.Random(0)
    for _ in range(10):
        p = subprocess.Popen([sys.executable, "-c", WRITE_FOREVER, str(tmp_path)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(1.5, 3.0))  # imports take about a second; then it writes as fast as it can
        p.send_signal(signal.SIGKILL)
        p.wait()
    records = list((tmp_path / "loop").glob("*.json"))
    assert records, "the writer never got to write"
    for path in records:
        assert len(json.loads(path.read_text())["payload"]) == 200_000
