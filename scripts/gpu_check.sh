#!/usr/bin/env bash
# One CUDA check of the threshold top-k attention (topk_lib/kernels/flex.py), about 9 minutes on an H200:
#   1. the gpu-marked kernel tests (outputs and gradients against float64 references, gradcheck, saved memory);
#   2. the attention suite (B=1, H=12, d=64, causal; SDPA, chunked C=1024, top-k k=64/128) in bfloat16
#      and float32, L from 2048 up to 65536, rows merged into data/results/bench_<device>.csv as they land;
#   3. a summary: top-k time and peak memory over SDPA's and chunked's per L, dtype and pass.
# Each step has its own time limit; a step that runs out keeps the rows it wrote and the script goes on.
# Usage: scripts/gpu_check.sh [--tests-only|--bench-only]   (PYTHON=python3, OUT=folder for logs)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-data/results/quick/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.cache/inductor}  # a rerun reuses the compiled kernels
TESTS_S=${TESTS_S:-210}   # step 1 (each gpu case compiles its FlexAttention kernels)
BENCH_S=${BENCH_S:-150}   # step 2, per dtype (a point is a process of its own: start-up and compile each time)
MODE=${1:-all}

"$PYTHON" - <<'PY'
import torch, sys
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device visible to torch; nothing to check")
import triton
print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
PY

status=0
if [ "$MODE" != "--bench-only" ]; then
  echo "== 1. gpu tests (limit ${TESTS_S}s)"
  timeout --signal=INT --kill-after=20 "$TESTS_S" "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider --maxfail=20 \
    tests/unit/kernels/test_flex.py tests/unit/kernels/test_threshold.py tests/unit/kernels/test_attention.py \
    tests/unit/kernels/test_half_precision.py tests/unit/kernels/test_softcap_sinks.py 2>&1 | tee "$OUT/tests.log" \
    || { status=$?; echo "gpu tests: exit $status (124 = out of time)"; }
fi

if [ "$MODE" != "--tests-only" ]; then
  CSV=$("$PYTHON" -c "from topk_lib.bench.store import results_path; print(results_path('cuda'))")
  for dtype in bfloat16 float32; do
    echo "== 2. attention suite, $dtype (limit ${BENCH_S}s) -> $CSV"
    timeout --signal=INT --kill-after=20 "$BENCH_S" "$PYTHON" -m topk_lib.bench attention --device cuda \
      --dtype "$dtype" --methods sdpa,chunked,topk --min-L 2048 --max-L 65536 --repeats 3 --timeout 90 \
      --out "$CSV" 2>&1 \
      | tee "$OUT/bench_$dtype.log" || echo "attention suite $dtype: stopped (exit $?); its finished rows are saved"
  done
  echo "== 3. summary"
  "$PYTHON" - "$CSV" <<'PY' | tee "$OUT/summary.txt"
import sys
import pandas as pd
rows = pd.read_csv(sys.argv[1])
rows = rows[(rows.suite == "attention") & (rows.status == "ok") & (rows.L >= 2048)]
base = rows[rows.method.isin(["sdpa", "chunked"])].set_index(["dtype", "pass", "L", "method"])
lines = []
for (dtype, ps, n, k), r in rows[rows.method == "topk"].groupby(["dtype", "pass", "L", "k"]):
    r = r.iloc[0]
    def ratio(method, col):
        key = (dtype, ps, n, method)
        return f"{r[col] / base.loc[key, col]:.2f}x" if key in base.index and base.loc[key, col] else "n/a"
    lines.append(f"{dtype:9} {ps:8} L={n:6d} k={int(k):4d}  {r.median_s * 1e3:9.2f} ms"
                 f"  time/sdpa {ratio('sdpa', 'median_s'):>7}"
                 f"  time/chunked {ratio('chunked', 'median_s'):>7}  peak/sdpa {ratio('sdpa', 'peak_bytes'):>7}"
                 f"  ({r.torch_version}, {str(r.timestamp)[:16]})")
print("\n".join(lines) if lines else "no top-k rows measured")
PY
fi
exit $status
