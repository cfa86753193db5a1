"""Two runs saving the same figure at the same time both succeed and leave a whole file."""

import os
import subprocess
import sys
import time

import pytest

from topk_lib.infra import paths

PROCESSES = 8
SAVE = """
import sys, time
import matplotlib.pyplot as plt
from topk_lib.plots.style import save_figure
fig, ax = plt.subplots()
ax.plot(range({n}), [i * {seed} for i in range({n})])  # each process draws a different figure
start = float(sys.argv[1])
while time.time() < start:  # all processes save together
    time.sleep(0.005)
for _ in range(5):
    save_figure(fig, "shared_name")
"""


@pytest.mark.slow
def test_concurrent_saves_of_one_name_all_succeed_and_leave_a_valid_png(tmp_path):
    from PIL import Image

    env = {**os.environ, "PYTHONPATH": str(paths.ROOT), "TOPK_LAB_FIGURES": str(tmp_path), "MPLBACKEND": "Agg"}
    start = time.time() + 8  # after every interpreter has imported matplotlib
    procs = [subprocess.Popen([sys.executable, "-c", SAVE.format(n=50 + i, seed=i + 1), str(start)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(PROCESSES)]
    outcomes = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _ in outcomes), [err for code, err in outcomes if code]
    with Image.open(tmp_path / "shared_name.png") as image:
        image.verify()  # a truncated or interleaved file fails here
    assert (tmp_path / "shared_name.pdf").read_bytes().rstrip().endswith(b"%%EOF")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared_name.pdf", "shared_name.png"]  # no temporaries left
